"""How the node agent reports: status writers over the one Kubernetes access layer (:mod:`modelherd.agent.kube`).

- :mod:`.status` — :class:`~.status.ModelStatusWriter`, the reconciler's one way to say where a model stands on
  this node: the node label (:mod:`.labels`), then the ConfigMap entry (:mod:`.configmap`), the state metric, an
  Event (:mod:`.events`);
- :mod:`.progress` — a running pull's progress into metrics at once and into the entry at most every interval;
- :mod:`.modelconfig` — the ``config`` object of a Ready model's entry, parsed once per publish;
- :mod:`.metrics` — OME's ``model_agent_*`` metrics and modelherd's own, on an injected registry;
- :mod:`.freshness`, :mod:`.ratelimit` — our own writes seen before the watch catches up; per-key write limits.

Every request to the API server goes through :mod:`modelherd.agent.kube`; OME's formats (keys, entry values,
metadata) are pure functions in :mod:`modelherd.agent.ome` (the contract is summarised in ``docs/``).
"""
