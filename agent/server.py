"""The one HTTP server of a long-running process (the node agent, the status controller): ``/healthz``,
``/livez``, ``/readyz`` (k8s.io/apiserver healthz style, as OME's agent answers) and ``/metrics`` (Prometheus text
format from the process's registry).

Invariant: a failed check's reason is logged, never served (the body says only which check failed). Bound when
built, serving once started (agent/process.py), never at import.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

# a check answers None when healthy, else the reason (logged; the body withholds it, like k8s.io/apiserver)
Check = Callable[[], str | None]


class HealthServer:
    def __init__(self, address: str, port: int, *, registry: CollectorRegistry,
                 checks: dict[str, dict[str, Check]], before_scrape: Callable[[], None] | None = None) -> None:
        self.registry, self.checks, self.before_scrape = registry, checks, before_scrape
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

            def do_GET(self) -> None:
                status, ctype, body = server.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="modelherd-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, raw_path: str) -> tuple[int, str, bytes]:
        path = raw_path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/metrics":
            if self.before_scrape is not None:
                self.before_scrape()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        group, _, single = path.lstrip("/").partition("/")
        checks = self.checks.get(group)
        if checks is None:
            return 404, "text/plain; charset=utf-8", b"404 page not found\n"
        if single:
            if single not in checks:
                return 404, "text/plain; charset=utf-8", b"404 page not found\n"
            checks = {single: checks[single]}
        failed: list[str] = []
        lines = []
        for name, check in checks.items():
            try:
                why = check()
            except Exception as e:  # a broken check is a failed check
                why = f"{type(e).__name__}: {e}"
            if why is None:
                lines.append(f"[+]{name} ok")
            else:
                failed.append(name)
                lines.append(f"[-]{name} failed: reason withheld")
                log.warning("%s check %s failed: %s", group, name, why)
        if not failed:
            return 200, "text/plain; charset=utf-8", b"ok"
        body = "\n".join(lines) + f"\n{group} check failed\n"
        return 500, "text/plain; charset=utf-8", body.encode()
