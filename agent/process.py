"""The skeleton of a long-running modelherd process (the node agent, the status controller): informers over the
one API client, the HTTP health server, one shutdown Event, and the run-until-cancelled order.

The two processes differ in what they watch and what their workers do; how they start, wait for their caches,
report and stop is written once, here.

Invariants:
- Every informer is made by :meth:`WatchProcess.informer`, so each is listed for the health checks and counts
  and logs its watch restarts the same way.
- :meth:`WatchProcess.run` keeps one order: the HTTP server and every informer start, then the owner's own
  loops (``started``); ``synced`` runs (in a thread of its own) only once every initial list is in, so no worker
  judges an object against a cache that has not seen the cluster yet; on cancel (the CLI's SIGINT/SIGTERM
  handler sets the Event) :attr:`~WatchProcess.shutdown` is set, the owner stops its loops (``stopping``), and
  only then do the informers and the server stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from .basemodels import ModelRef
from .kube import KubeClient
from .server import Check, HealthServer
from .watching.informer import Handler, Informer
from .watching.workqueue import WorkQueue

__all__ = ["WatchProcess", "reconcile_once"]


def reconcile_once(queue: WorkQueue[ModelRef], ref: ModelRef, reconcile: Callable[[ModelRef], bool],
                   shutdown: threading.Event, log: logging.Logger) -> bool:
    """One reconcile of a key a worker took from ``queue``: on success its back-off is forgotten; on failure, or
    an unexpected exception (logged with its traceback), it is re-added rate-limited unless the process is
    stopping. The caller still calls ``queue.done(ref)``. True when the reconcile succeeded."""
    try:
        ok = reconcile(ref)
    except Exception:
        log.exception("%s: reconcile failed unexpectedly; retrying with back-off", ref.display)
        ok = False
    if ok:
        queue.forget(ref)
    elif not shutdown.is_set():
        queue.add_rate_limited(ref)
    return ok


class WatchProcess:
    """Informers, the health server and the shutdown Event of one process. ``restarts`` is the owner's watch
    restart counter (label ``resource``); ``log`` is the owner's logger."""

    def __init__(self, api: KubeClient | Any, *, watch_timeout_s: float, restarts: Counter,
                 log: logging.Logger) -> None:
        self.api = api
        self.watch_timeout_s = watch_timeout_s
        self.shutdown = threading.Event()
        self.informers: list[Informer] = []
        self._restarts, self._log = restarts, log
        self._server: HealthServer | None = None

    # ------------------------------------------------------------------------------------------ parts
    def informer(self, path: str, name: str, handler: Handler, **kw: Any) -> Informer:
        """An informer on the collection at ``path`` (started by :meth:`start`); ``kw``: its selectors."""
        def restarted(why: str) -> None:
            self._restarts.labels(resource=name).inc()
            self._log.warning("watch of %s restarted: %s", name, why)

        inf = Informer(self.api, path, handler=handler, name=name, watch_timeout_s=self.watch_timeout_s,
                       on_restart=restarted, **kw)
        self.informers.append(inf)
        return inf

    def serve(self, address: str, port: int, *, registry: CollectorRegistry, checks: dict[str, dict[str, Check]],
              before_scrape: Callable[[], None] | None = None) -> HealthServer:
        """The one HTTP server (``/healthz /livez /readyz /metrics``); bound now, serving from :meth:`start`."""
        self._server = HealthServer(address, port, registry=registry, checks=checks, before_scrape=before_scrape)
        return self._server

    @property
    def server(self) -> HealthServer:
        if self._server is None:
            raise RuntimeError("serve() was not called")
        return self._server

    # ------------------------------------------------------------------------------------------ checks
    def unsynced(self) -> str | None:
        """A ``readyz`` check: which informers still wait for their initial list."""
        missing = [i.name for i in self.informers if not i.has_synced()]
        return f"not synced yet: {missing}" if missing else None

    def silent(self, max_age_s: float) -> list[str]:
        """The informers whose watch has not heard from the API server for ``max_age_s``."""
        return [i.name for i in self.informers if not i.healthy(max_age_s)]

    def unanswered(self, max_age_s: float) -> str | None:
        """A ``readyz`` check: the API server answers every watch (within ``max_age_s``)."""
        stale = self.silent(max_age_s)
        return f"no answer from the API server for {stale}" if stale else None

    # ------------------------------------------------------------------------------------------ run
    def start(self) -> None:
        """Serve HTTP and start every informer."""
        self.server.start()
        for inf in self.informers:
            inf.start()

    def wait_synced(self) -> bool:
        """Block until every informer has its initial list (True) or shutdown is set (False)."""
        while not self.shutdown.is_set():
            if all(i.wait_synced(1.0) for i in self.informers):
                return True
        return False

    def close(self) -> None:
        """Stop every informer and the HTTP server (after the owner's loops are stopped)."""
        for inf in self.informers:
            inf.stop()
        self.server.stop()

    def run(self, cancel: threading.Event, *, started: Callable[[], None], synced: Callable[[], None],
            stopping: Callable[[], None], sync_thread: str) -> int:
        """Run until ``cancel`` is set, in the order of the module docstring; returns the exit code (0)."""
        self.start()
        try:
            started()

            def after_sync() -> None:
                if self.wait_synced() and not self.shutdown.is_set():
                    synced()

            threading.Thread(target=after_sync, name=sync_thread, daemon=True).start()
            cancel.wait()
        finally:
            self.shutdown.set()
            stopping()
            self.close()
        return 0
