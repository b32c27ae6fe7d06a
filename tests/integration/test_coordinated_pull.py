"""Several real ``modelherd pull`` processes, one shared models root, one loopback Hub: one download.

Each scenario runs with the Kubernetes Lease (real kube-apiserver) and with the file lease. The Hub counts
every body byte it serves, so "downloaded once" is measured at the origin.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.kube import load
from modelherd.agent.kube.leases import KubeLeases
from modelherd.coordination import LeaseRecord
from modelherd.coordination.pull import open_lease
from modelherd.storage.manifest import read_manifest
from modelherd.storage.uri import parse_uri
from modelherd.storage.verify import verify_deep

from tests.hubserver import HubServer
from tests.k8s_fixtures import KubeCluster
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

KiB = 1024
REPO = "org/tiny-llama"
URI = f"hf://{REPO}"
MODELHERD = str(Path(sys.executable).parent / "modelherd")


@pytest.fixture(scope="module")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """16 shards of 256 KiB (+ index, config, tokenizer): about 4 MiB in many small LFS files."""
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    files = make_sharded_model(folder, n_shards=16, shard_bytes=256 * KiB)
    return folder, sum(p.stat().st_size for p in files)


@pytest.fixture
def hub(model_src: tuple[Path, int]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, model_src[0])
        yield server


@dataclass
class Herd:
    """Starts ``modelherd pull`` processes against one models root and one lease store."""

    backend: str
    root: Path
    hub: HubServer
    namespace: str = "default"
    kubeconfig: Path | None = None
    duration_s: float = 3.0
    renew_s: float = 1.0
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, node: str, *extra: str) -> subprocess.Popen[str]:
        args = [MODELHERD, "pull", URI, "--models-root", str(self.root), "--storage-mode", "shared",
                "--coordination", self.backend, "--node-name", node, "--lease-duration", str(self.duration_s),
                "--renew-period", str(self.renew_s), "--concurrency", "1", "--no-progress", "--log-level", "INFO",
                *extra]
        if self.backend == "kubernetes":
            assert self.kubeconfig is not None
            args += ["--namespace", self.namespace, "--kubeconfig", str(self.kubeconfig)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELHERD_", "HF_", "KUBECONFIG"))}
        env.update({"HF_ENDPOINT": self.hub.endpoint, "MODELHERD_POLL_INTERVAL_S": "2", "MODELHERD_WAIT_JITTER_S":
                    "0.3", "HF_HUB_DISABLE_TELEMETRY": "1"})
        log = self.root.parent / f"{node}.log"
        self.logs[node] = log
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
        self.procs[node] = proc
        return proc

    def lease(self) -> Any:
        uri = parse_uri(URI)
        return open_lease("kubernetes" if self.backend == "kubernetes" else "file", uri=uri,  # type: ignore[arg-type]
                          dest=self.root / uri.default_relpath(), models_root=self.root, node_name="test-observer",
                          namespace=self.namespace, lease_duration_s=self.duration_s,
                          lease_api=KubeLeases(load(self.kubeconfig)) if self.backend == "kubernetes" else None)

    def wait_for(self, pred: Callable[[LeaseRecord], bool], timeout: float = 60.0) -> LeaseRecord:
        lease = self.lease()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    rec = lease.observe()
                except Exception:  # the API server may be restarting
                    rec = None
                if rec is not None and pred(rec):
                    return rec
                time.sleep(0.1)
        finally:
            lease.close()
        raise AssertionError(f"the lease never satisfied the condition within {timeout}s")

    def finish(self, timeout: float = 120.0) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        for node, proc in self.procs.items():
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            out[node] = (proc.returncode, stdout)
        return out

    def log(self, node: str) -> str:
        return self.logs[node].read_text()

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)

    @property
    def dest(self) -> Path:
        return self.root / REPO


@pytest.fixture(params=["kubernetes", "file"])
def herd(request: pytest.FixtureRequest, tmp_path: Path, hub: HubServer) -> Iterator[Herd]:
    root = tmp_path / "models"
    root.mkdir()
    h = Herd(request.param, root, hub)
    if request.param == "kubernetes":
        request.applymarker(pytest.mark.k8s)
        cluster: KubeCluster = request.getfixturevalue("kube_cluster")
        h.kubeconfig = cluster.kubeconfig
        h.namespace = request.getfixturevalue("kube_namespace")
    yield h
    h.kill_all()


def _ready_lines(results: dict[str, tuple[int, str]]) -> dict[str, dict[str, Any]]:
    ready = {}
    for node, (code, stdout) in results.items():
        assert code == 0, f"{node} exited {code}: {stdout[-2000:]}"
        line = stdout.strip().splitlines()[-1]
        ready[node] = json.loads(line)
        assert ready[node]["status"] == "Ready"
    return ready


def _assert_model_is_whole(herd: Herd) -> None:
    assert verify_deep(herd.dest, require_manifest=True) == []
    assert not list((herd.root / ".modelherd-staging").glob("*")) if (herd.root / ".modelherd-staging").exists() \
        else True


def _published_by(herd: Herd) -> list[str]:
    return [n for n in herd.procs if "published hf://" in herd.log(n)]


def test_eight_nodes_cause_exactly_one_download(herd: Herd, hub: HubServer, model_src: tuple[Path, int]) -> None:
    size = model_src[1]
    for i in range(8):
        herd.start(f"node-{i}")
    ready = _ready_lines(herd.finish())
    assert hub.bytes_served <= size  # every byte once, not 8 times
    assert hub.bytes_served >= size * 0.9
    _assert_model_is_whole(herd)
    assert len(_published_by(herd)) == 1
    assert {r["files"] for r in ready.values()} == {len(read_manifest(herd.dest).files)}  # type: ignore[union-attr]
    final = herd.wait_for(lambda r: True)
    assert final.holder == "" and final.phase == "Complete" and final.status.bytes_done == final.status.bytes_total

    # a restart is Ready at once: no lease write, no origin request
    hub.reset_counters()
    started = time.monotonic()
    herd.procs.clear()
    herd.start("node-restarted")
    _ready_lines(herd.finish())
    assert time.monotonic() - started < 10
    assert hub.stats()["requests"] == {} and hub.bytes_served == 0
    assert herd.wait_for(lambda r: True).version == final.version


def test_three_nodes_adopt_a_prestaged_copy_once_without_an_origin_byte(herd: Herd, hub: HubServer,
                                                                       model_src: tuple[Path, int]) -> None:
    """Issue #17: a copy staged by another tool (no completion manifest) is hashed by one node under the Lease and
    published in place; the others follow; the origin serves the listing only."""
    shutil.copytree(model_src[0], herd.dest)
    (herd.dest / "NOTES.md").write_text("staged by rsync from the old cluster\n")
    (herd.dest / ".cache" / "huggingface").mkdir(parents=True)
    (herd.dest / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
    inodes = {p.name: p.stat().st_ino for p in herd.dest.iterdir() if p.is_file() and p.name != "NOTES.md"}
    for i in range(3):
        herd.start(f"node-{i}")
    ready = _ready_lines(herd.finish())
    assert hub.bytes_served == 0
    adopters = [n for n in herd.procs if "adopting hf://" in herd.log(n)]
    assert len(adopters) == 1 and _published_by(herd) == adopters
    assert ready[adopters[0]]["how"] == "holder"
    assert {r["how"] for n, r in ready.items() if n not in adopters} <= {"follower", "ready"}
    _assert_model_is_whole(herd)
    assert {p.name: p.stat().st_ino for p in herd.dest.iterdir() if p.name in inodes} == inodes
    assert (herd.dest / "NOTES.md").read_text().startswith("staged by rsync")
    manifest = read_manifest(herd.dest)
    assert manifest is not None and manifest.foreign == (".cache", "NOTES.md")
    final = herd.wait_for(lambda r: True)
    assert final.holder == "" and final.phase == "Complete"


def test_a_killed_holder_is_replaced_after_expiry_and_the_download_resumes(
        herd: Herd, hub: HubServer, model_src: tuple[Path, int]) -> None:
    size = model_src[1]
    hub.throttle("cdn", bytes_per_s=1024 * KiB)  # ~4 s for the whole model
    for i in range(3):
        herd.start(f"node-{i}")
    rec = herd.wait_for(lambda r: r.held and r.status.bytes_done >= size // 3)
    victim = rec.holder
    herd.procs[victim].kill()
    herd.procs[victim].wait()
    del herd.procs[victim]
    took = herd.wait_for(lambda r: r.held and r.holder != victim, timeout=30)
    assert took.transitions == rec.transitions + 1
    ready = _ready_lines(herd.finish())
    assert set(ready) == {f"node-{i}" for i in range(3)} - {victim}
    assert hub.bytes_served <= 1.1 * size, f"{hub.bytes_served} bytes served for a {size}-byte model"
    _assert_model_is_whole(herd)
    assert "adopting" in herd.log(took.holder)


def test_a_paused_holder_never_publishes_over_the_node_that_took_over(
        herd: Herd, hub: HubServer, model_src: tuple[Path, int]) -> None:
    hub.throttle("cdn", bytes_per_s=1024 * KiB)
    for i in range(2):
        herd.start(f"node-{i}")
    rec = herd.wait_for(lambda r: r.held and r.status.bytes_done > 0)
    paused = rec.holder
    herd.procs[paused].send_signal(signal.SIGSTOP)
    final = herd.wait_for(lambda r: r.phase == "Complete" and not r.held, timeout=60)
    manifest = read_manifest(herd.dest)
    assert manifest is not None and manifest.writer != paused
    herd.procs[paused].send_signal(signal.SIGCONT)
    ready = _ready_lines(herd.finish())
    assert set(ready) == {"node-0", "node-1"}
    assert _published_by(herd) == [manifest.writer]
    assert "lost" in herd.log(paused)
    after = read_manifest(herd.dest)
    assert after is not None and after.writer == manifest.writer and after.completed_at == manifest.completed_at
    _assert_model_is_whole(herd)
    assert herd.wait_for(lambda r: True).version == final.version


def test_a_429_storm_is_ridden_out_by_the_holder_alone(herd: Herd, hub: HubServer,
                                                       model_src: tuple[Path, int]) -> None:
    hub.fail("cdn", 429, times=4, retry_after="1")
    for i in range(4):
        herd.start(f"node-{i}")
    _ready_lines(herd.finish())
    stats = hub.stats()["requests"]
    # one listing (model info + tree) for the whole herd; the body requests are the holder's 16 + 4 refused
    assert stats.get("model_info", 0) <= 1 and stats.get("tree", 0) <= 1, stats
    assert stats["cdn"] == 16 + 4, stats
    assert hub.bytes_served <= model_src[1]
    assert len(_published_by(herd)) == 1
    _assert_model_is_whole(herd)


def test_a_storm_longer_than_the_retry_budget_fails_every_node_without_follower_requests(
        herd: Herd, hub: HubServer) -> None:
    hub.fail("cdn", 429, times=None, retry_after="0.5")
    # what one node alone sends to the origin before giving up
    solo_root = herd.root.parent / "solo"
    solo_root.mkdir()
    solo = Herd("none", solo_root, hub)
    solo.start("solo", "--download-retry", "2")
    assert solo.finish()["solo"][0] == 3
    alone = hub.stats()["requests"]["cdn"]
    hub.reset_counters()
    for i in range(4):
        herd.start(f"node-{i}", "--download-retry", "2")
    results = herd.finish()
    assert {code for code, _ in results.values()} == {3}  # the holder's SourceError, and the same for followers
    holders = [n for n in herd.procs if "acquired by" in herd.log(n)]
    assert len(holders) == 1
    followers = set(herd.procs) - set(holders)
    assert all("download by another node failed" in herd.log(n) for n in followers)
    # what the holder alone sends (its retry timing varies by a request or so); one follower that went to the
    # origin would add a listing and a whole retry budget of its own
    herd_requests = hub.stats()["requests"]
    assert herd_requests["cdn"] <= alone + 2 and herd_requests.get("model_info", 0) <= 1, (herd_requests, alone)
    final = herd.wait_for(lambda r: True)
    assert final.phase == "Failed" and final.holder == "" and "429" in final.status.message
    assert not herd.dest.exists()


@pytest.mark.k8s
def test_an_api_server_restart_mid_download_does_not_cause_a_second_download(
        tmp_path: Path, hub: HubServer, model_src: tuple[Path, int], kube_cluster: KubeCluster,
        kube_namespace: str) -> None:
    if not kube_cluster.managed:
        pytest.skip("needs a control plane this session started (it is restarted)")
    size = model_src[1]
    root = tmp_path / "models"
    root.mkdir()
    herd = Herd("kubernetes", root, hub, kube_namespace, kube_cluster.kubeconfig, duration_s=15, renew_s=2)
    hub.throttle("cdn", bytes_per_s=384 * KiB)  # ~11 s
    try:
        for i in range(3):
            herd.start(f"node-{i}")
        herd.wait_for(lambda r: r.held and r.status.bytes_done > 0)
        kube_cluster.restart()
        _ready_lines(herd.finish())
    finally:
        herd.kill_all()
    assert hub.bytes_served <= 1.1 * size
    assert len(_published_by(herd)) == 1
    _assert_model_is_whole(herd)


def test_the_leases_progress_moves_every_two_seconds_at_50_kb_per_second(herd: Herd, hub: HubServer) -> None:
    """An operator watching a rate-limited herd sees the holder's byte count advance about once a second, not once
    per 4 MiB read buffer (80 s at 50 KB/s), with the default 10 s renew period: progress is written on its own
    clock while bytes move."""
    hub.throttle("cdn", bytes_per_s=50 * KiB)
    herd.duration_s, herd.renew_s = 30.0, 10.0
    herd.start("node-0")
    first = herd.wait_for(lambda r: r.held and r.status.bytes_done > 0, timeout=60)
    lease = herd.lease()
    seen = [(time.monotonic(), first.status.bytes_done)]
    try:
        end = time.monotonic() + 9
        while time.monotonic() < end:
            rec = lease.observe()
            if rec is not None and rec.status.bytes_done != seen[-1][1]:
                seen.append((time.monotonic(), rec.status.bytes_done))
            time.sleep(0.1)
    finally:
        lease.close()
    gaps = [round(b[0] - a[0], 2) for a, b in itertools.pairwise(seen)]
    assert len(seen) >= 5 and all(b[1] > a[1] for a, b in itertools.pairwise(seen)), seen
    # written every 2 s (reads return after 1 s); the observer's polling and a loaded API server add a little
    assert max(gaps) <= 3.5 and sum(gaps) / len(gaps) <= 2.6, f"the lease's byte count stood still: {gaps}"
