"""HFSource against the loopback Hub, through the real huggingface_hub client and urllib3."""

from __future__ import annotations

import email.utils
import hashlib
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import urllib3
from modelherd.storage.errors import (
    AuthError,
    RateLimitedError,
    SourceNotFoundError,
    TransientSourceError,
    UnsafePathError,
)
from modelherd.storage.hashing import new_hasher
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.sources.hf import HFSource
from modelherd.storage.types import RemoteFile
from modelherd.storage.uri import parse_uri

from tests import support
from tests.hub_fixtures import HUB_TOKEN, LFS_MIN_SIZE, make_small_model
from tests.hubserver import HubServer

FAST = RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05)
NO_RETRY = RetryPolicy(retries=0)


def source(hub: HubServer, uri: str, **kw: object) -> HFSource:
    kw.setdefault("retry", FAST)
    return HFSource(parse_uri(uri), endpoint=hub.endpoint, **kw)  # type: ignore[arg-type]


def read_all(src: HFSource, f: RemoteFile, start: int = 0, end: int | None = None, bufsize: int = 65536) -> bytes:
    return support.read_all(src.open(f, start, end), chunk=bufsize)


def by_path(files: tuple[RemoteFile, ...]) -> dict[str, RemoteFile]:
    return {f.path: f for f in files}


@pytest.fixture
def repo(hub_server: HubServer, small_model: Path) -> str:
    return hub_server.add_repo("org/small", small_model, lfs_min_size=LFS_MIN_SIZE)


# -- listing -----------------------------------------------------------------------------------


def test_listing_resolves_main_to_the_commit_with_correct_sizes_and_checksums(
        hub_server: HubServer, small_model: Path, repo: str) -> None:
    src = source(hub_server, "hf://org/small")
    listing = src.list_files()
    assert listing.revision == repo
    files = by_path(listing.files)
    assert sorted(files) == ["config.json", "model.safetensors", "sub/extra.bin", "tokenizer.json"]
    for rel, f in files.items():
        data = (small_model / rel).read_bytes()
        assert f.size == len(data)
        if len(data) >= LFS_MIN_SIZE:
            assert f.checksums == {"sha256": hashlib.sha256(data).hexdigest()}
        else:
            h = new_hasher("git-sha1", len(data))
            h.update(data)
            assert f.checksums == {"git-sha1": h.hexdigest()}
        assert f.locator == f"{hub_server.endpoint}/org/small/resolve/{repo}/{rel}"
    assert listing.total_bytes == sum(p.stat().st_size for p in small_model.rglob("*") if p.is_file())


def test_revision_pins_the_listing_to_that_revision(hub_server: HubServer, tmp_path: Path) -> None:
    v1 = hub_server.add_repo("org/pinned", make_small_model(tmp_path / "v1", seed=1), revision="v1")
    v2_dir = make_small_model(tmp_path / "v2", seed=2)
    (v2_dir / "added-in-v2.txt").write_text("new")
    main = hub_server.add_repo("org/pinned", v2_dir, revision="main")
    assert v1 != main

    old = source(hub_server, "hf://org/pinned@v1").list_files()
    assert old.revision == v1
    assert "added-in-v2.txt" not in by_path(old.files)
    new = source(hub_server, "hf://org/pinned").list_files()
    assert new.revision == main
    assert "added-in-v2.txt" in by_path(new.files)
    assert by_path(old.files)["config.json"].checksums != by_path(new.files)["config.json"].checksums

    # a commit sha is used as-is: no model_info request, straight to the tree
    hub_server.reset_counters()
    pinned = source(hub_server, f"hf://org/pinned@{v1}").list_files()
    assert pinned.revision == v1 and by_path(pinned.files) == by_path(old.files)
    assert hub_server.requests["model_info"] == 0


def test_allow_and_ignore_patterns_filter_the_listing(hub_server: HubServer, repo: str) -> None:
    only_json = source(hub_server, "hf://org/small", allow_patterns=["*.json"]).list_files()
    assert sorted(by_path(only_json.files)) == ["config.json", "tokenizer.json"]
    no_sub = source(hub_server, "hf://org/small", ignore_patterns=["sub/*", "tokenizer.*"]).list_files()
    assert sorted(by_path(no_sub.files)) == ["config.json", "model.safetensors"]
    both = source(hub_server, "hf://org/small", allow_patterns=["*.json", "*.safetensors"],
                  ignore_patterns=["config.json"]).list_files()
    assert sorted(by_path(both.files)) == ["model.safetensors", "tokenizer.json"]


def test_listing_follows_every_page_of_a_large_tree(hub_server: HubServer) -> None:
    names = {f"shards/part-{i:04d}.txt": f"file {i}".encode() for i in range(120)}
    hub_server.add_files("org/many", names)
    listing = source(hub_server, "hf://org/many").list_files()
    assert sorted(by_path(listing.files)) == sorted(names)
    # 120 files + 1 directory entry, 50 per page -> 3 pages
    assert hub_server.requests["tree"] == 3


def test_unknown_repo_is_source_not_found(hub_server: HubServer) -> None:
    with pytest.raises(SourceNotFoundError) as ei:
        source(hub_server, "hf://org/does-not-exist").list_files()
    assert ei.value.hint


def test_unknown_revision_is_source_not_found(hub_server: HubServer, repo: str) -> None:
    with pytest.raises(SourceNotFoundError):
        source(hub_server, "hf://org/small@no-such-branch").list_files()


@pytest.mark.parametrize("gated", [False, True], ids=["private", "gated"])
def test_missing_or_wrong_token_is_auth_error_without_the_token(
        hub_server: HubServer, small_model: Path, gated: bool, caplog: pytest.LogCaptureFixture) -> None:
    hub_server.add_repo("org/private", small_model, token=HUB_TOKEN, gated=gated)
    caplog.set_level(logging.DEBUG)
    for token in (None, HUB_TOKEN[::-1]):
        src = source(hub_server, "hf://org/private", token=token)
        with pytest.raises(AuthError) as ei:
            src.list_files()
        assert "HF_TOKEN" in (ei.value.hint or "")
        for text in (str(ei.value), repr(ei.value), repr(src), caplog.text):
            assert HUB_TOKEN not in text and HUB_TOKEN[::-1] not in text
    # no token: 401; a wrong token: 403 -- both refused before any retry
    assert [r.status for r in hub_server.request_log] == [401, 403]

    ok = source(hub_server, "hf://org/private", token=HUB_TOKEN).list_files()
    assert len(ok.files) == 4


def test_open_with_a_wrong_token_is_auth_error_without_the_token(
        hub_server: HubServer, small_model: Path) -> None:
    hub_server.add_repo("org/private", small_model, token=HUB_TOKEN)
    f = by_path(source(hub_server, "hf://org/private", token=HUB_TOKEN).list_files().files)["config.json"]
    bad = "hf_wrong_" + HUB_TOKEN
    with pytest.raises(AuthError) as ei:
        source(hub_server, "hf://org/private", token=bad).open(f)
    assert bad not in str(ei.value) and HUB_TOKEN not in str(ei.value)


def test_rate_limit_with_retry_after_seconds_is_honoured_then_succeeds(hub_server: HubServer, repo: str) -> None:
    hub_server.fail("model_info", 429, times=2, retry_after="1")
    t0 = time.monotonic()
    listing = source(hub_server, "hf://org/small").list_files()
    elapsed = time.monotonic() - t0
    assert listing.revision == repo
    assert hub_server.requests["model_info"] == 3
    assert elapsed >= 2.0  # two waits of at least Retry-After: 1, although the backoff is ~10 ms


def test_rate_limit_with_retry_after_http_date_is_honoured_on_open(hub_server: HubServer, repo: str) -> None:
    src = source(hub_server, "hf://org/small")
    f = by_path(src.list_files().files)["config.json"]
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    hub_server.fail("resolve", 503, times=1, retry_after=when)
    with pytest.raises(RateLimitedError) as ei:
        src.open(f)
    assert ei.value.retry_after is not None and 0.5 <= ei.value.retry_after <= 2.0


def test_rate_limit_after_all_retries_is_rate_limited_error(hub_server: HubServer, repo: str) -> None:
    hub_server.fail("model_info", 429, times=None, retry_after="0")
    with pytest.raises(RateLimitedError):
        source(hub_server, "hf://org/small", retry=RetryPolicy(retries=2, backoff_s=0.01)).list_files()
    assert hub_server.requests["model_info"] == 3


def test_server_error_is_transient_and_retried(hub_server: HubServer, repo: str) -> None:
    hub_server.fail("model_info", 500, times=1)
    assert source(hub_server, "hf://org/small").list_files().revision == repo
    src = source(hub_server, "hf://org/small")
    f = by_path(src.list_files().files)["config.json"]
    hub_server.fail("resolve", 502, times=1)
    with pytest.raises(TransientSourceError):
        src.open(f)


def test_connection_refused_is_transient(tmp_path: Path) -> None:
    hub = HubServer()
    endpoint = hub.endpoint
    hub.stop()  # port now closed
    src = HFSource(parse_uri("hf://org/small"), endpoint=endpoint, retry=NO_RETRY)
    with pytest.raises(TransientSourceError):
        src.list_files()
    f = RemoteFile("a.bin", 10, {}, f"{endpoint}/org/small/resolve/main/a.bin")
    with pytest.raises(TransientSourceError):
        src.open(f)


def test_malicious_tree_names_are_refused(hub_server: HubServer) -> None:
    for i, name in enumerate(["../evil", "/abs/path", "a/../../evil", "dir\\evil"]):
        hub_server.add_files(f"org/evil{i}", {"ok.txt": b"fine", name: b"pwned"})
        with pytest.raises(UnsafePathError):
            source(hub_server, f"hf://org/evil{i}").list_files()


# -- bodies ------------------------------------------------------------------------------------


def test_whole_and_ranged_reads_return_exactly_the_requested_bytes(
        hub_server: HubServer, small_model: Path, repo: str) -> None:
    src = source(hub_server, "hf://org/small", token=HUB_TOKEN)
    files = by_path(src.list_files().files)
    big = files["model.safetensors"]
    data = (small_model / "model.safetensors").read_bytes()
    assert read_all(src, big) == data
    for start, end in [(0, 1), (1, 2), (12345, 1_000_000), (big.size - 7, None), (0, big.size), (5, 5)]:
        assert read_all(src, big, start, end, bufsize=4096) == data[start:end], (start, end)
    small = files["sub/extra.bin"]
    small_data = (small_model / "sub/extra.bin").read_bytes()
    assert read_all(src, small, 100, 200) == small_data[100:200]
    # the LFS body came from the CDN host after a 302; small files from the API host
    cdn = [r for r in hub_server.request_log if r.host == "cdn"]
    assert cdn and all(r.path.startswith("/org/small/model.safetensors") for r in cdn)
    assert all(r.headers.get("range") for r in cdn if r.status == 206)
    assert {r.status for r in hub_server.request_log if r.host == "api" and "resolve" in r.path} >= {302, 206}
    src.close()


def test_token_reaches_the_api_host_but_never_the_cdn_host(
        hub_server: HubServer, small_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub_server.add_repo("org/private", small_model, token=HUB_TOKEN)
    src = source(hub_server, "hf://org/private", token=HUB_TOKEN)
    for f in src.list_files().files:
        read_all(src, f)
    api = [r for r in hub_server.request_log if r.host == "api"]
    cdn = [r for r in hub_server.request_log if r.host == "cdn"]
    assert api and cdn
    assert all(r.headers.get("authorization") == f"Bearer {HUB_TOKEN}" for r in api)
    for r in cdn:
        assert not any(HUB_TOKEN in v for v in r.headers.values())
        assert "authorization" not in r.headers
    assert all(r.headers.get("user-agent", "").startswith("modelherd/") for r in hub_server.request_log
               if "resolve" in r.path or r.host == "cdn")
    assert caplog.records and HUB_TOKEN not in caplog.text  # urllib3/httpx debug logs ran, without the token


def test_bytes_served_counts_every_body_byte_once(hub_server: HubServer, small_model: Path, repo: str) -> None:
    src = source(hub_server, "hf://org/small")
    listing = src.list_files()
    for f in listing.files:
        read_all(src, f)
    assert hub_server.bytes_served == listing.total_bytes


def test_truncated_body_is_transient_not_silent_eof(hub_server: HubServer, repo: str) -> None:
    src = source(hub_server, "hf://org/small")
    files = by_path(src.list_files().files)
    hub_server.truncate("cdn", keep_bytes=100_000, times=1)
    with pytest.raises(TransientSourceError):
        read_all(src, files["model.safetensors"])
    hub_server.truncate("resolve", keep_bytes=10, times=1, path="extra.bin")
    with pytest.raises(TransientSourceError):
        read_all(src, files["sub/extra.bin"], 0, 1000)
    # the next attempt (a fresh connection from the same pool) gets the whole body
    assert len(read_all(src, files["model.safetensors"])) == files["model.safetensors"].size


def test_wrong_content_range_is_refused(hub_server: HubServer, repo: str) -> None:
    src = source(hub_server, "hf://org/small")
    f = by_path(src.list_files().files)["model.safetensors"]
    wrong = RemoteFile(f.path, f.size + 10, f.checksums, f.locator)  # listing says a different size
    with pytest.raises(TransientSourceError, match="Content-Range"):
        src.open(wrong, 100, 200)


def test_missing_file_is_source_not_found(hub_server: HubServer, repo: str) -> None:
    src = source(hub_server, "hf://org/small")
    f = RemoteFile("nope.bin", 3, {}, f"{hub_server.endpoint}/org/small/resolve/{repo}/nope.bin")
    with pytest.raises(SourceNotFoundError):
        src.open(f)


def test_corrupted_body_is_delivered_as_sent(hub_server: HubServer, small_model: Path, repo: str) -> None:
    """The source does not hide a flipped byte: the engine's checksum is what catches it."""
    src = source(hub_server, "hf://org/small")
    f = by_path(src.list_files().files)["model.safetensors"]
    hub_server.corrupt("cdn", flip_at=10)
    got = read_all(src, f)
    want = (small_model / "model.safetensors").read_bytes()
    assert len(got) == len(want) and got != want and got[10] == want[10] ^ 1


def test_server_ignoring_range_still_yields_the_requested_bytes(tmp_path: Path, small_model: Path) -> None:
    """A CDN that answers 200 to a ranged GET: the source skips to ``start`` and stops at ``end``."""
    import http.server
    import threading

    data = (small_model / "model.safetensors").read_bytes()

    class Plain(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/m"
        src = HFSource(parse_uri("hf://org/x"), endpoint=url, retry=NO_RETRY)
        f = RemoteFile("model.safetensors", len(data), {}, url)
        assert read_all(src, f, 1000, 5000) == data[1000:5000]
        assert read_all(src, f, 0, 10) == data[:10]
        assert read_all(src, f) == data
    finally:
        srv.shutdown()
        srv.server_close()


def test_redirect_to_an_external_file_server(tmp_path: Path, small_model: Path) -> None:
    """``redirect_base``: LFS bodies come from another static server laid out as {repo}/{path}."""
    with HubServer() as cdn_host:  # stands in for nginx: serves /org/small/model.safetensors
        cdn_host.add_repo("org/small", small_model)
        with HubServer(redirect_base=cdn_host.cdn_base) as hub:
            hub.add_repo("org/small", small_model)
            src = source(hub, "hf://org/small")
            f = by_path(src.list_files().files)["model.safetensors"]
            assert read_all(src, f, 10, 20) == (small_model / "model.safetensors").read_bytes()[10:20]
            assert cdn_host.bytes_served == 10 and hub.bytes_served == 0


def test_hubserver_runs_as_a_process(tmp_path: Path, small_model: Path) -> None:
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hubserver", "--repo", f"org/proc={small_model}", "--print-port",
         "--stats-file", str(stats)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        src = HFSource(parse_uri("hf://org/proc"), endpoint=endpoint, retry=FAST)
        f = by_path(src.list_files().files)["model.safetensors"]
        assert read_all(src, f, 0, 100) == (small_model / "model.safetensors").read_bytes()[:100]
        served = urllib3.request("GET", f"{endpoint}/_stats").json()
        assert served["bytes_served"] == 100
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert '"bytes_served": 100' in stats.read_text()


def test_hubserver_speaks_the_api_that_huggingface_hub_downloads_with(
        hub_server: HubServer, small_model: Path, tmp_path: Path) -> None:
    """Fidelity check of the fake: the stock client's download and tree calls work against it."""
    from huggingface_hub import HfApi, hf_hub_download

    sha = hub_server.add_repo("org/small", small_model, token=HUB_TOKEN)
    for name in ("model.safetensors", "sub/extra.bin"):
        got = hf_hub_download("org/small", name, endpoint=hub_server.endpoint, token=HUB_TOKEN,
                              local_dir=tmp_path / "dl")
        assert Path(got).read_bytes() == (small_model / name).read_bytes()
    api = HfApi(endpoint=hub_server.endpoint, token=HUB_TOKEN)
    top = {e.path for e in api.list_repo_tree("org/small", revision=sha)}
    assert top == {"config.json", "tokenizer.json", "model.safetensors", "sub"}
    assert {e.path for e in api.list_repo_tree("org/small", "sub", revision=sha)} == {"sub/extra.bin"}
    info = api.model_info("org/small", files_metadata=True)
    assert info.sha == sha and {s.rfilename: s.size for s in info.siblings or []}["sub/extra.bin"] == 10_000


@pytest.mark.parametrize("tree", [
    b'{"not": "a list"}',
    b'[{"type": "file", "path": "a.bin", "oid": "0123"}]',  # no size
    b'[{"type": "file", "path": "a.bin", "size": 3, "oid": "0123", "lfs": {"size": 3}}]',  # lfs without oid
    b'[{"type": "file", "path": "a.bin", "size": true, "oid": "0123"}]',
])
def test_a_malformed_api_answer_is_a_clear_source_error(tree: bytes) -> None:
    import http.server
    import threading

    from modelherd.storage.errors import SourceError

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"sha": "' + b"a" * 40 + b'"}' if "/revision/" in self.path else tree
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        src = HFSource(parse_uri("hf://org/m"), endpoint=f"http://127.0.0.1:{srv.server_address[1]}",
                       retry=NO_RETRY)
        with pytest.raises(SourceError, match=r"does not answer like the Hub API|no valid"):
            src.list_files()
    finally:
        srv.shutdown()
        srv.server_close()
