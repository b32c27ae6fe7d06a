"""Issue #8, destination and staging safety: what ``--dest`` may replace, who owns a staging folder, what a
leftover in staging may become, and typed errors for names and roots the filesystem cannot hold.

Everything runs for real: the ``modelherd`` CLI as a process against the loopback Hub, the engine against the
loopback range server, two real processes for the staging race, a real read-only filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
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
    ModelherdError,
    TransientSourceError,
    UnsafePathError,
    VerificationError,
)
from modelherd.storage.fetch import fetch_into
from modelherd.storage.manifest import MANIFEST_NAME, Manifest, ManifestFile, read_manifest
from modelherd.storage.options import EngineOptions
from modelherd.storage.paths import staging_root
from modelherd.storage.publish import publish
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.staging import adopt_staging, aside_path, own_staging, staging_dir_for
from modelherd.storage.types import RemoteFile
from modelherd.storage.verify import verify_deep, verify_quick

from tests.hubserver import HubServer
from tests.integration.test_cli import pull_hf
from tests.modelgen import make_sharded_model
from tests.rangeserver import Fault, RangeServer, RangeSource, make_model

KiB, MiB = 1024, 1024 * 1024
MODELHERD = str(Path(sys.executable).parent / "modelherd")
SMALL = EngineOptions(multipart_threshold=1 * MiB, part_size=512 * KiB, chunk_size=64 * KiB,
                             checkpoint_size=128 * KiB, retry=RetryPolicy(retries=1, backoff_s=0.01,
                                                                          backoff_max_s=0.02))


@pytest.fixture
def models_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
def two_models(hub_server: HubServer, tmp_path: Path) -> HubServer:
    for name, seed in (("acme/one", 1), ("acme/two", 2)):
        make_sharded_model(tmp_path / "src" / name, 2, 200_000, seed=seed)
        hub_server.add_repo(name, tmp_path / "src" / name, lfs_min_size=100_000)
    return hub_server


def _staging_is_empty(models_root: Path) -> bool:
    root = staging_root(models_root)
    return not root.exists() or not any(root.iterdir())


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "unexpected error" not in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ item 1: --dest
def test_dest_naming_a_folder_of_other_models_is_refused_and_deletes_nothing(two_models: HubServer,
                                                                            models_root: Path) -> None:
    assert pull_hf(two_models, "acme/one", models_root).returncode == 0
    (models_root / "acme" / "notes.txt").write_text("a user's file")
    r = pull_hf(two_models, "acme/two", models_root, "--dest", "acme")  # the model name forgotten
    assert r.returncode == 4, r.stderr
    assert "acme/one" in r.stderr and "--dest" in r.stderr
    _no_traceback(r)
    assert verify_deep(models_root / "acme" / "one", require_manifest=True) == []
    assert (models_root / "acme" / "notes.txt").read_text() == "a user's file"
    assert _staging_is_empty(models_root)


@pytest.mark.parametrize("dest", [".modelherd-leases", ".modelherd-staging/x", "org/.modelherd-parts",
                                  ".modelherd-other"])
def test_dest_in_a_reserved_folder_is_refused_and_lease_records_survive(two_models: HubServer, models_root: Path,
                                                                        dest: str) -> None:
    leases = models_root / ".modelherd-leases"
    leases.mkdir()
    (leases / "lease.json").write_text("{}")
    r = pull_hf(two_models, "acme/one", models_root, "--dest", dest)
    assert r.returncode == 4, r.stderr
    assert ".modelherd-" in r.stderr and "reserved" in r.stderr
    _no_traceback(r)
    assert (leases / "lease.json").read_text() == "{}"
    assert two_models.bytes_served == 0


def test_engine_refuses_a_dest_holding_foreign_files_before_any_request(models_root: Path,
                                                                        tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"w.bin": 10_000})
    dest = models_root / "data"
    dest.mkdir()
    (dest / "results.csv").write_text("1,2,3")
    with RangeServer(tmp_path / "o") as srv:
        with pytest.raises(UnsafePathError) as info:
            engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="a", options=SMALL)
        assert srv.requests == []
    assert "results.csv" in str(info.value) and info.value.exit_code == 4
    assert (dest / "results.csv").read_text() == "1,2,3"


def test_engine_refuses_a_dest_inside_a_published_model(models_root: Path, tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"w.bin": 10_000})
    with RangeServer(tmp_path / "o") as srv:
        engine.pull(RangeSource(srv.url, files), models_root / "m", models_root=models_root, writer="a",
                    options=SMALL)
        with pytest.raises(UnsafePathError, match="published model"):
            engine.pull(RangeSource(srv.url, files), models_root / "m" / "sub", models_root=models_root,
                        writer="a", options=SMALL)
    assert verify_deep(models_root / "m", require_manifest=True) == []
    assert not (models_root / "m" / "sub").exists()


def test_engine_replaces_an_empty_folder_and_a_published_model(models_root: Path, tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"w.bin": 10_000, "c.json": 10})
    (models_root / "empty").mkdir()
    with RangeServer(tmp_path / "o") as srv:
        engine.pull(RangeSource(srv.url, files), models_root / "empty", models_root=models_root, writer="a",
                    options=SMALL)
        engine.pull(RangeSource(srv.url, files[:1], revision="r2"), models_root / "empty",
                    models_root=models_root, writer="a", options=SMALL)
    manifest = read_manifest(models_root / "empty")
    assert manifest is not None and manifest.revision == "r2" and not (models_root / "empty" / "c.json").exists()


def test_publish_called_directly_refuses_a_folder_of_other_models(models_root: Path, tmp_path: Path) -> None:
    """The agent calls the engine, not the CLI: ``publish`` itself keeps the rule."""
    files = make_model(tmp_path / "o", {"w.bin": 10_000})
    source_dest = models_root / "org" / "model"
    with RangeServer(tmp_path / "o") as srv:
        engine.pull(RangeSource(srv.url, files), source_dest, models_root=models_root, writer="a", options=SMALL)
        staging = staging_dir_for(models_root, models_root / "org", "a", 0)
        listing = RangeSource(srv.url, files).list_files()
        fetch_into(RangeSource(srv.url, files), listing, staging, options=SMALL)
    manifest = read_manifest(source_dest)
    assert manifest is not None
    with pytest.raises(UnsafePathError, match="org/model"):
        publish(staging, models_root / "org", manifest)
    assert verify_deep(source_dest, require_manifest=True) == []


# ------------------------------------------------------------------------------- item 3: one staging owner
def _wait_for_staged_bytes(root: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staged = [p for p in staging_root(root).rglob("*.safetensors")] if staging_root(root).exists() else []
        if any(p.stat().st_size > 0 for p in staged if p.exists()):
            return
        time.sleep(0.02)
    raise AssertionError("the first pull never started writing")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_pulls_on_one_node_download_once_and_publish_the_verified_bytes(hub_server: HubServer,
                                                                           tmp_path: Path) -> None:
    src = tmp_path / "src"
    size = sum(p.stat().st_size for p in make_sharded_model(src, 3, 400_000))
    hub_server.add_repo("acme/tiny", src, lfs_min_size=100_000)
    # each shard takes ~2.6 s (the throttle is per response): the second process (a Python start-up, a second or
    # more on a loaded machine) must arrive while the first still downloads
    hub_server.throttle("cdn", bytes_per_s=150 * KiB)
    root = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    env["HF_ENDPOINT"] = hub_server.endpoint
    args = [MODELHERD, "pull", "hf://acme/tiny", "--models-root", str(root), "--coordination", "none",
            "--node-name", "node-1", "--no-progress"]
    first = subprocess.Popen(args, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_staged_bytes(root)
        second = subprocess.run(args, env=env, text=True, capture_output=True, timeout=120)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1])["status"] == "Ready"
    assert "waiting for the pull" in second.stderr and "pid " in second.stderr, second.stderr
    assert verify_deep(root / "acme" / "tiny", require_manifest=True) == []
    for f in src.rglob("*"):
        if f.is_file():
            assert (root / "acme/tiny" / f.relative_to(src)).read_bytes() == f.read_bytes(), f.name
    assert hub_server.bytes_served <= size, "the second pull waited for the first and found the model published"
    assert _staging_is_empty(root)


def test_a_second_pull_told_not_to_wait_fails_clearly_while_the_first_goes_on(models_root: Path,
                                                                             tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"a.bin": 2 * MiB, "b.bin": 1 * MiB}, seed=4)
    dest = models_root / "m"
    errors: list[BaseException] = []
    with RangeServer(tmp_path / "o", rate=2 * MiB) as srv:
        def first() -> None:
            try:
                engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="node", options=SMALL)
            except BaseException as e:  # reported by the assertion below
                errors.append(e)

        t = threading.Thread(target=first)
        t.start()
        staging = staging_dir_for(models_root, dest, "node", 0)
        deadline = time.monotonic() + 10
        while not (staging / "a.bin").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ModelherdError) as info:
            engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="node", options=SMALL,
                        wait=False)
        t.join(30)
    assert "another pull" in str(info.value) and str(os.getpid()) in str(info.value)
    assert errors == []
    assert verify_deep(dest, require_manifest=True) == []
    assert _staging_is_empty(models_root)


def test_a_pull_waiting_for_another_stops_on_cancel_and_leaves_its_staging_alone(models_root: Path,
                                                                                 tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"w.bin": 1000})
    dest = models_root / "m"
    staging = staging_dir_for(models_root, dest, "node", 0)
    cancel, held, done = threading.Event(), threading.Event(), threading.Event()

    def other_pull() -> None:  # a thread of this process owns the staging folder, as the agent's pulls do
        with own_staging(staging):
            staging.mkdir(parents=True)
            (staging / "partial.bin").write_bytes(b"owned by the other pull")
            held.set()
            done.wait(10)

    owner = threading.Thread(target=other_pull)
    owner.start()
    try:
        assert held.wait(5)
        with RangeServer(tmp_path / "o") as srv:
            threading.Timer(0.3, cancel.set).start()
            started = time.monotonic()
            with pytest.raises(CancelledError, match="waiting for another pull"):
                engine.pull(RangeSource(srv.url, files), dest, models_root=models_root, writer="node",
                            options=SMALL, cancel=cancel)
            assert time.monotonic() - started < 2.0
            assert [n for n, _ in srv.requests] == []
        assert (staging / "partial.bin").read_bytes() == b"owned by the other pull"
    finally:
        done.set()
        owner.join()


_CONTEND = """
import os, sys, threading
from pathlib import Path
from modelherd.storage.staging import own_staging
staging, marker, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
overlaps = []
def contend():
    for _ in range(rounds):
        with own_staging(staging):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                overlaps.append(1)
                continue
            os.close(fd)
            os.unlink(marker)
threads = [threading.Thread(target=contend) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print(len(overlaps))
"""


@pytest.mark.multiprocess
def test_staging_ownership_excludes_threads_and_processes_while_lock_files_come_and_go(models_root: Path) -> None:
    """Two processes of two threads each take and give back one staging folder's ownership in a tight loop; the
    lock file is removed at every release, and still no two owners ever overlap."""
    staging = staging_dir_for(models_root, models_root / "m", "node", 0)
    marker = models_root / "owner"
    procs = [subprocess.Popen([sys.executable, "-c", _CONTEND, str(staging), str(marker), "300"],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert [int(o.strip()) for o in outs] == [0, 0]
    assert _staging_is_empty(models_root)


def test_publish_refuses_a_staged_file_rewritten_after_it_was_verified(models_root: Path, tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"w.bin": 300_000, "c.json": 100}, seed=5)
    dest = models_root / "m"
    staging = staging_dir_for(models_root, dest, "a", 0)
    with RangeServer(tmp_path / "o") as srv:
        source = RangeSource(srv.url, files)
        listing = source.list_files()
        digests = fetch_into(source, listing, staging, options=SMALL)
    # what an uncoordinated second writer does to the file: O_TRUNC, then the same size again
    time.sleep(0.01)
    with open(staging / "w.bin", "r+b") as f:
        f.truncate(0)
        f.truncate(300_000)
    manifest = Manifest(source_uri=listing.uri, revision=listing.revision, writer="a",
                               files=tuple(ManifestFile(path=rf.path, size=rf.size,
                                                               checksums=digests[rf.path]) for rf in listing.files))
    with pytest.raises(VerificationError, match=r"w\.bin"):
        publish(staging, dest, manifest)
    assert not dest.exists()


def test_adopting_the_staging_of_a_live_writer_leaves_it_alone(models_root: Path, tmp_path: Path) -> None:
    """A takeover must not move files out from under a writer that still runs (a paused process on this node)."""
    dest = models_root / "m"
    old = staging_dir_for(models_root, dest, "paused", 0)
    old.mkdir(parents=True)
    (old / "w.bin").write_bytes(b"x" * 1000)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from modelherd.storage.staging import own_staging\n"
        "with own_staging(Path(sys.argv[1]), wait=False):\n"
        "    print('held', flush=True); time.sleep(30)\n"), str(old)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        new = adopt_staging(old, staging_dir_for(models_root, dest, "alive", 1))
        assert (old / "w.bin").read_bytes() == b"x" * 1000
        assert not (new / "w.bin").exists()
    finally:
        holder.kill()
        holder.wait()
    # once the writer is gone its staging is adopted
    adopt_staging(old, new)
    assert (new / "w.bin").read_bytes() == b"x" * 1000 and not old.exists()


# ---------------------------------------------------------------------------------- item 9: stale staging
def _fail_pull(server: RangeServer, files: list[RemoteFile], dest: Path, models_root: Path, *,
               revision: str, failing: str) -> None:
    server.add_fault(failing, *[Fault(status=500)] * 10)
    with pytest.raises(TransientSourceError):
        engine.pull(RangeSource(server.url, files, revision=revision), dest, models_root=models_root, writer="a",
                    options=SMALL)
    server.reset()


def test_a_file_left_by_a_failed_pull_of_another_revision_is_not_published(models_root: Path,
                                                                           tmp_path: Path) -> None:
    old = make_model(tmp_path / "o", {"old-only.bin": 50_000, "w.bin": 60_000, "c.json": 100}, seed=6)
    dest = models_root / "m"
    with RangeServer(tmp_path / "o") as srv:
        _fail_pull(srv, old, dest, models_root, revision="r1", failing="c.json")
        assert (staging_dir_for(models_root, dest, "a", 0) / "old-only.bin").exists()
        engine.pull(RangeSource(srv.url, old[1:], revision="r2"), dest, models_root=models_root, writer="a",
                    options=SMALL)
    assert not (dest / "old-only.bin").exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted([MANIFEST_NAME, "w.bin", "c.json"])
    assert verify_quick(dest, require_manifest=True) == []
    assert _staging_is_empty(models_root)


def test_a_file_without_checksum_from_another_revision_is_fetched_again(models_root: Path, tmp_path: Path) -> None:
    make_model(tmp_path / "o1", {"notes.txt": 5000, "w.bin": 5000}, seed=7)
    make_model(tmp_path / "o2", {"notes.txt": 5000}, seed=8)  # same name and size, other bytes
    unchecked = [RemoteFile(path="notes.txt", size=5000), RemoteFile(path="w.bin", size=5000)]
    dest = models_root / "m"
    with RangeServer(tmp_path / "o1") as srv:
        _fail_pull(srv, unchecked, dest, models_root, revision="r1", failing="w.bin")
    assert (staging_dir_for(models_root, dest, "a", 0) / "notes.txt").exists()
    with RangeServer(tmp_path / "o2") as srv:
        engine.pull(RangeSource(srv.url, unchecked[:1], revision="r2"), dest, models_root=models_root, writer="a",
                    options=SMALL)
    assert (dest / "notes.txt").read_bytes() == (tmp_path / "o2" / "notes.txt").read_bytes()


def test_an_old_model_left_in_staging_by_a_kill_after_the_swap_is_not_published(models_root: Path,
                                                                                tmp_path: Path) -> None:
    files = make_model(tmp_path / "o", {"only-old.bin": 40_000, "w.bin": 60_000}, seed=9)
    dest = models_root / "m"
    with RangeServer(tmp_path / "o") as srv:
        engine.pull(RangeSource(srv.url, files, revision="r1"), dest, models_root=models_root, writer="a",
                    options=SMALL)
        # the directory swap happened, then the process died before removing staging: the old model is there
        shutil.copytree(dest, staging_dir_for(models_root, dest, "a", 0))
        engine.pull(RangeSource(srv.url, files[1:], revision="r2"), dest, models_root=models_root, writer="a",
                    options=SMALL)
    assert sorted(p.name for p in dest.iterdir()) == sorted([MANIFEST_NAME, "w.bin"])
    manifest = read_manifest(dest)
    assert manifest is not None and manifest.revision == "r2"
    assert _staging_is_empty(models_root)


def test_a_publish_killed_after_moving_the_old_model_aside_is_undone_by_the_next_pull(models_root: Path,
                                                                                      tmp_path: Path) -> None:
    """Without ``RENAME_EXCHANGE`` (NFS) publish moves the old model to ``<staging>.old`` first; a kill right
    there leaves no model at ``dest``. The next pull puts the old one back before it downloads."""
    files = make_model(tmp_path / "o", {"w.bin": 60_000, "c.json": 100}, seed=11)
    dest = models_root / "m"
    with RangeServer(tmp_path / "o") as srv:
        engine.pull(RangeSource(srv.url, files, revision="r1"), dest, models_root=models_root, writer="a",
                    options=SMALL)
        os.rename(dest, aside_path(staging_dir_for(models_root, dest, "a", 0)))
        _fail_pull(srv, files, dest, models_root, revision="r2", failing="c.json")
    manifest = read_manifest(dest)
    assert manifest is not None and manifest.revision == "r1"
    assert verify_deep(dest, require_manifest=True) == []
    assert not aside_path(staging_dir_for(models_root, dest, "a", 0)).exists()


# ------------------------------------------------------------------------- item 11: typed errors, no traceback
@pytest.mark.parametrize("names", [("a", "a/b"), ("x/y", "x/y/z")])
def test_a_file_and_a_folder_of_the_same_name_is_a_typed_error(hub_server: HubServer, models_root: Path,
                                                               names: tuple[str, str]) -> None:
    hub_server.add_files("acme/clash", {names[0]: b"file", names[1]: b"inside"})
    r = pull_hf(hub_server, "acme/clash", models_root)
    _no_traceback(r)
    assert r.returncode == 4 and "both a file and a folder" in r.stderr, r.stderr


def test_a_name_over_255_bytes_is_a_typed_error(hub_server: HubServer, models_root: Path) -> None:
    hub_server.add_files("acme/long", {"d/" + "é" * 128 + ".bin": b"x", "config.json": b"{}"})
    r = pull_hf(hub_server, "acme/long", models_root)
    _no_traceback(r)
    assert r.returncode == 4 and "255 bytes" in r.stderr, r.stderr


def test_a_models_root_that_is_a_file_is_a_typed_error(two_models: HubServer, tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.write_text("not a folder")
    r = pull_hf(two_models, "acme/one", root)
    _no_traceback(r)
    assert r.returncode == 2 and "not a directory" in r.stderr and "--models-root" in r.stderr, r.stderr
    assert root.read_text() == "not a folder"


def test_dest_under_a_file_is_a_typed_error(two_models: HubServer, models_root: Path) -> None:
    (models_root / "org").write_text("a file")
    r = pull_hf(two_models, "acme/one", models_root, "--dest", "org/model")
    _no_traceback(r)
    assert r.returncode == 4 and "org" in r.stderr and "file" in r.stderr, r.stderr
    assert (models_root / "org").read_text() == "a file"


@pytest.fixture
def readonly_root(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {r.stderr.decode().strip()}")
        mnt.chmod(0o555)  # not root: permissions are enforced
        yield mnt
        mnt.chmod(0o755)
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_models_root_is_a_typed_error(two_models: HubServer, readonly_root: Path) -> None:
    r = pull_hf(two_models, "acme/one", readonly_root)
    _no_traceback(r)
    assert r.returncode == 2 and "not writable" in r.stderr, r.stderr
    assert two_models.bytes_served == 0
