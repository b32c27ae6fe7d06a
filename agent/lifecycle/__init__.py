"""One model's life on this node: the reconciler's state machine and the collaborators it decides for.

- :mod:`.reconciler` — :class:`~.reconciler.Reconciler`, the state machine (wanted here → Ready | Failed; not
  wanted → label, entry and files gone), over injected Protocols;
- :mod:`.puller` — the model's source, token and GPU-shape filter, and the coordinated pull;
- :mod:`.credentials` — the one credential chain (HF tokens, registry docker configs, HTTP tokens: Secret,
  inline, the agent's own), the CLI's too;
- :mod:`.removal` — what happens to the files when a model leaves, and the staging GC;
- :mod:`.claims` — who holds a folder and a status key among the live CRs;
- :mod:`.verifier` — periodic quick and deep verification of the Ready models.
"""
