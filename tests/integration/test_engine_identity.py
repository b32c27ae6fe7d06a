"""What "Ready" means (issue #8, items 2, 10, 4): a published model that no longer verifies is repaired, the
file selection is part of a model's identity, and hostile listings fail fast in bounded memory."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelherd.coordination.coordinator import LeaseTiming, identity_for, run_coordinated
from modelherd.coordination.filelease import FileLease
from modelherd.storage import engine
from modelherd.storage.errors import CancelledError, ConfigError, MalformedListingError, SourceError
from modelherd.storage.manifest import read_manifest
from modelherd.storage.options import EngineOptions
from modelherd.storage.paths import staging_root
from modelherd.storage.plan import MAX_PARTS_PER_FILE, layout
from modelherd.storage.ready import published_model
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.types import RemoteFile, Selection
from modelherd.storage.verify import verify_quick

from tests.hubserver import HubFile, HubServer
from tests.integration.test_cli import pull_hf, run_cli
from tests.modelgen import make_sharded_model
from tests.rangeserver import RangeServer, RangeSource, make_model

KiB, MiB = 1024, 1024 * 1024
OPTIONS = EngineOptions(multipart_threshold=1 * MiB, part_size=512 * KiB, chunk_size=64 * KiB,
                               checkpoint_size=128 * KiB,
                               retry=RetryPolicy(retries=2, backoff_s=0.01, backoff_max_s=0.05))
BAD_SHARD = "model-00002-of-00003.safetensors"


def _remote_files(folder: Path) -> list[RemoteFile]:
    return [RemoteFile(path=p.relative_to(folder).as_posix(), size=p.stat().st_size,
                       checksums={"sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
            for p in sorted(folder.rglob("*")) if p.is_file()]


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Path, list[RemoteFile]]:
    """A real safetensors model (3 shards + index + config + tokenizer): it passes quick verification."""
    folder = tmp_path / "origin"
    make_sharded_model(folder, 3, 600 * KiB)
    return folder, _remote_files(folder)


@pytest.fixture
def server(origin: tuple[Path, list[RemoteFile]]) -> Iterator[RangeServer]:
    with RangeServer(origin[0]) as srv:
        yield srv


@pytest.fixture
def models_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


def _overwrite_header_byte(path: Path) -> bytes:
    """Overwrite the first byte of the safetensors JSON header (the ``{``); return the file's new bytes."""
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"X")
    return path.read_bytes()


def _staging_is_empty(models_root: Path) -> bool:
    root = staging_root(models_root)
    return not root.exists() or not any(root.iterdir())


# ------------------------------------------------------------------------------------------- item 2: repair
def test_a_published_model_with_an_overwritten_header_byte_is_repaired_fetching_only_that_shard(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    folder, files = origin
    dest = models_root / "m"
    engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=OPTIONS)
    _overwrite_header_byte(dest / BAD_SHARD)
    assert verify_quick(dest, require_manifest=True), "the damage must be visible to quick verification"
    server.reset()

    manifest = engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a",
                           options=OPTIONS)

    assert verify_quick(dest, require_manifest=True) == []
    assert (dest / BAD_SHARD).read_bytes() == (folder / BAD_SHARD).read_bytes()
    assert {name for name, _ in server.requests} == {BAD_SHARD}
    assert server.bytes_sent == (folder / BAD_SHARD).stat().st_size
    assert published_model(dest, "test://model", None) == manifest
    assert _staging_is_empty(models_root)


def test_a_repair_keeps_open_files_readable_links_the_good_ones_and_never_writes_into_the_old_copy(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    folder, files = origin
    dest = models_root / "m"
    engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=OPTIONS)
    damaged = _overwrite_header_byte(dest / BAD_SHARD)
    good_name = "model-00001-of-00003.safetensors"
    with open(dest / good_name, "rb") as good, open(dest / BAD_SHARD, "rb") as bad:
        engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=OPTIONS)
        # the reader's good shard is the very file now published (a hard link, not a copy) ...
        assert os.fstat(good.fileno()).st_ino == os.stat(dest / good_name).st_ino
        assert good.read() == (folder / good_name).read_bytes()
        # ... and its damaged one is still the old bytes: the repair wrote a new file, not into this one
        assert os.fstat(bad.fileno()).st_ino != os.stat(dest / BAD_SHARD).st_ino
        assert bad.read() == damaged


def test_a_deleted_file_is_fetched_again_alone(origin: tuple[Path, list[RemoteFile]], server: RangeServer,
                                               models_root: Path) -> None:
    _, files = origin
    dest = models_root / "m"
    engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=OPTIONS)
    (dest / "config.json").unlink()
    server.reset()
    engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=OPTIONS)
    assert {name for name, _ in server.requests} == {"config.json"}
    assert verify_quick(dest, require_manifest=True) == []


def test_the_coordinated_holder_repairs_a_damaged_model_the_same_way(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    folder, files = origin
    dest = models_root / "m"
    engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=OPTIONS)
    _overwrite_header_byte(dest / BAD_SHARD)
    server.reset()
    source = RangeSource(server.url, files)
    lease = FileLease(models_root, identity_for("test://model", None, dest, models_root), "node-b",
                      duration_s=5, poll_interval_s=0.2, jitter_s=0.1)
    try:
        result = run_coordinated(lease, source=source, listing_fn=source.list_files, dest=dest,
                                 models_root=models_root, node="node-b", options=OPTIONS,
                                 timing=LeaseTiming(duration_s=5, renew_period_s=1, jitter_s=0.1))
    finally:
        lease.close()
    assert result.role == "holder"
    assert {name for name, _ in server.requests} == {BAD_SHARD}
    assert server.bytes_sent == (folder / BAD_SHARD).stat().st_size
    assert verify_quick(dest, require_manifest=True) == []


def test_a_model_the_origin_serves_malformed_is_ready_as_published_without_a_request(
        tmp_path: Path, models_root: Path) -> None:
    # random bytes named .safetensors: quick verification fails on the origin's own bytes, byte-exact copy or not
    files = make_model(tmp_path / "o", {"model.safetensors": 300 * KiB, "config.json": 100}, seed=3)
    dest = models_root / "m"
    with RangeServer(tmp_path / "o") as srv:
        first = engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="a",
                            options=OPTIONS)
        assert verify_quick(dest, require_manifest=True), "the origin's file is not a safetensors file"
        srv.reset()
        again = engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="a",
                            options=OPTIONS)
        assert again == first and srv.requests == []
    # the fast path without a listing agrees with the engine
    assert published_model(dest, "test://model", None) == first


# ------------------------------------------------------------------------------------------- item 10: filters
@pytest.fixture
def hub_repo(hub_server: HubServer, tmp_path: Path) -> tuple[HubServer, Path]:
    src = tmp_path / "src"
    make_sharded_model(src, 2, 200_000)
    hub_server.add_repo("acme/tiny", src, lfs_min_size=100_000)
    return hub_server, src


def _ready_line(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert r.returncode == 0, r.stderr
    line: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return line


def test_allow_matching_no_file_is_a_usage_error_and_publishes_nothing(hub_repo: tuple[HubServer, Path],
                                                                       tmp_path: Path) -> None:
    hub, _ = hub_repo
    root = tmp_path / "models"
    r = pull_hf(hub, "acme/tiny", root, "--allow", "*.gguf")
    assert r.returncode == ConfigError.exit_code == 2, r.stdout + r.stderr
    assert "*.gguf" in r.stderr and "no file" in r.stderr
    assert not (root / "acme/tiny").exists()


def test_the_file_selection_is_part_of_the_model_identity(hub_repo: tuple[HubServer, Path], tmp_path: Path) -> None:
    hub, src = hub_repo
    root = tmp_path / "models"
    n_json = sum(1 for p in src.iterdir() if p.name.endswith(".json"))
    only_json = _ready_line(pull_hf(hub, "acme/tiny", root, "--allow", "*.json"))
    assert only_json["files"] == n_json
    manifest = read_manifest(root / "acme/tiny")
    assert manifest is not None and manifest.selection == Selection(allow=("*.json",))

    wider = _ready_line(pull_hf(hub, "acme/tiny", root, "--allow", "*.json", "--allow", "*.safetensors"))
    assert wider["how"] != "ready" and wider["files"] == len(list(src.iterdir()))

    hub.reset_counters()
    same = _ready_line(pull_hf(hub, "acme/tiny", root, "--allow", "*.safetensors", "--allow", "*.json"))
    assert same["how"] == "ready" and same["files"] == wider["files"]
    assert hub.stats()["bytes_served"] == 0

    unfiltered = _ready_line(pull_hf(hub, "acme/tiny", root))
    assert unfiltered["how"] != "ready"


def test_the_cli_without_coordination_repairs_a_damaged_model_instead_of_answering_ready(
        hub_repo: tuple[HubServer, Path], tmp_path: Path) -> None:
    hub, src = hub_repo
    root = tmp_path / "models"
    _ready_line(pull_hf(hub, "acme/tiny", root, "--coordination", "none"))
    shard = "model-00001-of-00002.safetensors"
    _overwrite_header_byte(root / "acme/tiny" / shard)
    hub.reset_counters()
    again = _ready_line(pull_hf(hub, "acme/tiny", root, "--coordination", "none"))
    assert again["how"] == "pulled"
    assert hub.stats()["bytes_served"] == (src / shard).stat().st_size
    assert verify_quick(root / "acme/tiny", require_manifest=True) == []


def test_file_filters_for_a_source_that_cannot_apply_them_are_refused(tmp_path: Path) -> None:
    r = run_cli("pull", "oci://n/ns/b/bucket/o/org/m", "--models-root", str(tmp_path / "models"), "--no-progress",
                "--allow", "*.json")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "hf:// models only" in r.stderr


def test_an_empty_listing_without_filters_is_a_source_error(server: RangeServer, models_root: Path) -> None:
    with pytest.raises(SourceError) as info:
        engine.pull(RangeSource(server.url, []), models_root / "m", models_root=models_root, writer="a",
                    options=OPTIONS)
    assert info.value.exit_code == 3
    assert not (models_root / "m").exists()


# ------------------------------------------------------------------------------------------- item 4: bounds
def _limit_memory() -> None:
    # the old planner took 4.9 GB for one 10^15-byte entry: cap the address space so it fails instead of swapping
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.parametrize(("size", "exit_code"), [(10**15, 6), (10**30, 3)])
def test_a_listed_size_of_absurd_length_fails_fast_without_planning_it(
        hub_server: HubServer, tmp_path: Path, size: int, exit_code: int) -> None:
    huge = HubFile(path="huge.safetensors", size=size, blob_id="0" * 40, sha256="1" * 64, lfs=True, data=b"")
    hub_server._commit("acme/huge", "main", {"huge.safetensors": huge}, token=None, gated=False)
    root = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    env["HF_ENDPOINT"] = hub_server.endpoint
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "modelherd.agent.cli", "pull", "hf://acme/huge", "--models-root",
                        str(root), "--no-progress", "--coordination", "none"], env=env, text=True,
                       capture_output=True, timeout=120, check=False, preexec_fn=_limit_memory)
    elapsed = time.monotonic() - started
    assert r.returncode == exit_code, r.stderr[-2000:]
    assert elapsed < 20, f"{elapsed:.1f}s to refuse it"
    assert hub_server.stats()["bytes_served"] == 0
    assert not (root / "acme/huge").exists()


def test_planning_any_file_size_makes_a_bounded_number_of_parts() -> None:
    for size in (10 * MiB, 2**40, 2**50):
        state = layout(RemoteFile(path="x", size=size), EngineOptions())
        assert len(state.parts) <= MAX_PARTS_PER_FILE, size
        assert state.part_size * len(state.parts) >= size


def test_more_files_than_max_files_are_refused_before_anything_is_planned(server: RangeServer,
                                                                          models_root: Path) -> None:
    files = [RemoteFile(path=f"f{i}.bin", size=1) for i in range(11)]
    with pytest.raises(MalformedListingError):
        engine.pull(RangeSource(server.url, files), models_root / "m", models_root=models_root, writer="a",
                    options=EngineOptions(max_files=10))
    assert server.requests == [] and _staging_is_empty(models_root)


def test_a_pull_cancelled_before_planning_sends_no_request(origin: tuple[Path, list[RemoteFile]],
                                                           server: RangeServer, models_root: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        engine.pull(RangeSource(server.url, origin[1]), models_root / "m", models_root=models_root, writer="a",
                    options=OPTIONS, cancel=cancel)
    assert server.requests == []
    assert not (models_root / "m").exists() and _staging_is_empty(models_root)
