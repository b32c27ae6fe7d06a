"""modelherd.storage — everything that touches bytes.

Filesystem detection, sources (Hugging Face Hub, OCI Object Storage, local paths), the download
engine, verification and GPU shapes. This layer knows nothing of Kubernetes.
"""
