"""modelherd.agent — the node agent, the status controller and the CLI: everything that talks to Kubernetes.

The top package of the three (``storage`` <- ``coordination`` <- ``agent``). Inside it, units import only downward
through the layers ``tests/unit/test_layering.py`` defines (``AGENT_LAYERS``): the Kubernetes access layer
(:mod:`.kube`) and OME's formats (:mod:`.ome`) at the bottom, then settings, transfer and models, the watching and
reporting packages, the lifecycle of one model, and on top the agent (:mod:`.runner`), the controller, the CLI's
commands and :mod:`.cli`. ``docs/architecture.md`` has one row per module.
"""
