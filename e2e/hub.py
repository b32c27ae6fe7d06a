"""The e2e Hub stand-in: serves every repo found under ROOT/<org>/<name> (rescanned each second).

    python -m e2e.hub --root DIR/hub-root --port P --cdn-port Q

It is tests/hubserver.py's ``HubServer`` on 127.0.0.1 (``GET /_stats`` -> ``{"body_bytes": N, ...}``); the
cluster relays those two ports to every node's loopback, so pods use ``HUB_URL=http://127.0.0.1:P``.
Invariant: a repo folder is (re)registered as a new commit whenever the (path, size, mtime) of its files changes;
write a model elsewhere and rename it into ROOT so a half-written folder is never served.

Faults, for tests outside this process: ``ROOT/_control.json`` (re-read each second, written by rename) holds
``{"throttle_bytes_per_s": N}`` (every file body sent at most N bytes/s per response; 0 or absent: full speed);
``GET /_stats`` says which control is in force (``"control"``), so a test can wait until it applies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tests.hubserver import HubServer


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file()))


class RootHub(HubServer):
    """A HubServer whose repos are the folders ``root/<org>/<name>``; ``/_stats`` also says ``body_bytes``."""

    def __init__(self, root: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.root = root
        self._seen: dict[str, tuple[tuple[str, int, int], ...]] = {}
        self._control: dict[str, Any] = {}

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["body_bytes"] = s["bytes_served"]
        s["control"] = self._control
        return s

    def apply_control(self) -> None:
        try:
            want = json.loads((self.root / "_control.json").read_text())
        except FileNotFoundError:
            want = {}
        except ValueError as e:
            print(f"hub: ignoring a malformed _control.json: {e}", file=sys.stderr, flush=True)
            return
        if want == self._control:
            return
        self.clear_faults()
        bps = float(want.get("throttle_bytes_per_s") or 0)
        if bps > 0:
            self.throttle("resolve", bytes_per_s=bps)
            self.throttle("cdn", bytes_per_s=bps)
        self._control = want
        print(f"hub: control {want}", file=sys.stderr, flush=True)

    def rescan(self) -> None:
        for org in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for repo in sorted(p for p in org.iterdir() if p.is_dir()):
                rid = f"{org.name}/{repo.name}"
                sig = _signature(repo)
                if sig and self._seen.get(rid) != sig:
                    self.add_repo(rid, repo)
                    self._seen[rid] = sig
                    print(f"hub: serving {rid} ({len(sig)} files)", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m e2e.hub")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cdn-port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on (loopback; kind: its gateway)")
    ap.add_argument("--pid-file", type=Path, default=None, help="write this process's id here")
    a = ap.parse_args()
    if a.pid_file is not None:
        a.pid_file.write_text(f"{os.getpid()}\n")
    a.root.mkdir(parents=True, exist_ok=True)
    hub = RootHub(a.root, port=a.port, cdn_port=a.cdn_port, host=a.host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hub.rescan()
    hub.apply_control()
    hub.start()
    print(json.dumps({"endpoint": hub.endpoint, "cdn": hub.cdn_base}), flush=True)
    while not stop.wait(1.0):
        try:
            hub.rescan()
            hub.apply_control()
        except OSError as e:  # a folder renamed away mid-scan: next round
            print(f"hub: rescan: {e}", file=sys.stderr, flush=True)
    hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
