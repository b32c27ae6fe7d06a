"""What the cluster wants of this node: the informers, the work queue and node selection (layer 3 of agent/).

:mod:`.informer` is the list/watch client: it mirrors one collection of the API server through the Kubernetes access
layer (:mod:`modelherd.agent.kube`, the process's one client and pool) and hands each change to a handler that only
enqueues. :mod:`.workqueue` (client-go's rate-limited work queue) and :mod:`.selection` (the kube-scheduler's
``nodeSelector``/``nodeAffinity`` rules on ``spec.storage``) are pure: they make no request and take the raw dicts
the API returns. Nothing here imports the reporting writers of the same layer.
"""
