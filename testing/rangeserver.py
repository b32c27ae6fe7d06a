"""A loopback HTTP file server that honours ``Range`` (with fault injection), and a ``Source`` over it.

Used by the engine tests until the HF/OCI sources land. The server binds 127.0.0.1 only. Faults are queued
per file name and consumed one per request: ``Fault(status=429, retry_after=1)``, ``Fault(status=500)``,
``Fault(truncate_after=N)`` (close the connection after N body bytes), ``Fault(corrupt=True)`` (flip the
first byte of the body). ``rate`` throttles every body to about that many bytes per second.

Run ``python -m modelherd.testing.rangeserver pull SPEC.json`` to pull in a separate process (resume/RSS tests).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import urllib3

from ..storage.errors import (
    AuthError,
    RateLimitedError,
    SourceError,
    SourceNotFoundError,
    TransientSourceError,
)
from ..storage.retry import parse_retry_after
from ..storage.types import Listing, RemoteFile

__all__ = ["Fault", "RangeServer", "RangeSource", "files_to_json", "main", "make_model"]

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    status: int = 0
    retry_after: float | None = None
    truncate_after: int | None = None
    corrupt: bool = False


class RangeServer:
    """Serves the files of ``root`` at ``/files/<relpath>``; counts requests and body bytes sent."""

    def __init__(self, root: Path, *, rate: float | None = None) -> None:
        self.root = Path(root)
        self.rate = rate
        self.faults: dict[str, list[Fault]] = defaultdict(list)
        self.requests: list[tuple[str, str]] = []
        self.bytes_sent = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stall between headers and body

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_fault(self, name: str, *faults: Fault) -> None:
        with self._lock:
            self.faults[name].extend(faults)

    def reset(self) -> None:
        """Forget pending faults, recorded requests and the byte count (between two pulls of one test)."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.bytes_sent = 0

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.removeprefix("/files/")
        rng = h.headers.get("Range", "")
        with self._lock:
            self.requests.append((name, rng))
            fault = self.faults[name].pop(0) if self.faults.get(name) else Fault()
        path = self.root / name
        if not path.is_file():
            self._reply(h, 404)
            return
        if fault.status:
            extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            self._reply(h, fault.status, extra)
            return
        size = path.stat().st_size
        start, end = 0, size
        m = _RANGE.match(rng)
        if m:
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
        length = max(0, end - start)
        h.send_response(206 if m else 200)
        h.send_header("Content-Length", str(length))
        if m:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        h.end_headers()
        budget = length if fault.truncate_after is None else min(length, fault.truncate_after)
        chunk = 64 * 1024 if self.rate else 1024 * 1024
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            began = time.monotonic()
            while sent < budget:
                data = f.read(min(chunk, budget - sent))
                if not data:
                    break
                if fault.corrupt and sent == 0:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                # counted before it is sent: a client that has read the whole body always finds it counted
                with self._lock:
                    self.bytes_sent += len(data)
                try:
                    h.wfile.write(data)
                except OSError:
                    with self._lock:
                        self.bytes_sent -= len(data)  # it never left
                    return
                sent += len(data)
                if self.rate:
                    ahead = sent / self.rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        if sent < length:
            h.close_connection = True
            h.wfile.flush()
            h.connection.shutdown(2)

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()


class _Body:
    """Reads straight into the caller's buffer through http.client (no intermediate copies)."""

    def __init__(self, resp: urllib3.BaseHTTPResponse) -> None:
        self._resp = resp
        self._fp: http.client.HTTPResponse = resp._fp  # type: ignore[attr-defined]

    def readinto(self, buf: memoryview) -> int:
        try:
            return self._fp.readinto(buf)
        except (OSError, http.client.HTTPException) as e:
            raise TransientSourceError(f"body read failed: {type(e).__name__}") from None

    def close(self) -> None:
        if self._fp.isclosed():
            self._resp.release_conn()
        else:
            self._resp.close()
            self._resp.release_conn()


class _Empty:
    def readinto(self, buf: memoryview) -> int:
        return 0

    def close(self) -> None:
        pass


class RangeSource:
    """A ``Source`` over a :class:`RangeServer` (or any static server, e.g. nginx) for a fixed file list."""

    def __init__(self, base_url: str, files: list[RemoteFile], *, uri: str = "test://model", revision: str = "r1",
                 pool_maxsize: int = 32) -> None:
        self.uri = uri
        self.base_url = base_url.rstrip("/")
        self._listing = Listing(uri=uri, revision=revision, files=tuple(files))
        self._pool = urllib3.PoolManager(maxsize=pool_maxsize, retries=False, block=False,
                                         timeout=urllib3.Timeout(connect=5, read=30))

    def list_files(self) -> Listing:
        return self._listing

    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> _Body | _Empty:
        end = file.size if end is None else end
        if end <= start:
            return _Empty()
        url = f"{self.base_url}/files/{file.locator or file.path}"
        try:
            resp = self._pool.request("GET", url, headers={"Range": f"bytes={start}-{end - 1}"},
                                      preload_content=False, decode_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise TransientSourceError(f"GET {file.path} failed: {type(e).__name__}") from None
        if resp.status == 206:
            return _Body(resp)
        resp.drain_conn()
        resp.release_conn()
        what = f"GET {file.path} [{start}, {end}): HTTP {resp.status}"
        if resp.status == 404:
            raise SourceNotFoundError(what, hint="the file is gone from the origin")
        if resp.status in (401, 403):
            raise AuthError(what, hint="check the credentials")
        if resp.status in (429, 503):
            raise RateLimitedError(what, retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        if resp.status >= 500:
            raise TransientSourceError(what)
        raise SourceError(what, hint="the origin answered a range request without a range")

    def close(self) -> None:
        self._pool.clear()


def make_model(root: Path, sizes: dict[str, int], seed: int = 0) -> list[RemoteFile]:
    """Write seeded random files under ``root`` and return them as ``RemoteFile`` with their sha256.

    Deterministic: the same ``sizes`` and ``seed`` write the same bytes (:func:`.models.random_chunks`).
    """
    from .models import random_chunks

    files = []
    for i, (name, size) in enumerate(sizes.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            for block in random_chunks(size, seed=(seed, i)):
                f.write(block)
                h.update(block)
        files.append(RemoteFile(path=name, size=size, checksums={"sha256": h.hexdigest()}))
    return files


def files_to_json(files: list[RemoteFile]) -> list[dict[str, Any]]:
    return [{"path": f.path, "size": f.size, "checksums": f.checksums} for f in files]


def _pull_main(spec_path: str) -> int:
    import logging

    from modelherd.storage import engine
    from modelherd.storage.options import EngineOptions
    from modelherd.storage.retry import RetryPolicy

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec = json.loads(Path(spec_path).read_text())
    files = [RemoteFile(path=f["path"], size=f["size"], checksums=f["checksums"]) for f in spec["files"]]
    opts = dict(spec.get("options", {}))
    if "retry" in opts:
        opts["retry"] = RetryPolicy(**opts["retry"])
    source = RangeSource(spec["url"], files)
    progress_file = spec.get("progress_file")

    def progress(done: int, total: int) -> None:
        if progress_file:
            Path(progress_file).write_text(f"{done} {total}")

    try:
        engine.pull(source, Path(spec["dest"]), models_root=Path(spec["models_root"]), writer=spec["writer"],
                    options=EngineOptions(**opts), progress=progress)
    finally:
        source.close()
    if spec.get("rss_file"):
        import resource

        Path(spec["rss_file"]).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``pull SPEC.json``: one engine pull from a spec file (resume/RSS tests run it as a separate process)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "pull":
        return _pull_main(args[1])
    print("usage: python -m modelherd.testing.rangeserver pull SPEC.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
