"""OME's reporting formats, byte for byte: node-label and ConfigMap keys, ConfigMap entry values, model metadata.

Pure and Kubernetes-free: nothing here talks to the API server. The agent core computes what to write with these
functions and writes it. Every format follows OME's Go model agent (``sgl-project/ome`` at ``17b77eda``); see
``/work/shared/docs/ome-contract.md`` §1-§2 and ``docs/architecture.md``.
"""
