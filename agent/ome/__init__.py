"""OME's model-agent contract, byte for byte: what a node agent writes so that OME's controller and serving stack
read it as if OME's own Go agent (``sgl-project/ome``) had written it. Pure: nothing here talks to the API server
or writes a file; the agent computes what to write with these functions and writes it through its reporting layer.

For each model (a ``BaseModel`` in a namespace or a cluster-wide ``ClusterBaseModel``) on each node, OME expects:

- a **node label** ``models.ome.io/<key>`` whose value is the node's :class:`~.states.ModelStatus` (``Ready``,
  ``Updating`` or ``Failed``; removed when the model leaves the node). Serving pods select nodes on ``Ready``;
- an **entry in the node's status ConfigMap** (named after the node, labelled ``models.ome/basemodel-status``)
  under the key ``clusterbasemodel.<name>`` or ``<namespace>.basemodel.<name>``: a JSON ``ModelEntry``
  ``{"name", "status", "config", "progress"}`` written as Go's ``json.Marshal`` writes it. ``progress`` is present
  only while ``Updating``; ``config`` is OME's ``ModelConfig`` (type, architecture, parameter count, context
  length, capabilities, quantization, artifact) parsed from the model's files. Fields OME does not own survive
  every write; the agent keeps its own data under ``modelherd``. The key is removed when the model leaves;
- from these, OME's controller derives each model's ``status.state`` (:class:`~.states.LifecycleState`) and its
  ready/failed node lists, and removes the model's finalizer once no node's ConfigMap holds its key.

Label and ConfigMap keys are cut to OME's byte budgets with a SHA-256 prefix (consumers recompute them).

Modules: :mod:`.keys` (label and ConfigMap keys), :mod:`.states` (the status words), :mod:`.entry` (the
ConfigMap entry and Go's JSON encoding), :mod:`.modelconfig` (the ``config`` of an entry) over
:mod:`.architectures` (OME's per-``model_type`` loaders), :mod:`.parameters` (parameter counts) and
:mod:`.godecode` (reading JSON files with Go's decoding rules).
"""
