"""A real loopback Hugging Face Hub for tests and benchmarks.

Two ``ThreadingHTTPServer`` instances on 127.0.0.1 (HTTP/1.1, keep-alive):

* the **API host** speaks the parts of the Hub API that ``huggingface_hub`` uses for downloads:
  ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes, ``blobId`` and ``lfs``),
  ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=`` paginated with a
  ``Link: <...>; rel="next"`` header, and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``. Small
  (non-LFS) files are served by the API host itself; LFS files get a 302 to the CDN host, as on the
  real Hub.
* the **CDN host** (another port) serves LFS bodies at ``/{repo}/{path}?oid={sha256}`` with
  ``Range`` support (206 + ``Content-Range``). It needs no token. It can be replaced by an external
  static server (nginx) with ``redirect_base=``; that server must serve ``{root}/{repo}/{path}``.

Tests register repos from local folders (``add_repo``), raw names (``add_files``, for malicious
tree entries) or a generated tree of any size (``add_generated``: 10^6 entries streamed as they are made,
never held), program faults (``fail`` with any ``Retry-After`` string, ``truncate``, ``corrupt``, ``throttle``,
``redirect`` to any URL or scheme, ``link`` to replace a tree page's ``Link`` header: a loop, another origin)
and read counters (``requests``, ``bytes_served``, ``request_log``). Counters never lag the client: a request
is logged before its status line is sent and body bytes are counted before they are written, so a client
that has read a whole answer always finds it counted. ``GET /_stats`` on the API host returns the
counters as JSON, for tests that run the server as a separate process::

    python -m modelherd.testing.hubserver --repo org/model=/path/to/folder --print-port

prints the endpoint URL on the first line of stdout and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from .support import parse_range

__all__ = ["CHUNK", "DEFAULT_LFS_MIN_SIZE", "Endpoint", "Fault", "GeneratedTree", "HubFile", "HubRepo", "HubServer",
           "RequestRecord", "git_blob_sha1", "lfs_pointer", "main"]

Endpoint = Literal["model_info", "tree", "resolve", "cdn", "any"]

DEFAULT_LFS_MIN_SIZE = 64 * 1024
CHUNK = 256 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class HubFile:
    """One file of one commit. Bodies are read from ``disk`` (large models) or held in ``data``."""

    path: str
    size: int
    blob_id: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    sha256: str
    lfs: bool
    data: bytes | None = None
    disk: Path | None = None

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` in chunks."""
        if self.data is not None:
            for off in range(start, end, CHUNK):
                yield self.data[off:min(end, off + CHUNK)]
            return
        assert self.disk is not None
        with open(self.disk, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                buf = f.read(min(CHUNK, left))
                if not buf:
                    return
                left -= len(buf)
                yield buf

    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)


@dataclass
class HubRepo:
    repo_id: str
    token: str | None = None
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    generated: GeneratedTree | None = None

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if rev in self.commits:
            return rev
        return None


@dataclass(frozen=True)
class GeneratedTree:
    """A tree of ``count`` file entries made one at a time (``names(i)``), never held as a whole.

    Entry ``i`` is ``names(i)``, a non-LFS file of ``i % 1000`` bytes whose oid is the sha1 of its name; the tree
    is one page (no ``Link``) sent with chunked transfer encoding as it is generated.
    """

    commit: str
    count: int
    names: Callable[[int], str]

    def entries(self) -> Iterator[dict[str, Any]]:
        for i in range(self.count):
            name = self.names(i)
            yield {"type": "file", "oid": hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest(),
                   "size": i % 1000, "path": name}


@dataclass
class Fault:
    """A programmed misbehaviour for requests to ``endpoint`` whose path contains ``path``."""

    endpoint: Endpoint
    kind: Literal["status", "truncate", "corrupt", "throttle", "redirect", "link"]
    times: int | None  # None: forever
    path: str | None = None
    status: int = 500
    retry_after: str | None = None
    keep_bytes: int = 0  # truncate: bytes actually sent before closing
    flip_at: int = 0  # corrupt: offset (within the body sent) of the byte to flip
    bytes_per_s: float = 0.0  # throttle
    location: str = ""  # redirect: the Location sent with the 302
    link: str = ""  # link: the whole Link header of a tree page ("" sends none)

    def matches(self, endpoint: str, path: str) -> bool:
        return (self.endpoint in ("any", endpoint)) and (self.path is None or self.path in path)


@dataclass(frozen=True)
class RequestRecord:
    host: Literal["api", "cdn"]
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    status: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer
    role: Literal["api", "cdn"]


class HubServer:
    """The Hub: an API host and a CDN host. Thread-safe; start with ``start()`` or as a context manager."""

    def __init__(self, *, page_size: int = 50, redirect_base: str | None = None, port: int = 0,
                 cdn_port: int = 0, host: str = "127.0.0.1") -> None:
        """``host``: the one address both servers listen on and name in URLs (loopback unless a test network
        needs another, e.g. kind's gateway)."""
        self.page_size = page_size
        self.host = host
        self._redirect_base = redirect_base.rstrip("/") if redirect_base else None
        self._lock = threading.Lock()
        self.repos: dict[str, HubRepo] = {}
        self._faults: list[Fault] = []
        self.requests: Counter[str] = Counter()
        self.bytes_served = 0
        self.bytes_served_by_path: Counter[str] = Counter()
        self.request_log: list[RequestRecord] = []
        self._api = self._make_server("api", port)
        self._cdn = self._make_server("cdn", cdn_port) if redirect_base is None else None
        self._threads: list[threading.Thread] = []

    def _make_server(self, role: Literal["api", "cdn"], port: int) -> _Server:
        srv = _Server((self.host, port), _Handler)
        srv.hub = self
        srv.role = role
        return srv

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self._api.server_address[1]}"

    @property
    def cdn_base(self) -> str:
        if self._redirect_base is not None:
            return self._redirect_base
        assert self._cdn is not None
        return f"http://{self.host}:{self._cdn.server_address[1]}"

    def start(self) -> HubServer:
        for srv in (self._api, self._cdn):
            if srv is not None:
                t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                     name=f"hub-{srv.role}")
                t.start()
                self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening sockets (also for a server never started)."""
        started = bool(self._threads)
        for srv in (self._api, self._cdn):
            if srv is not None:
                if started:
                    srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- repos -------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: Path | str, *, revision: str = "main",
                 lfs_min_size: int = DEFAULT_LFS_MIN_SIZE, token: str | None = None, gated: bool = False,
                 in_memory: bool = False) -> str:
        """Register every regular file under ``folder`` as a new commit of ``repo_id`` at ``revision``.

        Files of ``lfs_min_size`` bytes or more are LFS files (served through the CDN). Returns the
        commit sha. Bodies are read from disk on each request unless ``in_memory``.
        """
        folder = Path(folder)
        files: dict[str, HubFile] = {}
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                rel = p.relative_to(folder).as_posix()
                files[rel] = self._hub_file(rel, p, lfs_min_size, in_memory)
        return self._commit(repo_id, revision, files, token=token, gated=gated)

    def add_files(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main",
                  lfs_min_size: int = DEFAULT_LFS_MIN_SIZE, token: str | None = None, gated: bool = False) -> str:
        """Register ``files`` (name -> bytes, names taken verbatim, even ``../evil``) as a new commit."""
        hub_files = {name: self._hub_file_from_bytes(name, data, lfs_min_size) for name, data in files.items()}
        return self._commit(repo_id, revision, hub_files, token=token, gated=gated)

    @staticmethod
    def _hub_file_from_bytes(name: str, data: bytes, lfs_min_size: int) -> HubFile:
        sha = hashlib.sha256(data).hexdigest()
        lfs = len(data) >= lfs_min_size
        blob = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return HubFile(path=name, size=len(data), blob_id=blob, sha256=sha, lfs=lfs, data=data)

    @classmethod
    def _hub_file(cls, rel: str, p: Path, lfs_min_size: int, in_memory: bool) -> HubFile:
        size = p.stat().st_size
        if in_memory or size < lfs_min_size:
            f = cls._hub_file_from_bytes(rel, p.read_bytes(), lfs_min_size)
            if not in_memory:
                f.data, f.disk = None, p
            return f
        sha = hashlib.sha256()
        with open(p, "rb") as fh:
            while buf := fh.read(4 * 1024 * 1024):
                sha.update(buf)
        digest = sha.hexdigest()
        return HubFile(path=rel, size=size, blob_id=git_blob_sha1(lfs_pointer(digest, size)), sha256=digest,
                       lfs=True, disk=p)

    def _commit(self, repo_id: str, revision: str, files: dict[str, HubFile], *, token: str | None,
                gated: bool) -> str:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"{repo_id}\0{revision}\0{time.time_ns()}".encode())
        for name in sorted(files):
            h.update(f"{name}\0{files[name].blob_id}\0".encode())
        sha = h.hexdigest()
        with self._lock:
            repo = self.repos.setdefault(repo_id, HubRepo(repo_id))
            repo.token = token if token is not None else repo.token
            repo.gated = gated or repo.gated
            repo.commits[sha] = files
            repo.refs[revision] = sha
        return sha

    # -- faults ------------------------------------------------------------------------------
    def fail(self, endpoint: Endpoint, status: int, *, times: int | None = 1, path: str | None = None,
             retry_after: str | None = None) -> Fault:
        """Answer the next ``times`` matching requests with ``status`` (and ``Retry-After``)."""
        return self._add(Fault(endpoint, "status", times, path, status=status, retry_after=retry_after))

    def truncate(self, endpoint: Endpoint, *, keep_bytes: int, times: int | None = 1,
                 path: str | None = None) -> Fault:
        """Promise the full ``Content-Length`` but close the connection after ``keep_bytes`` body bytes."""
        return self._add(Fault(endpoint, "truncate", times, path, keep_bytes=keep_bytes))

    def corrupt(self, endpoint: Endpoint, *, flip_at: int = 0, times: int | None = 1,
                path: str | None = None) -> Fault:
        """Flip one bit of the body byte at ``flip_at`` (relative to the bytes sent)."""
        return self._add(Fault(endpoint, "corrupt", times, path, flip_at=flip_at))

    def throttle(self, endpoint: Endpoint, *, bytes_per_s: float, times: int | None = None,
                 path: str | None = None) -> Fault:
        """Send matching bodies at about ``bytes_per_s``."""
        return self._add(Fault(endpoint, "throttle", times, path, bytes_per_s=bytes_per_s))

    def redirect(self, endpoint: Endpoint, location: str, *, times: int | None = 1, path: str | None = None) -> Fault:
        """Answer the next ``times`` matching requests with ``302 Location: location`` (any URL, any scheme)."""
        return self._add(Fault(endpoint, "redirect", times, path, location=location))

    def link(self, value: str, *, times: int | None = 1, path: str | None = None) -> Fault:
        """Send ``Link: value`` with the next ``times`` tree pages instead of the real one (``""``: none).

        ``{endpoint}`` in ``value`` becomes the API host's URL, e.g. ``'<{endpoint}/api/...>; rel="next"'``.
        """
        return self._add(Fault("tree", "link", times, path, link=value))

    def add_generated(self, repo_id: str, count: int, names: Callable[[int], str] = lambda i: f"f{i:07d}.bin",
                      *, token: str | None = None) -> str:
        """Register ``repo_id`` (revision ``main``) as a generated tree of ``count`` files; returns its commit."""
        sha = hashlib.sha1(f"{repo_id}\0generated\0{count}".encode(), usedforsecurity=False).hexdigest()
        with self._lock:
            repo = self.repos.setdefault(repo_id, HubRepo(repo_id))
            repo.token = token if token is not None else repo.token
            repo.generated = GeneratedTree(sha, count, names)
            repo.commits[sha] = {}
            repo.refs["main"] = sha
        return sha

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def _take_faults(self, endpoint: str, path: str) -> list[Fault]:
        """Consume one use of each matching fault (at most one per kind)."""
        taken: list[Fault] = []
        with self._lock:
            for f in list(self._faults):
                if f.matches(endpoint, path) and all(t.kind != f.kind for t in taken):
                    taken.append(f)
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self._faults.remove(f)
        return taken

    # -- counters ----------------------------------------------------------------------------
    def _record(self, rec: RequestRecord, endpoint: str) -> None:
        with self._lock:
            self.request_log.append(rec)
            self.requests[endpoint] += 1

    def _count_body(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_served += n
            self.bytes_served_by_path[path] += n

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.requests), "bytes_served": self.bytes_served,
                    "bytes_served_by_path": dict(self.bytes_served_by_path)}

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_served = 0
            self.bytes_served_by_path.clear()
            self.request_log.clear()

    def _find_lfs(self, repo_id: str, path: str, oid: str | None) -> HubFile | None:
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return None
            for files in repo.commits.values():
                f = files.get(path)
                if f is not None and f.lfs and (oid is None or f.sha256 == oid):
                    return f
        return None


class _Reply(Exception):
    """Short-circuits a handler with an error status."""

    def __init__(self, status: int, *, code: str | None = None, message: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in separate writes: without TCP_NODELAY, Nagle holds the body back until the
    # client's delayed ACK (40 ms on loopback), a stall no real Hub or CDN has
    disable_nagle_algorithm = True
    server: _Server
    _status = 0
    _logged = False
    _endpoint = ""
    _link: str | None = None  # a programmed Link header for this request's tree page

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def send_response(self, code: int, message: str | None = None) -> None:
        # recorded before a byte of the answer leaves: a client that has read the whole body always finds
        # its request in the log (recording after the body raced with tests that check the log at once)
        self._status = code
        self._log_request()
        super().send_response(code, message)

    def _log_request(self) -> None:
        if self._logged:
            return
        self._logged = True
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.hub._record(RequestRecord(self.server.role, self.command, self.path, headers, self._status),
                         self._endpoint)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, *, head: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        segments = [urllib.parse.unquote(s) for s in url.path.split("/")[1:]]
        endpoint = self._endpoint = self._classify(segments)
        self._status, self._logged = 0, False
        try:
            if url.path == "/_stats" and self.server.role == "api":
                self._json(200, self.hub.stats(), head=head)
                return
            faults = self.hub._take_faults(endpoint, url.path)
            for f in faults:
                if f.kind == "status":
                    hdrs = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
                    raise _Reply(f.status, message=f"injected {f.status}", headers=hdrs)
                if f.kind == "redirect":
                    raise _Reply(302, message="injected redirect", headers={"Location": f.location})
            self._link = next((f.link for f in faults if f.kind == "link"), None)
            body_faults = [f for f in faults if f.kind in ("truncate", "corrupt", "throttle")]
            if self.server.role == "cdn":
                self._cdn(segments, query, head=head, faults=body_faults)
            elif segments[:2] == ["api", "models"]:
                self._api(segments[2:], query, head=head)
            elif "resolve" in segments:
                self._resolve(segments, head=head, faults=body_faults)
            else:
                raise _Reply(404, message="not found")
        except _Reply as r:
            self._json(r.status, {"error": r.message}, head=head, code=r.code, extra=r.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self._log_request()  # a request that got no answer at all (the client went away first)

    def _classify(self, segments: list[str]) -> str:
        if self.server.role == "cdn":
            return "cdn"
        if segments[:2] == ["api", "models"]:
            return "tree" if "tree" in segments[3:] else "model_info"
        if "resolve" in segments:
            return "resolve"
        return "other"

    def _split_repo(self, segments: list[str]) -> tuple[HubRepo, list[str]]:
        """Longest registered repo id that prefixes ``segments``; 404 RepoNotFound otherwise."""
        for n in (2, 1):
            rid = "/".join(segments[:n])
            repo = self.hub.repos.get(rid)
            if repo is not None and len(segments) >= n:
                return repo, segments[n:]
        raise _Reply(404, code="RepoNotFound", message="Repository not found")

    def _authorize(self, repo: HubRepo) -> None:
        """Mimic the Hub: missing token 401, wrong token 401/403 (gated: 403 GatedRepo)."""
        if repo.token is None:
            return
        auth = self.headers.get("Authorization", "")
        if auth == f"Bearer {repo.token}":
            return
        if repo.gated:
            status = 401 if not auth else 403
            raise _Reply(status, code="GatedRepo",
                         message="Access to this model is restricted. You must have access to it and be authenticated")
        if not auth:
            raise _Reply(401, code="RepoNotFound", message="Invalid username or password.")
        raise _Reply(403, message="Invalid credentials in Authorization header")

    def _commit_files(self, repo: HubRepo, rev: str) -> tuple[str, dict[str, HubFile]]:
        sha = repo.resolve(rev)
        if sha is None:
            raise _Reply(404, code="RevisionNotFound", message=f"Invalid rev id: {rev}")
        return sha, repo.commits[sha]

    # -- API ---------------------------------------------------------------------------------
    def _api(self, segments: list[str], query: dict[str, list[str]], *, head: bool) -> None:
        repo, rest = self._split_repo(segments)
        self._authorize(repo)
        if not rest or rest[0] == "revision":
            rev = rest[1] if len(rest) >= 2 else "main"
            sha, files = self._commit_files(repo, rev)
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings: list[dict[str, Any]] = []
            for f in files.values():
                sib: dict[str, Any] = {"rfilename": f.path}
                if blobs:
                    sib.update(size=f.size, blobId=f.blob_id)
                    if f.lfs:
                        sib["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.pointer())}
                siblings.append(sib)
            info = {"_id": sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha,
                    "private": repo.token is not None and not repo.gated,
                    "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                    "siblings": siblings}
            self._json(200, info, head=head)
            return
        if rest[0] == "tree" and len(rest) >= 2:
            self._tree(repo, rest[1], "/".join(rest[2:]), query, head=head)
            return
        raise _Reply(404, message="unknown API route")

    def _tree(self, repo: HubRepo, rev: str, sub: str, query: dict[str, list[str]], *, head: bool) -> None:
        sha, files = self._commit_files(repo, rev)
        if repo.generated is not None and sha == repo.generated.commit:
            self._generated_tree(repo.generated, head=head)
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        if prefix and not any(n.startswith(prefix) for n in files):
            raise _Reply(404, code="EntryNotFound", message=f"{sub} does not exist on {rev}")
        entries: dict[str, dict[str, Any]] = {}
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            parts = rel.split("/")
            # the directories on the way
            for i in range(1, len(parts)):
                if not recursive and i > 1:
                    break
                d = prefix + "/".join(parts[:i])
                entries.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                       "size": 0, "path": d})
            if recursive or len(parts) == 1:
                f = files[name]
                e: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
                if f.lfs:
                    e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer())}
                entries[name] = e
        listed = list(entries.values())
        cursor = int(query.get("cursor", ["0"])[0] or 0)
        page = listed[cursor:cursor + self.hub.page_size]
        extra: dict[str, str] = {}
        if cursor + self.hub.page_size < len(listed):
            q = {k: v[0] for k, v in query.items()}
            q["cursor"] = str(cursor + self.hub.page_size)
            nxt = f"{self.hub.endpoint}{urllib.parse.urlsplit(self.path).path}?{urllib.parse.urlencode(q)}"
            extra["Link"] = f'<{nxt}>; rel="next"'
        if self._link is not None:
            extra.pop("Link", None)
            if self._link:
                extra["Link"] = self._link.replace("{endpoint}", self.hub.endpoint)
        self._json(200, page, head=head, extra=extra)

    def _generated_tree(self, tree: GeneratedTree, *, head: bool) -> None:
        """The whole generated tree as one JSON array, made and sent in chunks (chunked transfer encoding)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        if self._link:
            self.send_header("Link", self._link.replace("{endpoint}", self.hub.endpoint))
        self.end_headers()
        if head:
            return

        def send(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        buf: list[str] = ["["]
        size = 1
        for i, entry in enumerate(tree.entries()):
            text = ("," if i else "") + json.dumps(entry)
            buf.append(text)
            size += len(text)
            if size >= CHUNK:
                send("".join(buf).encode())
                buf, size = [], 0
        buf.append("]")
        send("".join(buf).encode())
        self.wfile.write(b"0\r\n\r\n")

    # -- resolve -----------------------------------------------------------------------------
    def _resolve(self, segments: list[str], *, head: bool, faults: list[Fault]) -> None:
        i = segments.index("resolve")
        repo, _ = self._split_repo(segments[:i])
        if len(segments) < i + 3:
            raise _Reply(404, code="EntryNotFound", message="no file named")
        self._authorize(repo)
        rev, name = segments[i + 1], "/".join(segments[i + 2:])
        sha, files = self._commit_files(repo, rev)
        f = files.get(name)
        if f is None:
            raise _Reply(404, code="EntryNotFound", message=f"{name} does not exist at {sha}")
        common = {"X-Repo-Commit": sha, "ETag": f'"{f.sha256 if f.lfs else f.blob_id}"',
                  "Accept-Ranges": "bytes"}
        if f.lfs:
            location = (f"{self.hub.cdn_base}/{urllib.parse.quote(repo.repo_id)}/{urllib.parse.quote(f.path)}"
                        f"?oid={f.sha256}&Expires=9999999999")
            common.update({"X-Linked-Size": str(f.size), "X-Linked-Etag": f'"{f.sha256}"', "Location": location,
                           "Content-Length": "0"})
            self.send_response(302)
            for k, v in common.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._send_body(f, head=head, headers=common, faults=faults)

    def _cdn(self, segments: list[str], query: dict[str, list[str]], *, head: bool, faults: list[Fault]) -> None:
        oid = query.get("oid", [None])[0]
        f = None
        for n in (2, 1):
            f = self.hub._find_lfs("/".join(segments[:n]), "/".join(segments[n:]), oid)
            if f is not None:
                break
        if f is None:
            raise _Reply(404, message="NoSuchKey")
        self._send_body(f, head=head, headers={"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"}, faults=faults)

    def _send_body(self, f: HubFile, *, head: bool, headers: dict[str, str], faults: list[Fault]) -> None:
        rng = self.headers.get("Range")
        start, end, status = 0, f.size, 200
        if rng:
            parsed = parse_range(rng, f.size)
            if parsed is None:
                raise _Reply(416, message="Range Not Satisfiable", headers={"Content-Range": f"bytes */{f.size}"})
            start, end = parsed
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{f.size}"}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if head:
            return
        limit = end - start
        rate = 0.0
        flip: int | None = None
        for fault in faults:
            if fault.kind == "truncate":
                limit = min(limit, fault.keep_bytes)
            elif fault.kind == "throttle":
                rate = fault.bytes_per_s
            elif fault.kind == "corrupt":
                flip = fault.flip_at
        sent = 0
        t0 = time.monotonic()
        for chunk in f.read(start, end):
            step = max(1, int(rate / 20)) if rate else len(chunk)
            for part in (chunk[i:i + step] for i in range(0, len(chunk), step)):
                part = part[: max(0, limit - sent)]
                if not part:
                    break
                if flip is not None and sent <= flip < sent + len(part):
                    b = bytearray(part)
                    b[flip - sent] ^= 0x01
                    part = bytes(b)
                # counted before it is sent: a client that has read the whole body always finds it counted
                self.hub._count_body(f.path, len(part))
                try:
                    self.wfile.write(part)
                except OSError:
                    self.hub._count_body(f.path, -len(part))  # it never left
                    raise
                sent += len(part)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            if sent >= limit:
                break
        if sent < end - start:
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, status: int, obj: Any, *, head: bool, code: str | None = None,
              extra: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code:
            self.send_header("X-Error-Code", code)
        if status >= 400 and isinstance(obj, dict) and obj.get("error"):
            self.send_header("X-Error-Message", str(obj["error"]))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelherd.testing.hubserver", description=__doc__.split("\n")[0])
    ap.add_argument("--repo", action="append", default=[], metavar="ORG/MODEL[@REV]=FOLDER",
                    help="register FOLDER as ORG/MODEL at REV (default main); repeatable")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cdn-port", type=int, default=0)
    ap.add_argument("--redirect-base", default=None, help="external static server for LFS bodies")
    ap.add_argument("--lfs-min-size", type=int, default=DEFAULT_LFS_MIN_SIZE)
    ap.add_argument("--page-size", type=int, default=50)
    ap.add_argument("--token", default=None, help="require this token for every repo")
    ap.add_argument("--print-port", action="store_true", help="print the endpoint URL on stdout (first line)")
    ap.add_argument("--stats-file", type=Path, default=None, help="write counters as JSON here on exit")
    args = ap.parse_args(argv)

    hub = HubServer(page_size=args.page_size, redirect_base=args.redirect_base, port=args.port,
                    cdn_port=args.cdn_port)
    for spec in args.repo:
        name, sep, folder = spec.partition("=")
        if not sep:
            ap.error(f"--repo {spec!r}: expected ORG/MODEL[@REV]=FOLDER")
        repo_id, _, rev = name.partition("@")
        hub.add_repo(repo_id, folder, revision=rev or "main", lfs_min_size=args.lfs_min_size, token=args.token)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hub.start()
    if args.print_port:
        print(hub.endpoint, flush=True)
    print(f"hubserver: api {hub.endpoint} cdn {hub.cdn_base} pid {os.getpid()}", file=sys.stderr, flush=True)
    stop.wait()
    hub.stop()
    if args.stats_file is not None:
        args.stats_file.write_text(json.dumps(hub.stats()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
