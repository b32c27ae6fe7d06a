"""The informer's reaction to each answer an API server can give, scripted by a loopback HTTP server.

The real kube-apiserver (tests/integration/test_informer.py) cannot be made to answer 429, 503, HTTP 410 or
a malformed watch line on demand; this loopback server answers a fixed script, one entry per request, and
records every request's query so the test can check where each watch resumed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client
from modelherd.agent.watching.informer import EventType, Informer

Reply = Callable[[BaseHTTPRequestHandler], None]


def _node(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": rv, "labels": {"rv": rv}}}


def _status(h: BaseHTTPRequestHandler, code: int, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                       "message": f"scripted {code}"}).encode()
    h.send_response(code)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def status(code: int, **headers: str) -> Reply:
    return lambda h: _status(h, code, {k.replace("_", "-"): v for k, v in headers.items()})


def node_list(rv: str, *items: dict[str, Any]) -> Reply:
    def reply(h: BaseHTTPRequestHandler) -> None:
        # core lists carry no kind/apiVersion per item; the informer fills them in
        body = json.dumps({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": rv},
                           "items": list(items)}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return reply


def stream(*lines: bytes, hold: threading.Event | None = None) -> Reply:
    """A chunked watch response: one chunk per line, then (after ``hold`` is set, if given) the end."""
    def reply(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for line in lines:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            h.wfile.flush()
        if hold is not None:
            hold.wait(30)
        h.wfile.write(b"0\r\n\r\n")
    return reply


def event(etype: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": etype, "object": obj}).encode() + b"\n"


class ScriptedServer:
    def __init__(self, script: list[Reply]) -> None:
        self.script = list(script)
        self.queries: list[dict[str, str]] = []
        self.times: list[float] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                outer.queries.append(q)
                outer.times.append(time.monotonic())
                outer.script.pop(0)(self) if outer.script else _status(self, 500)

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hold() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()


def test_each_server_answer_leads_to_the_right_recovery_and_events(hold: threading.Event) -> None:
    a5, b6, a11 = _node("a", "5"), _node("b", "6"), _node("a", "11")
    server = ScriptedServer([
        status(429, Retry_After="1"),                                   # 1 list: throttled, wait >= 1 s
        node_list("10", a5, b6),                                        # 2 list: ADDED a, b
        stream(event("MODIFIED", {**a11, "kind": "Node", "apiVersion": "v1"}),  # 3 watch from 10
               event("BOOKMARK", {"kind": "Node", "metadata": {"resourceVersion": "12"}})),
        stream(event("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"})),  # 4 watch from 12
        node_list("20", a11),                                           # 5 relist: b synthesized DELETED
        status(503),                                                    # 6 watch from 20: server error
        stream(b"this is not json\n"),                                  # 7 watch from 20: protocol
        status(410),                                                    # 8 watch from 20: HTTP 410
        node_list("30", a11),                                           # 9 relist: nothing changed
        stream(hold=hold),                                              # 10 watch from 30: stays open
    ])
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{server.port}"
    api = client.ApiClient(cfg)
    events: list[tuple[EventType, str, dict[str, Any], dict[str, Any] | None]] = []
    reasons: list[str] = []
    inf = Informer(api, "/api/v1/nodes", handler=lambda t, o, p: events.append((t, o["metadata"]["name"], o, p)),
                   name="node", field_selector="metadata.name=a", watch_timeout_s=5, backoff_max_s=0.2,
                   on_restart=reasons.append)
    inf.start()
    try:
        deadline = time.monotonic() + 20
        while len(server.queries) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert len(server.queries) == 10 == inf.requests
        assert reasons == ["throttled", "gone", "server_error", "protocol", "gone"]
        assert inf.restarts == 5
        assert server.times[1] - server.times[0] >= 0.95  # Retry-After: 1 respected (backoff cap is 0.2 s)

        lists, watches = [q for q in server.queries if "watch" not in q], [q for q in server.queries if "watch" in q]
        assert len(lists) == 4 and all(q["limit"] == "500" and "resourceVersion" not in q for q in lists)
        assert [q["resourceVersion"] for q in watches] == ["10", "12", "20", "20", "20", "30"]  # bookmark: 12
        assert all(q["allowWatchBookmarks"] == "true" and 5 <= int(q["timeoutSeconds"]) < 10 for q in watches)
        assert all(q["fieldSelector"] == "metadata.name=a" for q in server.queries)

        assert [(t, n) for t, n, _, _ in events] == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"),
                                                     ("DELETED", "b")]
        _, _, obj, prev = events[2]
        assert obj["metadata"]["resourceVersion"] == "11" and prev is not None and prev["metadata"]["labels"] == {
            "rv": "5"}
        _, _, obj, prev = events[3]
        assert prev is obj and obj["metadata"]["resourceVersion"] == "6"  # the last state the store held
        assert inf.resource_version == "30" and inf.has_synced()
        assert [o["metadata"]["name"] for o in inf.list()] == ["a"]
        assert inf.get("a") == {**a11, "kind": "Node", "apiVersion": "v1"}
        assert inf.healthy(max_age_s=0.0)  # the open watch is within its deadline

        t0 = time.monotonic()
        inf.stop()
        assert time.monotonic() - t0 < 1.0
    finally:
        inf.stop()
        api.close()
        server.close()
