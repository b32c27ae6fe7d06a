"""modelherd.storage — everything that touches bytes.

Filesystem detection, sources (Hugging Face Hub, OCI Object Storage, local paths; HTTP(S) folders and OCI
registries in progress), the download engine, verification and GPU shapes. The lowest of the three packages
(``storage`` <- ``coordination`` <- ``agent``): it imports neither of the others and knows nothing of Kubernetes.
"""
