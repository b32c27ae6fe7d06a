"""A folder on a plain HTTP server as a model source: a real loopback server, a SHA256SUMS written by the real
``sha256sum``, pulls through ``modelherd pull`` and through the engine, and a hostile server."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from modelherd.storage import engine
from modelherd.storage.errors import (
    ConfigError,
    MalformedListingError,
    RateLimitedError,
    SourceNotFoundError,
    TransientSourceError,
    UnsafePathError,
    VerificationError,
)
from modelherd.storage.options import EngineOptions
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.sources import open_source
from modelherd.storage.sources.http import HTTPSource
from modelherd.storage.uri import parse_uri

from tests.integration.test_cli import run_cli
from tests.modelgen import make_sharded_model
from tests.support import read_all

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
FAST = RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05)


@dataclass
class Behaviour:
    """What the server does, per file name (its URL path under the root)."""

    ignore_range: bool = False
    head_status: int = 0  # HEAD answers this (405, a 403 of a URL signed for GET only): sizes from a ranged GET
    missing: set[str] = field(default_factory=set)
    truncate: dict[str, list[int]] = field(default_factory=dict)  # close after N body bytes, once per entry
    throttle: dict[str, list[float]] = field(default_factory=dict)  # 429 with this Retry-After, once per entry
    redirect_to: str | None = None  # every model file: 302 to this base URL + the same path
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


class FolderServer:
    """Serves ``root`` at ``http://127.0.0.1:PORT/`` like a static file server (nginx): GET, HEAD, one byte
    range per request; ``behaviour`` injects faults."""

    def __init__(self, root: Path, behaviour: Behaviour | None = None) -> None:
        self.root = root
        self.b = behaviour or Behaviour()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.serve(self, body=True)

            def do_HEAD(self) -> None:
                server.serve(self, body=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FolderServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests(self, method: str, name: str) -> list[dict[str, str]]:
        return [h for m, p, h in self.b.seen if m == method and p == name]

    def serve(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        name = h.path.lstrip("/")
        with self._lock:
            self.b.seen.append((h.command, name, {k.lower(): v for k, v in h.headers.items()}))
            throttled = self.b.throttle.get(name) or []
            retry_after = throttled.pop(0) if throttled else None
            cuts = self.b.truncate.get(name) or []
            cut = cuts.pop(0) if (cuts and body) else None
        if retry_after is not None:
            return self.reply(h, 429, {"Retry-After": f"{retry_after:g}"})
        if not body and self.b.head_status:
            return self.reply(h, self.b.head_status)
        if self.b.redirect_to and not name.endswith("SHA256SUMS"):
            return self.reply(h, 302, {"Location": self.b.redirect_to + name})
        path = self.root / name
        if name in self.b.missing or not path.is_file():
            return self.reply(h, 404)
        data = path.read_bytes()
        status, start, end = 200, 0, len(data)
        m = _RANGE.match(h.headers.get("Range", ""))
        if m and not self.b.ignore_range:
            start = int(m.group(1))
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            if start >= len(data):
                return self.reply(h, 416, {"Content-Range": f"bytes */{len(data)}"})
            status = 206
        headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if cut is not None:
            h.send_header("Connection", "close")
        h.end_headers()
        if not body:
            return None
        chunk = data[start:end]
        if cut is not None:
            h.wfile.write(chunk[:cut])
            h.wfile.flush()
            h.close_connection = True
            return None
        h.wfile.write(chunk)
        return None

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()


def write_sums(folder: Path) -> bytes:
    """``SHA256SUMS`` of every file under ``folder``, written by the real ``sha256sum`` (``./`` names, as
    ``find . -type f -exec sha256sum {} +`` writes them)."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    out = subprocess.run(["sha256sum", *[f"./{n}" for n in names]], cwd=folder, check=True, capture_output=True)
    (folder / "SHA256SUMS").write_bytes(out.stdout)
    return out.stdout


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FolderServer, Path]]:
    """A generated model (shards, index, config, tokenizer, one file in a subfolder) at ``/models/x/``."""
    www = tmp_path / "www"
    src = www / "models" / "x"
    make_sharded_model(src, 3, 200_000)
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("a file in a subfolder\n")
    write_sums(src)
    with FolderServer(www) as server:
        yield server, src


def source(server: FolderServer, folder: str = "models/x/", **kw: Any) -> HTTPSource:
    got = open_source(parse_uri(server.url + folder), retry=kw.pop("retry", FAST), **kw)
    assert isinstance(got, HTTPSource)
    return got


def model_files(src: Path) -> dict[str, bytes]:
    return {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}


def assert_same(dest: Path, src: Path) -> None:
    for name, data in model_files(src).items():
        assert (dest / name).read_bytes() == data, name
    assert not (dest / "SHA256SUMS").exists(), "SHA256SUMS is the listing, not a model file"


def pull(server: FolderServer, root: Path, *, options: EngineOptions | None = None, **kw: Any) -> Any:
    src = source(server, **kw)
    try:
        return engine.pull(src, root / "x", models_root=root, writer="test", options=options)
    finally:
        src.close()


# -- the CLI, as a user runs it ------------------------------------------------------------------


def test_modelherd_pull_of_a_folder_url_places_the_verified_model(served: tuple[FolderServer, Path],
                                                                  tmp_path: Path) -> None:
    server, src = served
    root = tmp_path / "models"
    root.mkdir()
    url = server.url + "models/x/"
    r = run_cli("pull", url, "--models-root", str(root), "--dest", str(root / "x"), "--storage-mode", "local",
                "--coordination", "none", "--no-progress")
    assert r.returncode == 0, r.stderr
    ready = json.loads(r.stdout.strip().splitlines()[-1])
    assert ready["status"] == "Ready" and ready["uri"] == url
    assert ready["revision"] == hashlib.sha256((src / "SHA256SUMS").read_bytes()).hexdigest()
    assert ready["files"] == len(model_files(src))
    assert_same(root / "x", src)

    # the same folder again: the published copy is Ready without a body byte
    server.b.seen.clear()
    again = run_cli("pull", url, "--models-root", str(root), "--dest", str(root / "x"), "--storage-mode", "local",
                    "--coordination", "none", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert not [s for s in server.b.seen if s[0] == "GET" and not s[1].endswith("SHA256SUMS")]


def test_modelherd_pull_refuses_plain_http_to_a_remote_host(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    r = run_cli("pull", "http://models.example.com/x/", "--models-root", str(root), "--storage-mode", "local",
                "--coordination", "none", "--no-progress")
    assert r.returncode == ConfigError.exit_code, r.stdout + r.stderr
    assert "plain http://" in r.stderr and "https://" in r.stderr
    bad = run_cli("pull", "https://models.example.com/x", "--models-root", str(root), "--no-progress")
    assert bad.returncode == ConfigError.exit_code
    assert "ends with '/'" in bad.stderr


# -- listing --------------------------------------------------------------------------------------


def test_listing_has_every_file_of_sha256sums_with_size_and_sha256(served: tuple[FolderServer, Path]) -> None:
    server, src = served
    s = source(server)
    listing = s.list_files()
    assert listing.revision == hashlib.sha256((src / "SHA256SUMS").read_bytes()).hexdigest()
    got = {f.path: (f.size, f.checksums["sha256"]) for f in listing.files}
    assert got == {n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in model_files(src).items()}
    assert len(server.requests("HEAD", "models/x/extra/notes.txt")) == 1
    s.close()


@pytest.mark.parametrize("head_status", [405, 403])
def test_sizes_come_from_a_ranged_get_when_head_is_refused(served: tuple[FolderServer, Path], head_status: int) -> None:
    server, src = served
    server.b.head_status = head_status
    (src / "empty.bin").write_bytes(b"")
    write_sums(src)
    listing = source(server).list_files()
    assert {f.path: f.size for f in listing.files} == {n: len(d) for n, d in model_files(src).items()}
    assert server.requests("GET", "models/x/config.json")[0]["range"] == "bytes=0-0"


def test_a_changed_sha256sums_is_a_new_revision(served: tuple[FolderServer, Path]) -> None:
    server, src = served
    first = source(server).list_files().revision
    (src / "config.json").write_text('{"changed": true}')
    write_sums(src)
    assert source(server).list_files().revision != first


def test_missing_or_malformed_sha256sums_is_a_clear_error(served: tuple[FolderServer, Path]) -> None:
    server, src = served
    with pytest.raises(SourceNotFoundError, match="not found") as missing:
        source(server, "models/nothing-here/").list_files()
    assert "sha256sum" in str(missing.value)
    (src / "SHA256SUMS").write_text("")
    with pytest.raises(MalformedListingError, match="is empty"):
        source(server).list_files()
    (src / "SHA256SUMS").write_text("0123 config.json\n")
    with pytest.raises(MalformedListingError, match="line 1 is not sha256sum output"):
        source(server).list_files()


def test_a_name_escaping_the_folder_is_refused_before_any_file_is_fetched(served: tuple[FolderServer, Path],
                                                                          tmp_path: Path) -> None:
    server, src = served
    (src.parent / "secret").write_text("outside")
    sums = (src / "SHA256SUMS").read_text() + f"{hashlib.sha256(b'outside').hexdigest()}  ../secret\n"
    (src / "SHA256SUMS").write_text(sums)
    root = tmp_path / "models"
    root.mkdir()
    with pytest.raises(UnsafePathError, match=r"'\.\.'") as err:
        pull(server, root)
    assert "SHA256SUMS" in str(err.value)
    assert not [s for s in server.b.seen if s[0] == "GET" and not s[1].endswith("SHA256SUMS")]
    assert not (root / "x").exists() and not (root / "secret").exists()


def test_a_file_the_server_does_not_have_is_not_found(served: tuple[FolderServer, Path], tmp_path: Path) -> None:
    server, _ = served
    server.b.missing.add("models/x/config.json")
    root = tmp_path / "models"
    root.mkdir()
    with pytest.raises(SourceNotFoundError, match=r"config\.json") as err:
        pull(server, root)
    assert "no such file" in str(err.value)
    assert not (root / "x").exists()


# -- bodies: verification, faults, ranges ----------------------------------------------------------


def test_bytes_that_do_not_match_sha256sums_are_never_published(served: tuple[FolderServer, Path],
                                                                tmp_path: Path) -> None:
    server, src = served
    shard = src / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))  # SHA256SUMS still has the old digest
    root = tmp_path / "models"
    root.mkdir()
    with pytest.raises(VerificationError) as err:
        pull(server, root)
    assert "model-00002-of-00003.safetensors" in str(err.value) + " ".join(err.value.problems)
    assert not (root / "x").exists(), "nothing may be published"


def test_429_with_retry_after_is_waited_for(served: tuple[FolderServer, Path], tmp_path: Path) -> None:
    server, src = served
    server.b.throttle["models/x/SHA256SUMS"] = [0.6]
    server.b.throttle["models/x/config.json"] = [0.6]
    started = time.monotonic()
    listing = source(server).list_files()
    assert time.monotonic() - started >= 1.1, "both Retry-After waits were honoured"
    assert {f.path for f in listing.files} == set(model_files(src))
    server.b.throttle["models/x/tokenizer.json"] = [30.0] * 10
    with pytest.raises(RateLimitedError) as err:
        source(server, retry=RetryPolicy(retries=1, backoff_s=0.01, retry_after_max_s=0.1)).list_files()
    assert err.value.retry_after == 30.0


def test_a_truncated_body_is_resumed_with_a_range_from_the_last_byte(served: tuple[FolderServer, Path],
                                                                     tmp_path: Path) -> None:
    server, src = served
    name = "models/x/model-00001-of-00003.safetensors"
    server.b.truncate[name] = [50_000]
    root = tmp_path / "models"
    root.mkdir()
    pull(server, root)
    assert_same(root / "x", src)
    gets = server.requests("GET", name)
    assert len(gets) == 2 and gets[1]["range"].startswith("bytes=")
    assert 0 < int(gets[1]["range"][6:].split("-")[0]) <= 50_000


def test_a_body_that_always_ends_early_is_a_transient_error(served: tuple[FolderServer, Path]) -> None:
    server, _ = served
    s = source(server)
    f = next(f for f in s.list_files().files if f.path == "tokenizer.json")
    server.b.truncate["models/x/tokenizer.json"] = [10]
    with pytest.raises(TransientSourceError, match=r"early|Protocol|Incomplete"):
        read_all(s.open(f))


def test_a_server_ignoring_range_still_gives_exact_bytes(served: tuple[FolderServer, Path], tmp_path: Path) -> None:
    server, src = served
    server.b.ignore_range = True
    s = source(server)
    f = next(f for f in s.list_files().files if f.path == "model-00003-of-00003.safetensors")
    data = (src / f.path).read_bytes()
    assert read_all(s.open(f, 1234, 98_765)) == data[1234:98_765]
    assert read_all(s.open(f, 5)) == data[5:]
    # a multipart pull (ranged parts) from that server: every part skips to its start
    root = tmp_path / "models"
    root.mkdir()
    pull(server, root, options=EngineOptions(part_size=64 * 1024, multipart_threshold=64 * 1024))
    assert_same(root / "x", src)


def test_the_token_goes_to_the_folder_origin_only(served: tuple[FolderServer, Path], tmp_path: Path) -> None:
    server, src = served
    with FolderServer(server.root) as cdn:  # another port: another origin
        server.b.redirect_to = cdn.url
        root = tmp_path / "models"
        root.mkdir()
        pull(server, root, http_token="s3cr3t-token")
        assert_same(root / "x", src)
        assert server.requests("GET", "models/x/SHA256SUMS")[0]["authorization"] == "Bearer s3cr3t-token"
        assert all("authorization" not in h for _, _, h in cdn.b.seen)
        assert cdn.requests("GET", "models/x/config.json"), "the redirect was followed"


def test_plain_http_only_to_loopback_or_listed_hosts() -> None:
    with pytest.raises(ConfigError, match="plain http://"):
        open_source(parse_uri("http://models.example.com/x/"))
    listed = open_source(parse_uri("http://models.example.com/x/"), http_insecure_hosts=["models.example.com"])
    assert isinstance(listed, HTTPSource)
    for host in ("localhost", "127.0.0.2", "[::1]"):
        assert isinstance(open_source(parse_uri(f"http://{host}:8080/x/")), HTTPSource)


def test_a_redirect_to_plain_http_elsewhere_is_refused(served: tuple[FolderServer, Path]) -> None:
    server, _ = served
    server.b.redirect_to = "http://models.example.com/"
    s = source(server)
    with pytest.raises(ConfigError, match="plain http://"):
        s.list_files()
    assert not any(h.get("host", "").startswith("models.example.com") for _, _, h in server.b.seen)


# -- the agent's policy: a CR's URL never reaches the node's own services unlisted ------------------------------


def test_without_trust_in_loopback_plain_http_goes_only_to_listed_hosts(served: tuple[FolderServer, Path]) -> None:
    server, _ = served
    netloc = server.url.split("/")[2]  # 127.0.0.1:PORT
    with pytest.raises(ConfigError, match="not listed"):
        source(server, trust_loopback=False)
    with pytest.raises(ConfigError, match="not listed"):
        source(server, trust_loopback=False, http_insecure_hosts=["127.0.0.1:1"])  # another port of it
    assert not server.b.seen, "refused before any request"
    listed = source(server, trust_loopback=False, http_insecure_hosts=[netloc])
    assert len(listed.list_files().files) == len(model_files(served[1]))


def test_a_redirect_to_another_loopback_service_is_refused_when_loopback_is_not_trusted(
        served: tuple[FolderServer, Path], tmp_path: Path) -> None:
    """The listed server (a tenant's) redirects every file to a service on the node's loopback (kubelet's read-only
    port, an exporter, the agent's own /metrics): no request reaches it."""
    server, _ = served
    (tmp_path / "node-service" / "models" / "x").mkdir(parents=True)
    with FolderServer(tmp_path / "node-service") as node_service:
        server.b.redirect_to = node_service.url.replace("127.0.0.1", "localhost")
        s = source(server, trust_loopback=False, http_insecure_hosts=[server.url.split("/")[2]])
        with pytest.raises(ConfigError, match="not listed"):
            s.list_files()
        assert not node_service.b.seen
