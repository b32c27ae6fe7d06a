"""The download engine against a real loopback HTTP server, real files and (where possible) a real full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelherd.storage import engine
from modelherd.storage.errors import (
    CancelledError,
    InsufficientSpaceError,
    SourceError,
    TransientSourceError,
    UnsafePathError,
    VerificationError,
)
from modelherd.storage.manifest import read_manifest
from modelherd.storage.options import EngineOptions
from modelherd.storage.paths import staging_root
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.staging import STATE_DIRNAME, adopt_staging, staging_dir_for
from modelherd.storage.types import RemoteFile

from tests.rangeserver import Fault, RangeServer, RangeSource, files_to_json, make_model

KiB, MiB = 1024, 1024 * 1024
REPO = Path(__file__).resolve().parents[2]

# small parts so that a few MiB exercise multipart, checkpoints and the hash cursor
SMALL = EngineOptions(multipart_threshold=1 * MiB, part_size=512 * KiB, chunk_size=64 * KiB,
                             checkpoint_size=128 * KiB, retry=RetryPolicy(retries=3, backoff_s=0.01,
                                                                          backoff_max_s=0.05))


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Path, list[RemoteFile]]:
    files = make_model(tmp_path / "origin", {"model-00001.safetensors": 3 * MiB + 123,
                                             "nested/model-00002.safetensors": 2 * MiB,
                                             "config.json": 517, "empty.txt": 0})
    return tmp_path / "origin", files


@pytest.fixture
def server(origin: tuple[Path, list[RemoteFile]]) -> Iterator[RangeServer]:
    with RangeServer(origin[0]) as srv:
        yield srv


@pytest.fixture
def models_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


def _same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def _assert_published(dest: Path, origin_dir: Path, files: list[RemoteFile]) -> None:
    for f in files:
        assert _same_bytes(dest / f.path, origin_dir / f.path), f.path
    manifest = read_manifest(dest)
    assert manifest is not None
    assert {m.path: m.checksums["sha256"] for m in manifest.files} == {f.path: f.checksums["sha256"] for f in files}
    assert not (dest / STATE_DIRNAME).exists()


def _flip_byte(path: Path, offset: int) -> None:
    """Corrupt one byte of ``path`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _staging_is_empty(models_root: Path) -> bool:
    root = staging_root(models_root)
    return not root.exists() or not any(root.iterdir())


def test_parallel_multifile_multipart_pull_is_byte_exact_and_cleans_staging(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    origin_dir, files = origin
    seen: list[tuple[int, int]] = []
    dest = models_root / "org" / "model"
    manifest = engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="node-a",
                           options=SMALL, progress=lambda d, t: seen.append((d, t)))
    _assert_published(dest, origin_dir, files)
    assert manifest.writer == "node-a" and manifest.total_bytes == sum(f.size for f in files)
    ranged = [r for name, r in server.requests if name == "model-00001.safetensors"]
    assert len(ranged) == 7, ranged  # 3 MiB + 123 bytes in 512 KiB parts
    assert seen[-1] == (manifest.total_bytes, manifest.total_bytes)
    assert _staging_is_empty(models_root)


def test_complete_destination_is_returned_without_fetching_a_byte(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    _, files = origin
    dest = models_root / "m"
    first = engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=SMALL)
    sent, requests = server.bytes_sent, len(server.requests)
    again = engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="b", options=SMALL)
    assert again == first
    assert (server.bytes_sent, len(server.requests)) == (sent, requests)


def test_a_listing_the_caller_already_has_is_pulled(origin: tuple[Path, list[RemoteFile]], server: RangeServer,
                                                  models_root: Path) -> None:
    origin_dir, files = origin
    source = RangeSource(server.url, files)
    engine.pull(source, models_root / "m", listing=source.list_files(), models_root=models_root, writer="a",
                options=SMALL)
    _assert_published(models_root / "m", origin_dir, files)


def test_new_revision_replaces_existing_destination_and_leaves_nothing_aside(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    origin_dir, files = origin
    dest = models_root / "m"
    engine.pull(RangeSource(server.url, files[2:], revision="old"), dest, models_root=models_root, writer="a",
                options=SMALL)
    (dest / "operators-notes.bin").write_bytes(b"x")  # not the model's: an update keeps it (issue #17)
    engine.pull(RangeSource(server.url, files, revision="new"), dest, models_root=models_root, writer="a",
                options=SMALL)
    _assert_published(dest, origin_dir, files)
    assert (dest / "operators-notes.bin").read_bytes() == b"x"
    manifest = read_manifest(dest)
    assert manifest is not None and manifest.revision == "new" and manifest.foreign == ("operators-notes.bin",)
    assert _staging_is_empty(models_root)


def test_server_sending_wrong_bytes_is_refetched_once_then_verification_error_and_old_model_kept(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    _, files = origin
    dest = models_root / "m"
    engine.pull(RangeSource(server.url, files[2:3], revision="old"), dest, models_root=models_root, writer="a",
                options=SMALL)
    server.add_fault("config.json", *[Fault(corrupt=True)] * 2)
    with pytest.raises(VerificationError) as info:
        engine.pull(RangeSource(server.url, files, revision="new"), dest, models_root=models_root, writer="a",
                    options=SMALL)
    assert "config.json" in str(info.value.problems)
    assert [n for n, _ in server.requests].count("config.json") == 3  # first pull + two attempts
    manifest = read_manifest(dest)
    assert manifest is not None and manifest.revision == "old"
    assert not (dest / "model-00001.safetensors").exists()
    assert _staging_is_empty(models_root)


def test_one_corrupt_download_is_repaired_by_the_second(origin: tuple[Path, list[RemoteFile]],
                                                        server: RangeServer, models_root: Path) -> None:
    origin_dir, files = origin
    server.add_fault("nested/model-00002.safetensors", Fault(corrupt=True))
    engine.pull(RangeSource(server.url, files), models_root / "m", models_root=models_root, writer="a",
                options=SMALL)
    _assert_published(models_root / "m", origin_dir, files)


def test_429_retry_after_is_honoured_and_500s_are_retried(origin: tuple[Path, list[RemoteFile]],
                                                         server: RangeServer, models_root: Path) -> None:
    origin_dir, files = origin
    server.add_fault("config.json", Fault(status=429, retry_after=1.0))
    server.add_fault("nested/model-00002.safetensors", Fault(status=500), Fault(status=503), Fault(status=502))
    started = time.monotonic()
    engine.pull(RangeSource(server.url, files), models_root / "m", models_root=models_root, writer="a",
                options=SMALL)
    assert time.monotonic() - started >= 1.0  # backoff alone would be ~0.01 s
    _assert_published(models_root / "m", origin_dir, files)


def test_persistent_500s_fail_with_source_error_and_keep_staging_for_resume(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    _, files = origin
    server.add_fault("config.json", *[Fault(status=500)] * 10)
    with pytest.raises(TransientSourceError):
        engine.pull(RangeSource(server.url, files), models_root / "m", models_root=models_root, writer="a",
                    options=SMALL)
    assert not (models_root / "m").exists()
    assert (staging_dir_for(models_root, models_root / "m", "a", 0) / STATE_DIRNAME).is_dir()


def test_truncated_body_is_continued_from_the_last_byte_not_restarted(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    origin_dir, files = origin
    name = "nested/model-00002.safetensors"  # 2 MiB: one stream below the 1 MiB... threshold is 1 MiB, so parts
    opts = EngineOptions(multipart_threshold=4 * MiB, chunk_size=64 * KiB, checkpoint_size=128 * KiB,
                                retry=RetryPolicy(retries=2, backoff_s=0.01))
    server.add_fault(name, Fault(truncate_after=300_000))
    engine.pull(RangeSource(server.url, files), models_root / "m", models_root=models_root, writer="a",
                options=opts)
    _assert_published(models_root / "m", origin_dir, files)
    ranges = [r for n, r in server.requests if n == name]
    assert ranges == [f"bytes=0-{2 * MiB - 1}", f"bytes=300000-{2 * MiB - 1}"]


def test_corrupted_checkpointed_segment_is_fetched_again_and_good_ones_are_kept(
        origin: tuple[Path, list[RemoteFile]], server: RangeServer, models_root: Path) -> None:
    origin_dir, files = origin
    name = "model-00001.safetensors"
    no_retry = EngineOptions(multipart_threshold=1 * MiB, part_size=1 * MiB, chunk_size=64 * KiB,
                                    checkpoint_size=128 * KiB, retry=RetryPolicy(retries=0))
    # every part of the big file is cut after 700 KB (five 128 KiB checkpoints land), then refused
    server.add_fault(name, *[Fault(truncate_after=700_000)] * 4, *[Fault(status=403)] * 8)
    dest = models_root / "m"
    with pytest.raises(SourceError):
        engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=no_retry)
    staged = staging_dir_for(models_root, dest, "a", 0) / name
    _flip_byte(staged, 2 * 128 * KiB + 5)  # damage checkpointed segment 2 of part 0
    server.reset()
    engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="a", options=no_retry)
    _assert_published(dest, origin_dir, files)
    resumed = sorted(r for n, r in server.requests if n == name)
    assert f"bytes={2 * 128 * KiB}-{MiB - 1}" in resumed  # part 0 again from the damaged segment on
    assert server.bytes_sent < sum(f.size for f in files) - 3 * 5 * 128 * KiB  # the other parts' checkpoints kept


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pull_killed_mid_file_resumes_from_the_bytes_on_disk(tmp_path: Path, models_root: Path) -> None:
    files = make_model(tmp_path / "slow-origin", {"big.bin": 6 * MiB}, seed=7)
    dest = models_root / "m"
    progress_file = tmp_path / "progress"
    spec = {"files": files_to_json(files), "models_root": str(models_root), "dest": str(dest), "writer": "a",
            "progress_file": str(progress_file),
            "options": {"multipart_threshold": MiB, "part_size": 2 * MiB, "chunk_size": 64 * KiB,
                        "checkpoint_size": 256 * KiB, "progress_interval_s": 0.05}}
    with RangeServer(tmp_path / "slow-origin", rate=1 * MiB) as slow:
        spec["url"] = slow.url
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.Popen([sys.executable, "-m", "tests.rangeserver", "pull", str(tmp_path / "spec.json")],
                                cwd=REPO, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        done = 0
        while time.monotonic() < deadline and done < 2 * MiB:
            time.sleep(0.05)
            words = (progress_file.read_text() if progress_file.exists() else "").split()
            done = int(words[0]) if words else done  # the writer may have just truncated it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done >= 2 * MiB and not dest.exists()
    with RangeServer(tmp_path / "slow-origin") as fast:
        engine.pull(RangeSource(fast.url, files), dest, models_root=models_root, writer="a",
                    options=EngineOptions(**spec["options"]))  # type: ignore[arg-type]
        second_run = fast.bytes_sent
    assert second_run <= 6 * MiB - 2 * MiB + 3 * 256 * KiB  # at most the unchecked tail of each part again
    _assert_published(dest, tmp_path / "slow-origin", files)


def test_cancel_stops_within_a_second_and_cleans_staging(tmp_path: Path, models_root: Path) -> None:
    files = make_model(tmp_path / "o", {"a.bin": 4 * MiB, "b.bin": 4 * MiB}, seed=3)
    cancel = threading.Event()
    with RangeServer(tmp_path / "o", rate=512 * KiB) as slow:
        threading.Timer(0.5, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(CancelledError):
            engine.pull(RangeSource(slow.url, files), models_root / "m", models_root=models_root, writer="a",
                        options=SMALL, cancel=cancel)
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 1.5
    assert not (models_root / "m").exists()
    assert _staging_is_empty(models_root)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    yield from _mounted(tmp_path / "tiny", "tmpfs", "-o", "size=6m")


def _mounted(mnt: Path, fstype: str, *options: str) -> Iterator[Path]:
    """A real filesystem of ``fstype`` mounted at ``mnt`` for one test (skips without the right to mount)."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", fstype, *options, fstype, str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {fstype} here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_capacity_check_refuses_before_any_request(tiny_fs: Path, tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"a.bin": 4 * MiB, "b.bin": 4 * MiB}, seed=5)
    with RangeServer(tmp_path / "o") as srv:
        with pytest.raises(InsufficientSpaceError) as info:
            engine.pull(RangeSource(srv.url, files), tiny_fs / "m", models_root=tiny_fs, writer="a", options=SMALL)
        assert srv.requests == []
    assert "need 8.0 MiB" in str(info.value)
    assert _staging_is_empty(tiny_fs)


def test_disk_filling_up_mid_pull_is_insufficient_space_and_nothing_is_published(tiny_fs: Path,
                                                                                   tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"a.bin": 2 * MiB, "b.bin": 2 * MiB}, seed=6)
    filler = tiny_fs / "someone-else.bin"

    def fill_once(done: int, total: int) -> None:
        if not filler.exists():
            with open(filler, "wb") as f:  # another writer takes the space after our check
                f.write(b"\0" * (3 * MiB))

    with RangeServer(tmp_path / "o", rate=4 * MiB) as srv, pytest.raises(InsufficientSpaceError):
        engine.pull(RangeSource(srv.url, files), tiny_fs / "m", models_root=tiny_fs, writer="a", options=SMALL,
                    progress=fill_once)
    assert not (tiny_fs / "m").exists()
    assert _staging_is_empty(tiny_fs)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_peak_memory_of_a_256_mib_pull_stays_under_150_mib(tmp_path: Path, models_root: Path) -> None:
    files = make_model(tmp_path / "o", {"shard.safetensors": 256 * MiB}, seed=9)
    spec = {"files": files_to_json(files), "models_root": str(models_root), "dest": str(models_root / "m"),
            "writer": "a", "rss_file": str(tmp_path / "rss"), "options": {}}
    with RangeServer(tmp_path / "o") as srv:
        spec["url"] = srv.url
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        # through sh: a child exec'd straight from pytest inherits pytest's peak RSS in its ru_maxrss (Linux folds
        # the vfork parent's high-water mark in at exec), so a long test session would be measured, not the pull
        subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-m", "tests.rangeserver", "pull",
                        str(tmp_path / "spec.json")], cwd=REPO, check=True, stderr=subprocess.DEVNULL, timeout=120)
    peak_kib = int((tmp_path / "rss").read_text())
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    assert read_manifest(models_root / "m") is not None


def test_unsafe_or_reserved_names_are_refused_before_any_request(server: RangeServer, models_root: Path) -> None:
    for bad in ("../escape.bin", ".modelherd-manifest.json", ".modelherd-parts/x.json"):
        source = RangeSource(server.url, [RemoteFile(path=bad, size=1)])
        with pytest.raises(UnsafePathError):
            engine.pull(source, models_root / "m", models_root=models_root, writer="a", options=SMALL)
    with pytest.raises(UnsafePathError):
        engine.pull(RangeSource(server.url, []), models_root.parent / "outside", models_root=models_root,
                    writer="a", options=SMALL)
    assert server.requests == []


def test_staging_names_are_stable_per_writer_and_epoch(models_root: Path) -> None:
    a = staging_dir_for(models_root, models_root / "org" / "llama", "node-1", 0)
    assert a == staging_dir_for(models_root, models_root / "org" / "llama", "node-1", 0)
    assert a.parent == staging_root(models_root) and a.name.startswith("llama-")
    others = {staging_dir_for(models_root, models_root / "org" / "llama", "node-2", 0),
              staging_dir_for(models_root, models_root / "org" / "llama", "node-1", 1),
              staging_dir_for(models_root, models_root / "other" / "llama", "node-1", 0)}
    assert a not in others and len(others) == 3
    assert "/" not in staging_dir_for(models_root, models_root / "x", "evil/../w", 0).name


def test_adopted_staging_resumes_under_the_new_writer(origin: tuple[Path, list[RemoteFile]], server: RangeServer,
                                                      models_root: Path) -> None:
    origin_dir, files = origin
    dest = models_root / "m"
    server.add_fault("config.json", *[Fault(status=500)] * 10)
    with pytest.raises(TransientSourceError):
        engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="dead", options=SMALL)
    old = staging_dir_for(models_root, dest, "dead", 0)
    new = adopt_staging(old, staging_dir_for(models_root, dest, "alive", 1))
    assert not old.exists()
    server.reset()
    engine.pull(RangeSource(server.url, files), dest, models_root=models_root, writer="alive", epoch=1,
                options=SMALL)
    _assert_published(dest, origin_dir, files)
    assert server.bytes_sent < sum(f.size for f in files)  # what the dead writer had was adopted and kept
    assert not new.exists()


def test_enough_large_files_are_fetched_whole_in_parallel_with_nothing_read_back(
        tmp_path: Path, models_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    sizes = {f"shard-{i}.bin": 2 * MiB + i for i in range(4)}
    files = make_model(tmp_path / "o", sizes, seed=11)
    with RangeServer(tmp_path / "o") as srv, caplog.at_level("INFO", logger="modelherd.storage.fetch"):
        engine.pull(RangeSource(srv.url, files), models_root / "m", models_root=models_root, writer="a",
                    options=SMALL)  # 4 files over the 1 MiB threshold, concurrency 4: no splitting
        assert sorted(srv.requests) == sorted((n, f"bytes=0-{s - 1}") for n, s in sizes.items())
    _assert_published(models_root / "m", tmp_path / "o", files)
    assert "0.0 MiB re-read for hashing" in caplog.text


def test_fewer_large_files_than_concurrency_are_split_into_ranged_parts(
        tmp_path: Path, models_root: Path) -> None:
    files = make_model(tmp_path / "o", {"a.bin": 2 * MiB, "b.bin": 2 * MiB, "small.json": 100}, seed=12)
    with RangeServer(tmp_path / "o") as srv:
        engine.pull(RangeSource(srv.url, files), models_root / "m", models_root=models_root, writer="a",
                    options=SMALL)
        assert sum(1 for n, _ in srv.requests if n == "a.bin") == 4  # 512 KiB parts
    _assert_published(models_root / "m", tmp_path / "o", files)


def test_one_stream_file_resumes_from_its_last_good_hash_checkpoint_and_refetches_a_damaged_one(
        tmp_path: Path, models_root: Path) -> None:
    files = make_model(tmp_path / "o", {"whole.bin": 3 * MiB}, seed=13)
    opts = EngineOptions(multipart_threshold=64 * MiB, chunk_size=64 * KiB, checkpoint_size=128 * KiB,
                                retry=RetryPolicy(retries=0))
    dest = models_root / "m"
    with RangeServer(tmp_path / "o") as srv:
        srv.add_fault("whole.bin", Fault(truncate_after=700_000), *[Fault(status=403)] * 4)
        with pytest.raises(SourceError):
            engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="a", options=opts)
        staging = staging_dir_for(models_root, dest, "a", 0)
        state = json.loads(next((staging / STATE_DIRNAME).glob("*.json")).read_text())
        assert len(state["prefix"]) == 5 and state["prefix_algo"] == "sha256"  # 5 x 128 KiB < 700 KB
        _flip_byte(staging / "whole.bin", 3 * 128 * KiB + 9)  # damage checkpointed segment 3
        srv.reset()
        engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="a", options=opts)
        assert srv.requests == [("whole.bin", f"bytes={3 * 128 * KiB}-{3 * MiB - 1}")]
        assert srv.bytes_sent == 3 * MiB - 3 * 128 * KiB
    _assert_published(dest, tmp_path / "o", files)


def test_parts_checkpointed_by_a_split_run_are_kept_when_the_rerun_would_not_split(
        tmp_path: Path, models_root: Path) -> None:
    files = make_model(tmp_path / "o", {"big.bin": 2 * MiB, "other.bin": 2 * MiB}, seed=14)
    split = EngineOptions(multipart_threshold=1 * MiB, part_size=512 * KiB, chunk_size=64 * KiB,
                                 checkpoint_size=128 * KiB, retry=RetryPolicy(retries=0), concurrency=4)
    dest = models_root / "m"
    with RangeServer(tmp_path / "o") as srv:
        srv.add_fault("big.bin", *[Fault(truncate_after=300_000)] * 4, *[Fault(status=403)] * 4)
        with pytest.raises(SourceError):
            engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="a", options=split)
        srv.reset()
        whole = EngineOptions(multipart_threshold=1 * MiB, part_size=512 * KiB, chunk_size=64 * KiB,
                                     checkpoint_size=128 * KiB, concurrency=2)  # 2 big files >= 2: no split now
        engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="a", options=whole)
        # big.bin keeps its 512 KiB parts; parts that got checkpointed segments resume after them
        ranges = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for n, r in srv.requests if n == "big.bin"]
        assert sorted(end + 1 for _, end in ranges) == [(p + 1) * 512 * KiB for p in range(len(ranges))]
        assert all(start % (128 * KiB) == 0 for start, _ in ranges)
        assert any(start % (512 * KiB) != 0 for start, _ in ranges)
    _assert_published(dest, tmp_path / "o", files)


def test_more_files_than_slots_run_concurrency_at_a_time_largest_first(tmp_path: Path, models_root: Path) -> None:
    sizes = {"a-small.json": 10, "b-big.bin": 300 * KiB, "c-mid.bin": 100 * KiB, "d-tiny.txt": 1}
    files = make_model(tmp_path / "o", sizes, seed=15)
    opts = EngineOptions(concurrency=1, multipart_concurrency=2, chunk_size=64 * KiB)  # 2 slots < 4 files
    with RangeServer(tmp_path / "o") as srv:
        engine.pull(RangeSource(srv.url, files), models_root / "m", models_root=models_root, writer="a",
                    options=opts)
        assert [n for n, _ in srv.requests] == sorted(sizes, key=lambda n: -sizes[n])
    _assert_published(models_root / "m", tmp_path / "o", files)


def test_direct_io_keeps_a_pulled_model_out_of_the_page_cache_and_buffered_io_does_not(
        tmp_path: Path, models_root: Path) -> None:
    from tests.support import resident_fraction

    files = make_model(tmp_path / "o", {"w.safetensors": 8 * MiB + 100}, seed=21)
    resident = {}
    with RangeServer(tmp_path / "o") as srv:
        for mode in ("on", "off"):
            dest = models_root / mode
            engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="a",
                        options=EngineOptions(chunk_size=1 * MiB, direct_io=mode))
            resident[mode] = resident_fraction(dest / "w.safetensors")  # before anything reads it back
            _assert_published(dest, tmp_path / "o", files)
    if resident["on"] > 0.9:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert resident["on"] < 0.1 and resident["off"] > 0.9, resident


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem that refuses ``O_DIRECT`` (``open`` fails with EINVAL): ramfs."""
    yield from _mounted(tmp_path / "ramfs", "ramfs")


def test_a_filesystem_refusing_o_direct_gets_buffered_writes_and_the_same_model(
        ramfs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from modelherd.storage.directio import FileWriter

    fd = os.open(ramfs / "probe", os.O_RDWR | os.O_CREAT, 0o644)
    with FileWriter(fd, ramfs / "probe", direct=True) as probe:
        assert not probe.direct, "ramfs accepted O_DIRECT: this test needs a filesystem that refuses it"
    os.close(fd)

    files = make_model(tmp_path / "o", {"w.safetensors": 3 * MiB + 5, "config.json": 300}, seed=22)
    with RangeServer(tmp_path / "o") as srv, caplog.at_level("INFO", logger="modelherd.storage.fetch"):
        engine.pull(RangeSource(srv.url, files), ramfs / "m", models_root=ramfs, writer="a",
                    options=EngineOptions(chunk_size=1 * MiB, direct_io="on"))
    _assert_published(ramfs / "m", tmp_path / "o", files)
    assert "0.0 MiB written with O_DIRECT" in caplog.text
    assert _staging_is_empty(ramfs)
