"""Hostile and unlucky origins: Retry-After without end, pagination loops and cross-origin links, redirects to
non-HTTP schemes, huge listings, cancellation during back-offs, and counters that never lag the client.

Everything runs against the real loopback servers (tests/hubserver.py, tests/ociserver.py, tests/rangeserver.py)
through the real sources, the real engine and, for SIGTERM, a real ``modelherd pull`` process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from modelherd.coordination.filelease import list_file_leases
from modelherd.storage import engine
from modelherd.storage.errors import CancelledError, RateLimitedError, SourceError, TransientSourceError
from modelherd.storage.options import EngineOptions
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.sources.hf import HFSource
from modelherd.storage.sources.oci import OCISource
from modelherd.storage.uri import parse_uri

from tests import support
from tests.hub_fixtures import HUB_TOKEN, LFS_MIN_SIZE
from tests.hubserver import HubServer
from tests.integration import test_coordinated_pull as coordinated
from tests.k8s_fixtures import KubeCluster
from tests.oci_fixtures import OCIUserConfig
from tests.ociserver import Faults, OCIObjectServer
from tests.rangeserver import RangeServer, RangeSource, make_model

FAST = RetryPolicy(retries=3, backoff_s=0.01, backoff_max_s=0.05)
FOREVER = ["999999999", "inf", "1e309", "Fri, 31 Dec 9999 23:59:59 GMT"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def hf(hub: HubServer, uri: str, **kw: object) -> HFSource:
    kw.setdefault("retry", FAST)
    return HFSource(parse_uri(uri), endpoint=hub.endpoint, **kw)  # type: ignore[arg-type]


def cancel_after(seconds: float) -> threading.Event:
    event = threading.Event()
    threading.Timer(seconds, event.set).start()
    return event


@pytest.fixture
def repo(hub_server: HubServer, small_model: Path) -> str:
    return hub_server.add_repo("org/small", small_model, lfs_min_size=LFS_MIN_SIZE)


# -- Retry-After -------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("retry_after", FOREVER)
def test_an_endless_retry_after_is_capped_and_spends_a_retry(hub_server: HubServer, repo: str,
                                                             retry_after: str) -> None:
    hub_server.fail("model_info", 429, times=None, retry_after=retry_after)
    policy = RetryPolicy(retries=2, backoff_s=0.01, backoff_max_s=0.02, retry_after_max_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(RateLimitedError):
        hf(hub_server, "hf://org/small", retry=policy).list_files()
    took = time.monotonic() - t0
    assert hub_server.requests["model_info"] == 3  # each 429 spent one of the two retries
    assert 0.4 <= took < 5, f"two capped waits of 0.2 s took {took:.2f}s"


@pytest.mark.timeout(30)
def test_cancel_ends_a_listing_back_off_at_once(hub_server: HubServer, repo: str) -> None:
    hub_server.fail("model_info", 429, times=None, retry_after="999999999")
    src = hf(hub_server, "hf://org/small", retry=RetryPolicy(), cancel=cancel_after(0.3))
    t0 = time.monotonic()
    with pytest.raises(CancelledError):
        src.list_files()
    assert time.monotonic() - t0 < 1.5
    assert hub_server.requests["model_info"] == 1  # no attempt after the cancel


@pytest.mark.timeout(60)
def test_cancel_ends_an_oci_listing_back_off_at_once(oci_server: OCIObjectServer,
                                                     oci_user_config: OCIUserConfig) -> None:
    oci_server.put_object("testns", "models", "llama/config.json", b"{}")
    oci_server.list_faults = Faults(status_429=100, retry_after="999999999")
    src = OCISource(parse_uri("oci://n/testns/b/models/o/llama/"), auth="user",
                    config_file=str(oci_user_config.path), profile=oci_user_config.profile,
                    endpoint=oci_server.url, retry=RetryPolicy(), cancel=cancel_after(0.5))
    t0 = time.monotonic()
    with pytest.raises(CancelledError):
        src.list_files()
    assert time.monotonic() - t0 < 2.0
    assert oci_server.requests["list"] == 1


def _lease_holders(root: Path) -> list[str]:
    return [r.holder for r in list_file_leases(root)]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("coordination", ["none", "file"])
@pytest.mark.parametrize("endpoint", ["model_info", "cdn"])
def test_sigterm_ends_a_pull_sleeping_on_retry_after_and_releases_its_lease(
        hub_server: HubServer, small_model: Path, tmp_path: Path, coordination: str, endpoint: str) -> None:
    """A Hub answering 429 + ``Retry-After: 999999999`` (to the listing, or to a body): SIGTERM -> exit 130 within
    about a second; a coordinated holder has released its lease (the record names no holder)."""
    hub_server.add_repo("org/small", small_model, lfs_min_size=LFS_MIN_SIZE)
    hub_server.fail(endpoint, 429, times=None, retry_after="999999999")
    root = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    env["HF_ENDPOINT"] = hub_server.endpoint
    proc = subprocess.Popen([sys.executable, "-m", "modelherd.agent.cli", "pull", "hf://org/small",
                             "--models-root", str(root), "--no-progress", "--coordination", coordination,
                             "--storage-mode", "shared"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 60
        while hub_server.requests[endpoint] < 1:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the pull never reached the 429"
            time.sleep(0.05)
        time.sleep(0.5)  # now it sleeps in the back-off (the first of five 300-second waits)
        assert proc.poll() is None
        if coordination == "file":
            assert _lease_holders(root) == [os.uname().nodename], "the holder holds its lease while it waits"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert took < 2.0, f"SIGTERM took {took:.2f}s to end the pull"
    assert "Traceback" not in err
    if coordination == "file":
        assert _lease_holders(root) == [""], "a cancelled holder must release its lease"


@pytest.mark.k8s
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_sigterm_releases_a_kubernetes_lease_held_while_sleeping_on_retry_after(
        hub_server: HubServer, small_model: Path, tmp_path: Path, kube_cluster: KubeCluster,
        kube_namespace: str) -> None:
    hub_server.add_repo(coordinated.REPO, small_model, lfs_min_size=LFS_MIN_SIZE)
    hub_server.fail("model_info", 429, times=None, retry_after="999999999")
    root = tmp_path / "models"
    root.mkdir()
    herd = coordinated.Herd("kubernetes", root, hub_server, kube_namespace, kube_cluster.kubeconfig,
                            duration_s=15, renew_s=2)
    try:
        proc = herd.start("node-a")
        herd.wait_for(lambda r: r.holder == "node-a", timeout=120)
        deadline = time.monotonic() + 60
        while hub_server.requests["model_info"] < 1:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
        assert proc.returncode == 130, herd.logs["node-a"].read_text()
        assert took < 2.0, f"SIGTERM took {took:.2f}s to end the pull"
        record = herd.lease().observe()
        assert record is not None and not record.held, "a cancelled holder must release its Lease"
    finally:
        herd.kill_all()


# -- pagination --------------------------------------------------------------------------------------------
def _tree_url(sha: str, repo: str = "org/small") -> str:
    return f"{{endpoint}}/api/models/{repo}/tree/{sha}?recursive=true&expand=false"


@pytest.mark.timeout(30)
def test_a_link_back_to_the_first_page_is_a_loop_caught_at_once(hub_server: HubServer, repo: str) -> None:
    hub_server.link(f'<{_tree_url(repo)}>; rel="next"', times=None)
    with pytest.raises(SourceError, match="loop"):
        hf(hub_server, f"hf://org/small@{repo}").list_files()
    assert hub_server.requests["tree"] == 1


@pytest.mark.timeout(30)
def test_a_link_that_repeats_a_later_page_is_a_loop_caught_at_once(hub_server: HubServer, repo: str) -> None:
    page2 = _tree_url(repo) + "&cursor=2"
    hub_server.page_size = 2
    hub_server.link(f'<{page2}>; rel="next"', times=None)
    with pytest.raises(SourceError, match="loop"):
        hf(hub_server, f"hf://org/small@{repo}").list_files()
    assert hub_server.requests["tree"] == 2  # page 1, page 2, and page 2 again is never requested


def test_a_link_to_another_origin_gets_no_token(hub_server: HubServer, small_model: Path) -> None:
    sha = hub_server.add_repo("org/small", small_model, lfs_min_size=LFS_MIN_SIZE, token=HUB_TOKEN)
    with HubServer() as other:
        other_sha = other.add_generated("org/small", 3, names=lambda i: f"elsewhere/{i}.json")
        hub_server.link(f'<{other.endpoint}/api/models/org/small/tree/{other_sha}?recursive=true>; rel="next"')
        listing = hf(hub_server, f"hf://org/small@{sha}", token=HUB_TOKEN).list_files()
        served_by_other = [r for r in other.request_log if r.method == "GET"]
    assert {f.path for f in listing.files} >= {"config.json", "elsewhere/0.json", "elsewhere/2.json"}
    assert [r.headers.get("authorization") for r in hub_server.request_log] == [f"Bearer {HUB_TOKEN}"]
    assert len(served_by_other) == 1 and "authorization" not in served_by_other[0].headers
    assert HUB_TOKEN not in repr(served_by_other[0].headers)


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/tree.json"])
def test_a_link_to_a_non_http_scheme_is_a_source_error_not_retried(hub_server: HubServer, repo: str,
                                                                   location: str) -> None:
    hub_server.link(f'<{location}>; rel="next"')
    with pytest.raises(SourceError) as ei:
        hf(hub_server, f"hf://org/small@{repo}").list_files()
    assert not isinstance(ei.value, TransientSourceError)
    assert hub_server.requests["tree"] == 1


# -- redirects ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/model.safetensors", "gopher://x/"])
def test_a_body_redirect_to_a_non_http_scheme_fails_at_once(hub_server: HubServer, repo: str, tmp_path: Path,
                                                           location: str) -> None:
    src = hf(hub_server, "hf://org/small")
    listing = src.list_files()
    hub_server.redirect("resolve", location, times=None, path="config.json")
    (tmp_path / "models").mkdir()  # the engine requires an existing models root (the CLI creates it)
    with pytest.raises(SourceError) as ei:
        engine.pull(src, tmp_path / "models" / "m", listing=listing, models_root=tmp_path / "models", writer="n",
                    options=EngineOptions(retry=FAST))
    assert not isinstance(ei.value, TransientSourceError), ei.value
    assert "redirect" in str(ei.value)
    gets = [r for r in hub_server.request_log if r.path.endswith("/config.json")]
    assert len(gets) == 1, "a redirect no retry can follow must not be retried"


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x"])
def test_an_api_redirect_to_a_non_http_scheme_fails_at_once(hub_server: HubServer, repo: str,
                                                            location: str) -> None:
    hub_server.redirect("model_info", location, times=None)
    with pytest.raises(SourceError) as ei:
        hf(hub_server, "hf://org/small").list_files()
    assert not isinstance(ei.value, TransientSourceError), ei.value
    assert hub_server.requests["model_info"] == 1


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x"])
def test_an_oci_redirect_to_a_non_http_scheme_fails_at_once(oci_server: OCIObjectServer,
                                                            oci_user_config: OCIUserConfig, location: str) -> None:
    oci_server.put_object("testns", "models", "llama/a.bin", b"weights")
    src = OCISource(parse_uri("oci://n/testns/b/models/o/llama/"), auth="user",
                    config_file=str(oci_user_config.path), profile=oci_user_config.profile,
                    endpoint=oci_server.url, retry=FAST)
    f = src.list_files().files[0]
    oci_server.inject("llama/a.bin", Faults(redirect_to=location))
    with pytest.raises(SourceError) as ei:
        src.open(f)
    assert not isinstance(ei.value, TransientSourceError), ei.value
    assert oci_server.requests["get"] == 1


# -- huge listings -----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_huge_listing_is_filtered_while_it_streams_in_bounded_memory(hub_server: HubServer) -> None:
    """50,000 tree entries, one in 1,000 wanted: the listing holds the 50 kept files, never the 50,000 entries
    (today's code peaked at ~46 MB here, ~1 GB for 10^6 entries)."""
    n = 50_000
    hub_server.add_generated("org/huge", n, names=lambda i: f"d/{i}.json" if i % 1000 == 0 else f"d/{i}.bin")
    src = hf(hub_server, "hf://org/huge", allow_patterns=["*.json"])
    tracemalloc.start()
    try:
        listing = src.list_files()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [f.path for f in listing.files] == sorted(f"d/{i}.json" for i in range(0, n, 1000))
    assert peak < 8 * 1024 * 1024, f"listing peaked at {peak / 1e6:.1f} MB"


def test_a_generated_listing_keeps_every_entry_when_nothing_is_filtered(hub_server: HubServer) -> None:
    hub_server.add_generated("org/gen", 2500)
    listing = hf(hub_server, "hf://org/gen").list_files()
    assert len(listing.files) == 2500
    assert listing.files[7].path == "f0000007.bin" and listing.files[7].size == 7


# -- counters never lag the client -------------------------------------------------------------------------
ROUNDS = 150


def test_hub_bytes_served_is_counted_before_the_client_finishes_reading(hub_server: HubServer, repo: str) -> None:
    src = hf(hub_server, "hf://org/small")
    f = next(x for x in src.list_files().files if x.path == "model.safetensors")
    for i in range(ROUNDS):
        hub_server.reset_counters()
        assert len(support.read_all(src.open(f, 0, 1000 + i))) == 1000 + i
        assert hub_server.bytes_served == 1000 + i, f"round {i}"


def test_range_server_bytes_sent_is_counted_before_the_client_finishes_reading(tmp_path: Path) -> None:
    files = make_model(tmp_path / "origin", {"a.bin": 4096})
    with RangeServer(tmp_path / "origin") as server:
        src = RangeSource(server.url, files)
        for i in range(ROUNDS):
            server.reset()
            assert len(support.read_all(src.open(files[0], 0, 1000 + i))) == 1000 + i
            assert server.bytes_sent == 1000 + i, f"round {i}"
        src.close()


def test_oci_body_bytes_are_counted_before_the_client_finishes_reading(oci_server: OCIObjectServer,
                                                                       oci_user_config: OCIUserConfig) -> None:
    oci_server.put_object("testns", "models", "llama/a.bin", os.urandom(4096))
    src = OCISource(parse_uri("oci://n/testns/b/models/o/llama/"), auth="user",
                    config_file=str(oci_user_config.path), profile=oci_user_config.profile,
                    endpoint=oci_server.url, retry=FAST)
    f = src.list_files().files[0]
    for i in range(ROUNDS):
        oci_server.reset_counters()
        assert len(support.read_all(src.open(f, 0, 1000 + i))) == 1000 + i
        assert oci_server.body_bytes == 1000 + i, f"round {i}"
