"""List + watch informers: a local mirror of one Kubernetes collection, kept current without polling.

One :class:`Informer` per collection (BaseModels in all namespaces, ClusterBaseModels, this node's Node,
this node's ConfigMap). It behaves like client-go's reflector feeding a plain store (no DeltaFIFO):

1. **LIST** the collection, paged (``limit=500`` + ``continue``), and *replace* the store. Every difference
   against the previous store contents is delivered to the handler: ``ADDED`` for new keys, ``MODIFIED`` for
   keys whose ``resourceVersion`` changed, ``DELETED`` for keys that are gone -- so a relist after a 410 or a
   lost connection reports the deletions the informer could not see.
2. **WATCH** from the list's ``resourceVersion`` with ``allowWatchBookmarks=true`` and ``timeoutSeconds``
   drawn from ``[watch_timeout_s, 2*watch_timeout_s)`` (32 agents must not reconnect in lockstep).
3. A watch the server ends cleanly at its timeout is re-opened from the last ``resourceVersion`` -- one
   request, no relist. ``BOOKMARK`` events only advance the ``resourceVersion``.
4. ``410 Gone`` (an ``ERROR`` event or the HTTP status) means the ``resourceVersion`` is too old: relist.
   Any other failure (connection refused/reset, TLS, 5xx, 429, a malformed line, a watch that ends at once)
   waits a jittered exponential backoff capped at ``backoff_max_s`` (429's ``Retry-After`` respected), then
   re-watches from the last ``resourceVersion`` -- the server answers 410 if that is too old, and the
   informer relists. Each such recovery counts in :attr:`Informer.restarts` and calls ``on_restart(reason)``
   with a reason from :data:`RESTART_REASONS`.

Invariants:
- Requests go through :meth:`Informer._open` only, which sends them through the agent's Kubernetes access layer
  (:func:`modelherd.agent.kube.watch.open_stream`: the agent's one client and pool, ``retries=False``, so one
  attempt is one request); each increments :attr:`Informer.requests` (what the idle budget counts at the API
  server). The streamed newline-delimited JSON is parsed here (not ``kubernetes.watch.Watch``, which builds model
  objects and hides 410). There is no polling: when idle, an informer makes one request per watch timeout.
- The store is changed before the handler hears of the change, so ``get()``/``list()`` inside a handler
  already reflect the event. Objects are raw JSON dicts (camelCase, as the API server sends them), shared
  between the store and the handler: **treat them as read-only**.
- The handler runs on the informer's thread and must not block (the agent's handlers only enqueue): a slow
  handler delays every later event of this collection. An exception in the handler is logged and the
  informer carries on.
- Objects are delivered as the server sends them; like client-go, a MODIFIED event whose resourceVersion is
  not newer than the stored one is *not* filtered out (resourceVersions are opaque strings). A relist does
  not report objects whose resourceVersion did not change.
- Nothing here logs a token: log lines carry the informer name, the path, statuses and reasons only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, NoReturn

import urllib3.exceptions

from ...storage.errors import ConfigError
from ..kube import ApiError, KubeClient, watch
from ..kube.client import transport

__all__ = ["RESTART_REASONS", "EventType", "Handler", "Informer"]

log = logging.getLogger(__name__)

EventType = Literal["ADDED", "MODIFIED", "DELETED"]
#: ``handler(type, object, previous)``: ``object`` is the new state (for DELETED: the last state known),
#: ``previous`` the object the store held under that key before, or ``None``.
Handler = Callable[[EventType, dict[str, Any], dict[str, Any] | None], None]
# ``Informer.list`` shadows the builtin inside the class body: these aliases are spelled outside it.
_Objects = list[dict[str, Any]]
_Query = list[tuple[str, str]]

#: The reasons passed to ``on_restart`` (a small fixed set, fit for a metrics label).
RESTART_REASONS = (
    "gone",          # 410: the resourceVersion is too old -> relist
    "connection",    # refused, reset, TLS failure, read timeout, stream cut short
    "throttled",     # 429
    "server_error",  # 5xx
    "client_error",  # other 4xx (401/403: RBAC or token; 404: CRD not installed)
    "watch_error",   # an ERROR event other than 410
    "protocol",      # a line that is not a JSON watch event, a list without resourceVersion
    "short_watch",   # the server ended a watch at once, with no event
)

_PAGE_SIZE = 500
_CONNECT_TIMEOUT_S = 10.0
_LIST_READ_TIMEOUT_S = 60.0
#: A watch whose server-side timeout has passed is dead if nothing arrives for this much longer.
_WATCH_READ_GRACE_S = 30.0
_BACKOFF_BASE_S = 0.5


class _Gone(Exception):
    """The server said 410: our resourceVersion (or continue token) is too old."""


class _Failure(Exception):
    """A recoverable failure; ``reason`` is one of :data:`RESTART_REASONS`."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class _Stopped(Exception):
    """stop() was called while a request was in flight."""


def object_key(obj: dict[str, Any]) -> str:
    """``namespace/name`` for a namespaced object, ``name`` for a cluster-scoped one (client-go's key)."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    namespace = meta.get("namespace")
    return f"{namespace}/{name}" if namespace else name


def _rv(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _status_reason(status: int) -> str:
    if status == 429:
        return "throttled"
    if status >= 500:
        return "server_error"
    return "client_error"


class Informer:
    """A mirror of the collection at ``path`` (e.g. ``/apis/ome.io/v1beta1/basemodels``), kept by list + watch.

    ``path`` is the collection's URL path: ``/apis/ome.io/v1beta1/basemodels`` (all namespaces),
    ``/apis/ome.io/v1beta1/clusterbasemodels``, ``/api/v1/nodes``, ``/api/v1/namespaces/ome/configmaps``.
    ``field_selector``/``label_selector`` narrow both the list and the watch (``metadata.name=<node>``).
    """

    def __init__(
        self,
        api_client: KubeClient | Any,
        path: str,
        *,
        handler: Handler,
        name: str,
        field_selector: str | None = None,
        label_selector: str | None = None,
        watch_timeout_s: float = 300.0,
        backoff_max_s: float = 30.0,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        if not path.startswith("/"):
            raise ConfigError(f"informer {name}: path {path!r} is not a URL path",
                              hint="pass the collection path, e.g. /apis/ome.io/v1beta1/basemodels")
        if watch_timeout_s < 1:
            raise ConfigError(f"informer {name}: watch_timeout_s={watch_timeout_s} is below 1 s",
                              hint="the API server takes whole seconds; use >= 1 (300 in production)")
        if backoff_max_s <= 0:
            raise ConfigError(f"informer {name}: backoff_max_s={backoff_max_s} must be positive")
        self._api: KubeClient = transport(api_client)
        self.path = path
        self.name = name
        self._handler = handler
        self._field_selector = field_selector
        self._label_selector = label_selector
        self.watch_timeout_s = float(watch_timeout_s)
        self.backoff_max_s = float(backoff_max_s)
        self._on_restart = on_restart

        #: Watch restarts (every recovery from a failure or a 410), not the clean re-watches after a timeout.
        self.restarts = 0
        #: The resourceVersion the next watch starts from ("" before the first list).
        self.resource_version = ""
        #: List pages and watch requests made (attempts, including those that failed).
        self.requests = 0

        self._store: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # guards _store, resource_version
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp_lock = threading.Lock()  # guards _resp
        self._resp: urllib3.BaseHTTPResponse | None = None
        self._heartbeat = 0.0
        self._watch_deadline = 0.0  # monotonic time by which an open watch must have said something

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        """Start the list/watch loop on a daemon thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"informer {self.name} was already started")
        self._heartbeat = time.monotonic()  # liveness is measured from the start, not from 0
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop promptly: cut the open response (a blocked read returns at once) and join the thread.

        No handler call starts after this returns. A request still connecting cannot be cut; then the
        join gives up after a few seconds and the daemon thread ends on its own when the connect times out.
        """
        self._stopping.set()
        self._cut_response()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
            if thread.is_alive():
                log.warning("informer %s: thread still busy in a request after stop()", self.name)

    def wait_synced(self, timeout: float) -> bool:
        """Block until the first list has been delivered to the handler, at most ``timeout`` seconds."""
        return self._synced.wait(timeout)

    def has_synced(self) -> bool:
        """True once the first list replaced the store and every resulting event reached the handler."""
        return self._synced.is_set()

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored object under ``namespace/name`` (or ``name`` when cluster-scoped); read-only."""
        with self._lock:
            return self._store.get(key)

    def list(self) -> _Objects:
        """Every stored object (a new list of the shared, read-only objects)."""
        with self._lock:
            return [*self._store.values()]

    def last_heartbeat(self) -> float:
        """``time.monotonic()`` of the last successful list or watch read (a watch opened, an event, a
        bookmark, a clean timeout); the time of :meth:`start` until then."""
        return self._heartbeat

    def healthy(self, max_age_s: float) -> bool:
        """True while the loop runs and is in touch with the API server.

        In touch: a successful read within ``max_age_s``, or a watch open whose server-side timeout (plus a
        grace for the server to close it) has not passed -- a quiet watch is healthy. False after stop(),
        and after ``max_age_s`` of failed attempts while the server is unreachable.
        """
        thread = self._thread
        if thread is None or not thread.is_alive() or self._stopping.is_set():
            return False
        now = time.monotonic()
        return now - self._heartbeat <= max_age_s or now < self._watch_deadline

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        """Invariant: the store is (re)built by a list before any watch, and every watch starts from the
        resourceVersion of the last list, event or bookmark."""
        need_list = True
        failures = 0  # consecutive; reset by a watch that worked
        while not self._stopping.is_set():
            try:
                if need_list:
                    self._list_and_replace()
                    need_list = False
                self._watch_once()
                failures = 0
                continue
            except _Stopped:
                break
            except _Gone:
                need_list = True
                failures += 1
                self._restarted("gone", "resourceVersion too old; relisting")
                delay = 0.0 if failures == 1 else self._backoff(failures - 1, None)  # a 410 loop backs off
            except _Failure as e:
                failures += 1
                self._restarted(e.reason, e.detail)
                delay = self._backoff(failures, e.retry_after)
            except Exception as e:  # a bug must not end the watch for good
                failures += 1
                log.exception("informer %s: unexpected error", self.name)
                self._restarted("protocol", type(e).__name__)
                delay = self._backoff(failures, None)
            if delay > 0:
                self._stopping.wait(delay)
        self._cut_response()

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        """Equal-jitter exponential backoff: in [d/2, d) with d = min(cap, 0.5 s * 2^(failures-1))."""
        d = min(self.backoff_max_s, _BACKOFF_BASE_S * 2.0 ** min(failures - 1, 30))
        delay = d / 2 + random.uniform(0, d / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(self.backoff_max_s, 60.0)))
        return delay

    def _restarted(self, reason: str, detail: str) -> None:
        self.restarts += 1
        log.info("informer %s (%s): restarting after %s (%s)", self.name, self.path, reason, detail)
        if self._on_restart is not None:
            try:
                self._on_restart(reason)
            except Exception:
                log.exception("informer %s: on_restart callback failed", self.name)

    def _deliver(self, etype: EventType, obj: dict[str, Any], prev: dict[str, Any] | None) -> None:
        if self._stopping.is_set():
            raise _Stopped
        try:
            self._handler(etype, obj, prev)
        except Exception:
            log.exception("informer %s: handler failed on %s %s", self.name, etype, object_key(obj))

    def _beat(self) -> None:
        self._heartbeat = time.monotonic()

    # ------------------------------------------------------------------ requests
    def _selectors(self) -> _Query:
        q: _Query = []
        if self._field_selector:
            q.append(("fieldSelector", self._field_selector))
        if self._label_selector:
            q.append(("labelSelector", self._label_selector))
        return q

    def _open(self, query: _Query, read_timeout_s: float) -> urllib3.BaseHTTPResponse:
        """One GET of ``path`` with ``query``; returns the open 200 response (registered so stop() can cut it).

        Raises _Gone for 410, _Failure for anything else that went wrong, _Stopped when stopping.
        """
        if self._stopping.is_set():
            raise _Stopped
        self.requests += 1
        try:
            resp = watch.open_stream(self._api, self.path, query, connect_timeout_s=_CONNECT_TIMEOUT_S,
                                     read_timeout_s=read_timeout_s)
        except ApiError as e:
            self._fail_status(e)
        with self._resp_lock:
            self._resp = resp
        if self._stopping.is_set():  # stop() ran before the response was registered
            self._cut_response()
            raise _Stopped
        return resp

    def _fail_status(self, error: ApiError) -> NoReturn:
        """Raise what a failed request means to the loop (the answer was already read and released)."""
        status = error.status
        if status == 0:  # refused, reset, TLS, timeouts
            raise _Failure("connection", error.reason)
        message = str(error.body.get("message", ""))[:300]
        if status == 410:
            raise _Gone
        if status in (401, 403):
            log.warning("informer %s: %s answered %s (%s); grant the agent's ServiceAccount list and watch on it",
                        self.name, self.path, status, message)
        elif status == 404:
            log.warning("informer %s: %s answered 404 (%s); is the CRD installed?", self.name, self.path, message)
        raise _Failure(_status_reason(status), f"HTTP {status} {message}".strip(), error.retry_after)

    def _cut_response(self) -> None:
        with self._resp_lock:
            resp, self._resp = self._resp, None
        if resp is None:
            return
        with contextlib.suppress(Exception):  # already released or closed: nothing left to cut
            resp.shutdown()
        with contextlib.suppress(Exception):
            resp.close()

    def _release(self, resp: urllib3.BaseHTTPResponse, *, reuse: bool) -> None:
        with self._resp_lock:
            if self._resp is resp:
                self._resp = None
        with contextlib.suppress(Exception):
            if reuse:
                resp.release_conn()  # a fully read response: keep the TLS connection for the next request
            else:
                resp.close()

    # ------------------------------------------------------------------ list
    def _list_and_replace(self) -> None:
        """LIST every page, then swap the store and deliver the differences (then mark synced)."""
        items, rv = self._list_all()
        fresh = {object_key(o): o for o in items}
        with self._lock:
            old, self._store = self._store, fresh
            self.resource_version = rv
        self._beat()
        for key, obj in fresh.items():
            prev = old.get(key)
            if prev is None:
                self._deliver("ADDED", obj, None)
            elif _rv(prev) != _rv(obj):
                self._deliver("MODIFIED", obj, prev)
        for key, prev in old.items():
            if key not in fresh:
                self._deliver("DELETED", prev, prev)
        self._synced.set()

    def _list_all(self) -> tuple[_Objects, str]:
        """Every item, paged; an expired continue token falls back to one unpaged list (as client-go)."""
        try:
            return self._list_pages(_PAGE_SIZE)
        except _Gone:
            log.info("informer %s: continue token expired; listing without pages", self.name)
            return self._list_pages(0)

    def _list_pages(self, limit: int) -> tuple[_Objects, str]:
        items: _Objects = []
        cont = ""
        while True:
            query = self._selectors()
            if limit:
                query.append(("limit", str(limit)))
            if cont:
                query.append(("continue", cont))
            page = self._read_json(self._open(query, _LIST_READ_TIMEOUT_S))
            kind = str(page.get("kind") or "")
            api_version = page.get("apiVersion")
            for item in page.get("items") or []:
                if not isinstance(item, dict):
                    raise _Failure("protocol", "a list item is not an object")
                # core lists omit each item's kind/apiVersion; custom resources carry them. Make them alike.
                if "kind" not in item and kind.endswith("List"):
                    item["kind"] = kind[: -len("List")]
                if "apiVersion" not in item and api_version:
                    item["apiVersion"] = api_version
                items.append(item)
            meta = page.get("metadata") or {}
            cont = str(meta.get("continue") or "")
            if not cont:
                rv = str(meta.get("resourceVersion") or "")
                if not rv:
                    raise _Failure("protocol", "the list has no resourceVersion")
                return items, rv

    def _read_json(self, resp: urllib3.BaseHTTPResponse) -> dict[str, Any]:
        try:
            data = resp.read()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            self._release(resp, reuse=False)
            if self._stopping.is_set():
                raise _Stopped from None
            raise _Failure("connection", type(e).__name__) from None
        self._release(resp, reuse=True)
        try:
            body = json.loads(data)
        except ValueError:
            raise _Failure("protocol", "the list is not JSON") from None
        if not isinstance(body, dict):
            raise _Failure("protocol", "the list is not a JSON object")
        return body

    # ------------------------------------------------------------------ watch
    def _watch_once(self) -> None:
        """One watch from ``resource_version`` until the server ends it; returns on a clean end.

        A clean end (the server's timeout) is normal: the caller re-watches from the last resourceVersion.
        """
        timeout_s = max(1, int(self.watch_timeout_s * (1.0 + random.random())))
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", self.resource_version),
            ("timeoutSeconds", str(timeout_s)),
            *self._selectors(),
        ]
        opened = time.monotonic()
        resp = self._open(query, timeout_s + _WATCH_READ_GRACE_S)
        self._watch_deadline = opened + timeout_s + _WATCH_READ_GRACE_S
        self._beat()
        events = 0
        clean = False
        try:
            for line in self._lines(resp):
                events += 1
                self._handle_line(line)
            clean = True
        finally:
            self._watch_deadline = 0.0
            self._release(resp, reuse=clean)
        if events == 0 and time.monotonic() - opened < min(1.0, timeout_s / 2):
            raise _Failure("short_watch", "the server ended the watch at once")
        self._beat()

    def _lines(self, resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        """The newline-delimited JSON lines of a streamed response, as they arrive."""
        try:
            yield from watch.lines(resp)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            if self._stopping.is_set():
                raise _Stopped from None
            raise _Failure("connection", f"watch stream broke: {type(e).__name__}") from None
        if self._stopping.is_set():
            raise _Stopped

    def _handle_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            etype = event["type"]
            obj = event["object"]
        except (ValueError, KeyError, TypeError):
            raise _Failure("protocol", "a watch line is not a JSON event") from None
        if not isinstance(obj, dict):
            raise _Failure("protocol", "a watch event's object is not a JSON object")
        if etype == "BOOKMARK":
            rv = _rv(obj)
            if rv:
                with self._lock:
                    self.resource_version = rv
            self._beat()
            return
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone
            raise _Failure("watch_error", f"ERROR event {code} {obj.get('reason', '')}".strip())
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            raise _Failure("protocol", f"unknown watch event type {etype!r}")
        key = object_key(obj)
        with self._lock:
            prev = self._store.get(key)
            if etype == "DELETED":
                self._store.pop(key, None)
            else:
                self._store[key] = obj
            rv = _rv(obj)
            if rv:
                self.resource_version = rv
        self._beat()
        # as client-go: ADDED for a key we hold is an update; MODIFIED for one we do not is an add
        delivered: EventType = "DELETED" if etype == "DELETED" else "MODIFIED" if prev is not None else "ADDED"
        self._deliver(delivered, obj, prev)
