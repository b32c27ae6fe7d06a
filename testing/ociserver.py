"""A real loopback OCI Object Storage: the part of the REST API the ``oci`` SDK and oci-cli use to read.

Speaks HTTP/1.1 (keep-alive) on 127.0.0.1 only. Endpoints:
``GET /n/`` (namespace), ``GET|HEAD /n/{ns}/b/{bucket}`` (bucket), ``GET /n/{ns}/b/{bucket}/o`` (list,
paginated), ``GET|HEAD /n/{ns}/b/{bucket}/o/{object}`` (with ``Range`` and ``If-Match``).
An ``authorization`` header is required (401 otherwise); the signature is not checked.

Faults are injected per object name (:class:`Faults`); counters (requests, file-body bytes) are thread-safe.

Standalone: ``python -m modelherd.testing.ociserver --bucket ns/bucket=/folder[:prefix] --port 0`` prints its URL and
serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import google_crc32c

from .support import parse_range

__all__ = ["CHUNK", "Faults", "OCIObjectServer", "StoredObject", "main"]

CHUNK = 1024 * 1024


@dataclass
class Faults:
    """What goes wrong for one object. Counts are consumed by GET/HEAD of the object, in order listed."""

    status_401: int = 0  # the next N requests answer 401 NotAuthenticated (a rejected signature)
    status_429: int = 0  # the next N requests answer 429
    retry_after: float | str | None = None  # ... with this Retry-After (seconds, or any string sent verbatim)
    status_5xx: int = 0  # the next N requests answer ``code_5xx``
    code_5xx: int = 503
    truncate: int = 0  # the next N bodies stop after ``truncate_at`` of their length, then the connection closes
    truncate_at: float = 0.5
    corrupt: int = 0  # the next N bodies have their first byte flipped (same length)
    rate_bps: int | None = None  # every body is served at about this many bytes per second
    redirect_to: str | None = None  # every GET/HEAD answers 302 with this Location (any URL, any scheme)


@dataclass
class StoredObject:
    name: str
    size: int
    md5_b64: str  # single-part md5 or the multipart "<b64>-<parts>"
    multipart: bool
    crc32c_b64: str
    etag: str
    time_created: str
    data: bytes | None = None
    path: Path | None = None

    def read(self, start: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[start:start + length]
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(length)


def _digests(chunks: Any, part_size: int | None) -> tuple[str, bool, str, int]:
    """(md5 or multipart md5 b64, multipart?, crc32c b64, size) from an iterable of bytes chunks."""
    whole = hashlib.md5(usedforsecurity=False)
    crc = 0
    size = 0
    part_md5s: list[bytes] = []
    part = hashlib.md5(usedforsecurity=False)
    in_part = 0
    for chunk in chunks:
        whole.update(chunk)
        crc = int(google_crc32c.extend(crc, chunk))
        size += len(chunk)
        if part_size:
            view = memoryview(chunk)
            while len(view):
                take = min(len(view), part_size - in_part)
                part.update(view[:take])
                in_part += take
                view = view[take:]
                if in_part == part_size:
                    part_md5s.append(part.digest())
                    part, in_part = hashlib.md5(usedforsecurity=False), 0
    crc_b64 = base64.b64encode(crc.to_bytes(4, "big")).decode()
    if part_size and size > part_size:
        if in_part:
            part_md5s.append(part.digest())
        mp = hashlib.md5(b"".join(part_md5s), usedforsecurity=False).digest()
        return f"{base64.b64encode(mp).decode()}-{len(part_md5s)}", True, crc_b64, size
    return base64.b64encode(whole.digest()).decode(), False, crc_b64, size


def _file_chunks(path: Path) -> Any:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


class OCIObjectServer:
    """In-process Object Storage. ``url`` is the endpoint to hand to the SDK (``service_endpoint``)."""

    def __init__(self, *, page_size: int = 3, list_md5_for_multipart: bool = False, port: int = 0) -> None:
        self.page_size = page_size
        self.list_md5_for_multipart = list_md5_for_multipart  # real OCI lists no md5 for multipart objects
        self.buckets: dict[tuple[str, str], dict[str, StoredObject]] = {}
        self.faults: dict[str, Faults] = {}
        self.list_faults = Faults()
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by kind: list, head, get, other
        self.body_bytes = 0  # file-body bytes written to sockets
        self.request_log: list[tuple[str, str, str | None]] = []  # (method, object-or-path, range)
        self.key_ids: set[str] = set()  # keyId="..." of the Signature authorization headers seen
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- contents -------------------------------------------------------------------------------------------
    def create_bucket(self, namespace: str, bucket: str) -> None:
        self.buckets.setdefault((namespace, bucket), {})

    def put_object(self, namespace: str, bucket: str, name: str, data: bytes, *,
                   part_size: int | None = None) -> StoredObject:
        """Store ``data``; with ``part_size`` (< len) it is registered as a multipart upload."""
        md5, mp, crc, size = _digests([data], part_size)
        return self._store(namespace, bucket, StoredObject(name, size, md5, mp, crc, "", "", data=data))

    def put_file(self, namespace: str, bucket: str, name: str, path: Path, *,
                 part_size: int | None = None) -> StoredObject:
        """Serve ``path`` (read on each request, never held in memory) as object ``name``."""
        md5, mp, crc, size = _digests(_file_chunks(path), part_size)
        return self._store(namespace, bucket, StoredObject(name, size, md5, mp, crc, "", "", path=Path(path)))

    def add_folder(self, namespace: str, bucket: str, folder: Path, prefix: str = "", *,
                   part_size: int | None = None) -> int:
        """Every regular file under ``folder`` as ``prefix + relative path``; returns the count."""
        n = 0
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                self.put_file(namespace, bucket, prefix + p.relative_to(folder).as_posix(), p, part_size=part_size)
                n += 1
        return n

    def _store(self, namespace: str, bucket: str, obj: StoredObject) -> StoredObject:
        obj.etag = str(uuid.uuid4())
        obj.time_created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._lock:
            self.buckets.setdefault((namespace, bucket), {})[obj.name] = obj
        return obj

    def inject(self, name: str, faults: Faults) -> None:
        with self._lock:
            self.faults[name] = faults

    # -- counters -------------------------------------------------------------------------------------------
    def count(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1

    def served(self, n: int) -> None:
        with self._lock:
            self.body_bytes += n

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.body_bytes = 0
            self.request_log.clear()

    def take_fault(self, name: str | None) -> tuple[str, Any] | None:
        """Consume one status fault for ``name`` (``None`` = listing): ("429", retry_after) or ("5xx", code)."""
        with self._lock:
            f = self.list_faults if name is None else self.faults.get(name)
            if f is None:
                return None
            if f.status_401 > 0:
                f.status_401 -= 1
                return ("401", None)
            if f.status_429 > 0:
                f.status_429 -= 1
                return ("429", f.retry_after)
            if f.status_5xx > 0:
                f.status_5xx -= 1
                return ("5xx", f.code_5xx)
            return None

    def take_body_fault(self, name: str) -> tuple[bool, bool, int | None]:
        """(truncate?, corrupt?, rate) for the next body of ``name``."""
        with self._lock:
            f = self.faults.get(name)
            if f is None:
                return False, False, None
            trunc = f.truncate > 0
            corrupt = f.corrupt > 0
            f.truncate -= int(trunc)
            f.corrupt -= int(corrupt)
            return trunc, corrupt, f.rate_bps

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OCIObjectServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="ociserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> OCIObjectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_handler(server: OCIObjectServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "ociserver"
        disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stall between headers and body

        def log_message(self, format: str, *args: Any) -> None:
            return None

        # -- helpers ----------------------------------------------------------------------------------------
        def _drain(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            if n:
                self.rfile.read(n)

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("opc-request-id", uuid.uuid4().hex.upper())
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps({"code": code, "message": message}).encode(), headers)

        def _status_fault(self, name: str | None) -> bool:
            fault = server.take_fault(name)
            if fault is None:
                return False
            kind, arg = fault
            if kind == "401":
                self._error(401, "NotAuthenticated", "The required information to complete authentication was "
                                                     "not provided or was incorrect.")
            elif kind == "429":
                hdrs = {"retry-after": arg if isinstance(arg, str) else f"{arg:g}"} if arg is not None else {}
                self._error(429, "TooManyRequests", "Too many requests", hdrs)
            else:
                self._error(int(arg), "InternalServerError" if arg == 500 else "ServiceUnavailable", "injected")
            return True

        # -- dispatch ---------------------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._dispatch()

        def do_GET(self) -> None:
            self._dispatch()

        def do_PUT(self) -> None:
            self._drain()
            server.count("other")
            self._error(405, "MethodNotAllowed", "this test server is read-only")

        do_POST = do_DELETE = do_PUT

        def _dispatch(self) -> None:
            self._drain()
            split = urlsplit(self.path)
            raw_path, query = split.path, parse_qs(split.query)
            if not self.headers.get("authorization"):
                server.count("other")
                self._error(401, "NotAuthenticated", "The required information to complete authentication "
                                                     "was not provided.")
                return
            if m := re.search(r'keyId="([^"]*)"', self.headers.get("authorization", "")):
                with server._lock:
                    server.key_ids.add(m.group(1))
            parts = raw_path.split("/", 6)  # ['', 'n', ns, 'b', bucket, 'o', name]
            if raw_path in ("/n", "/n/"):
                server.count("other")
                namespaces = sorted({n for n, _ in server.buckets})
                self._send(200, json.dumps(namespaces[0] if namespaces else "").encode())
                return
            if len(parts) < 5 or parts[1] != "n" or parts[3] != "b":
                server.count("other")
                self._error(404, "NotFound", f"unknown path {raw_path}")
                return
            ns, bucket = unquote(parts[2]), unquote(parts[4])
            objects = server.buckets.get((ns, bucket))
            if objects is None:
                server.count("other")
                self._error(404, "BucketNotFound", f"Either the bucket named '{bucket}' does not exist in the "
                                                   f"namespace '{ns}' or you are not authorized to access it")
                return
            if len(parts) == 5 or (len(parts) == 6 and parts[5] == ""):
                server.count("other")
                self._send(200, json.dumps({"namespace": ns, "name": bucket, "compartmentId": "ocid1.compartment..x",
                                            "etag": "bucket-etag"}).encode(), {"etag": "bucket-etag"})
                return
            if parts[5] != "o":
                server.count("other")
                self._error(404, "NotFound", f"unknown path {raw_path}")
                return
            if len(parts) == 6 or parts[6] == "":
                self._list(objects, query)
                return
            self._object(objects, unquote(parts[6]))

        def _list(self, objects: dict[str, StoredObject], query: dict[str, list[str]]) -> None:
            server.count("list")
            with server._lock:
                server.request_log.append(("LIST", self.path, None))
            if self._status_fault(None):
                return
            prefix = query.get("prefix", [""])[0]
            start = query.get("start", [""])[0]
            end = query.get("end", [""])[0]
            limit = min(int(query.get("limit", ["1000"])[0]), server.page_size)
            delim = query.get("delimiter", [""])[0]
            fields = set(query.get("fields", ["name"])[0].split(","))
            names = sorted(n for n in objects if n.startswith(prefix) and n >= start and (not end or n < end))
            out: list[dict[str, Any]] = []
            prefixes: set[str] = set()
            nxt = None
            for n in names:
                if delim and delim in n[len(prefix):]:
                    prefixes.add(n[:len(prefix) + n[len(prefix):].index(delim) + 1])
                    continue
                if len(out) == limit:
                    nxt = n
                    break
                o = objects[n]
                d: dict[str, Any] = {"name": n}
                if "size" in fields:
                    d["size"] = o.size
                if "md5" in fields and (not o.multipart or server.list_md5_for_multipart):
                    d["md5"] = o.md5_b64
                if "etag" in fields:
                    d["etag"] = o.etag
                if "timeCreated" in fields:
                    d["timeCreated"] = o.time_created
                if "timeModified" in fields:
                    d["timeModified"] = o.time_created
                out.append(d)
            body: dict[str, Any] = {"objects": out, "prefixes": sorted(prefixes)}
            if nxt is not None:
                body["nextStartWith"] = nxt
            self._send(200, json.dumps(body).encode())

        def _object(self, objects: dict[str, StoredObject], name: str) -> None:
            head = self.command == "HEAD"
            server.count("head" if head else "get")
            rng = self.headers.get("range")
            with server._lock:
                server.request_log.append((self.command, name, rng))
            obj = objects.get(name)
            if obj is None:
                self._error(404, "ObjectNotFound", f"The object '{name}' was not found in the bucket")
                return
            if self._status_fault(name):
                return
            with server._lock:
                location = server.faults[name].redirect_to if name in server.faults else None
            if location is not None:
                self._send(302, b"", {"location": location})
                return
            if (im := self.headers.get("if-match")) and im != obj.etag:
                self._error(412, "IfMatchFailed", "The If-Match header did not match the object's ETag")
                return
            headers = {"etag": obj.etag, "accept-ranges": "bytes", "opc-content-crc32c": obj.crc32c_b64,
                       "last-modified": self.date_time_string(), "content-type": "application/octet-stream"}
            headers["opc-multipart-md5" if obj.multipart else "content-md5"] = obj.md5_b64
            start, stop, status = 0, obj.size, 200
            if rng:
                parsed = parse_range(rng, obj.size)
                if parsed is None:
                    self._error(416, "InvalidRange", f"bad range {rng!r}",
                                {"content-range": f"bytes */{obj.size}"})
                    return
                start, stop = parsed
                status = 206
                headers["content-range"] = f"bytes {start}-{stop - 1}/{obj.size}"
            self.send_response(status)
            self.send_header("opc-request-id", uuid.uuid4().hex.upper())
            self.send_header("content-length", str(stop - start))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if head:
                return
            trunc, corrupt, rate = server.take_body_fault(name)
            limit = stop - start
            if trunc:
                limit = int(limit * server.faults[name].truncate_at)
            pos, sent, t0 = start, 0, time.monotonic()
            while sent < limit:
                chunk = obj.read(pos, min(CHUNK if rate is None else max(1, rate // 20), limit - sent))
                if not chunk:
                    break
                if corrupt and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                # counted before it is sent: a client that has read the whole body always finds it counted
                server.served(len(chunk))
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    server.served(-len(chunk))  # it never left
                    self.close_connection = True
                    return
                pos += len(chunk)
                sent += len(chunk)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            if trunc:
                self.wfile.flush()
                self.close_connection = True

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelherd.testing.ociserver", description=__doc__.split("\n")[0])
    ap.add_argument("--bucket", action="append", default=[], metavar="NS/BUCKET=/FOLDER[:PREFIX]",
                    help="serve every file under FOLDER as objects PREFIX+relative path (repeatable)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--page-size", type=int, default=1000)
    ap.add_argument("--multipart-part-mib", type=int, default=0,
                    help="register files larger than this as multipart uploads of this part size (0: never)")
    ap.add_argument("--rate-bps", type=int, default=0, help="throttle every body to this many bytes/s")
    args = ap.parse_args(argv)
    srv = OCIObjectServer(page_size=args.page_size, port=args.port)
    part = args.multipart_part_mib * 1024 * 1024 or None
    for spec in args.bucket:
        nsb, eq, rest = spec.partition("=")
        ns, slash, bucket = nsb.partition("/")
        if not eq or not slash:
            ap.error(f"--bucket {spec!r}: expected NS/BUCKET=/FOLDER[:PREFIX]")
        folder, _, prefix = rest.partition(":")
        srv.create_bucket(ns, bucket)
        n = srv.add_folder(ns, bucket, Path(folder), prefix, part_size=part)
        print(f"bucket {ns}/{bucket}: {n} objects from {folder}", file=sys.stderr, flush=True)
        if args.rate_bps:
            for name in srv.buckets[(ns, bucket)]:
                srv.inject(name, Faults(rate_bps=args.rate_bps))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    srv.start()
    print(srv.url, flush=True)
    stop.wait()
    srv.stop()
    print(f"served {srv.body_bytes} body bytes, requests {dict(srv.requests)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
