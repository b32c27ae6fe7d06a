"""``modelherd controller``: OME's BaseModel status controller for clusters without OME's controller.

It turns the agents' per-node status ConfigMaps into each model's ``status`` and finalizer (:mod:`.controller`,
with the pure rules of :mod:`.status`), one active replica elected on a Lease (:mod:`.leader`). It sits in the
layer of the node agent (:mod:`modelherd.agent.runner`), which it never imports: both stand on the process
skeleton (:mod:`modelherd.agent.process`), the watching package and the Kubernetes access layer.
"""
