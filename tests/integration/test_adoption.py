"""Issue #17, adoption: a folder that holds a model's files but no completion manifest (OME's agent, ``huggingface-cli
download --local-dir``, rsync, a copy job) is verified in place and published; only what is missing or damaged is
fetched, and what is not the model's stays where it is.

The CLI runs as a process against the loopback Hub (which counts every body byte it serves); the copies are made by
``huggingface_hub.snapshot_download(local_dir=...)`` against that Hub, so they carry the real ``.cache/huggingface/``
layout. The engine-level tests use the loopback range server.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from modelherd.storage import adopt, engine
from modelherd.storage.errors import DestinationError
from modelherd.storage.manifest import read_manifest
from modelherd.storage.options import EngineOptions
from modelherd.storage.paths import staging_root
from modelherd.storage.publish import publish, recover_interrupted_publish
from modelherd.storage.staging import aside_path, staging_dir_for
from modelherd.storage.types import RemoteFile
from modelherd.storage.verify import verify_deep, verify_quick

from tests.hubserver import HubServer
from tests.integration.test_cli import pull_hf, run_cli
from tests.modelgen import make_sharded_model
from tests.rangeserver import RangeServer, RangeSource, make_model

REPO = "acme/tiny"
SHARD = "model-00002-of-00003.safetensors"
KiB, MiB = 1024, 1024 * 1024


@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path) -> HubServer:
    make_sharded_model(tmp_path / "src", 3, 300_000)
    hub_server.add_repo(REPO, tmp_path / "src", lfs_min_size=100_000)
    return hub_server


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "models"


def prestage(hub: HubServer, dest: Path, cache: Path) -> Path:
    """A copy of ``REPO`` at ``dest`` as ``huggingface-cli download --local-dir`` leaves it, plus an operator's
    ``NOTES.md``; the Hub's counters are reset afterwards."""
    from huggingface_hub import snapshot_download

    snapshot_download(REPO, local_dir=dest, endpoint=hub.endpoint, cache_dir=cache)
    assert (dest / ".cache" / "huggingface" / "download").is_dir()
    (dest / "NOTES.md").write_text("fine-tuned from this one, see ticket 42\n")
    hub.reset_counters()
    return dest


def model_files(dest: Path) -> dict[str, int]:
    """Inode of every file of the model (not the manifest, not what is kept beside it)."""
    return {p.relative_to(dest).as_posix(): p.stat().st_ino for p in dest.rglob("*")
            if p.is_file() and ".cache" not in p.parts and p.name not in ("NOTES.md", ".modelherd-manifest.json")}


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.read_bytes()) for p in folder.rglob("*")
            if p.is_file()}


def ready(r: Any) -> dict[str, Any]:
    assert r.returncode == 0, r.stderr[-3000:]
    line: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["status"] == "Ready"
    return line


def staging_is_empty(root: Path) -> bool:
    return not staging_root(root).exists() or not any(staging_root(root).iterdir())


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# ------------------------------------------------------------------------------------------------ the CLI
def test_an_intact_local_dir_copy_is_adopted_in_place_without_a_body_byte(hub: HubServer, root: Path,
                                                                          tmp_path: Path) -> None:
    dest = prestage(hub, root / REPO, tmp_path / "hf-cache")
    cache_before = snapshot(dest / ".cache")
    inodes = model_files(dest)
    ready(pull_hf(hub, REPO, root))
    assert hub.stats()["bytes_served"] == 0, "only the listing is asked for"
    assert model_files(dest) == inodes, "the files are kept in place: same inodes, nothing copied"
    assert (dest / "NOTES.md").read_text().startswith("fine-tuned")
    assert snapshot(dest / ".cache") == cache_before
    manifest = read_manifest(dest)
    assert manifest is not None and manifest.foreign == (".cache", "NOTES.md")
    assert {f.path for f in manifest.files} == set(inodes)
    deep = run_cli("verify", str(dest), "--deep")
    assert deep.returncode == 0, deep.stdout + deep.stderr
    assert staging_is_empty(root)

    hub.reset_counters()  # later pulls take the fast path: no request at all
    ready(pull_hf(hub, REPO, root))
    assert hub.stats()["requests"] == {} and model_files(dest) == inodes


def test_a_flipped_byte_fetches_that_file_alone(hub: HubServer, root: Path, tmp_path: Path) -> None:
    dest = prestage(hub, root / REPO, tmp_path / "hf-cache")
    flip(dest / SHARD, 1000)
    inodes = model_files(dest)
    ready(pull_hf(hub, REPO, root))
    stats = hub.stats()
    assert stats["bytes_served"] == (tmp_path / "src" / SHARD).stat().st_size
    assert list(stats["bytes_served_by_path"]) and all(SHARD in p for p in stats["bytes_served_by_path"])
    assert (dest / SHARD).read_bytes() == (tmp_path / "src" / SHARD).read_bytes()
    after = model_files(dest)
    assert after[SHARD] != inodes[SHARD] and {k: v for k, v in after.items() if k != SHARD} == \
        {k: v for k, v in inodes.items() if k != SHARD}
    assert verify_deep(dest, require_manifest=True) == []
    assert (dest / "NOTES.md").exists() and (dest / ".cache" / "huggingface").is_dir()


def test_a_missing_file_fetches_that_file_alone(hub: HubServer, root: Path, tmp_path: Path) -> None:
    dest = prestage(hub, root / REPO, tmp_path / "hf-cache")
    (dest / SHARD).unlink()
    ready(pull_hf(hub, REPO, root))
    assert hub.stats()["bytes_served"] == (tmp_path / "src" / SHARD).stat().st_size
    assert verify_deep(dest, require_manifest=True) == []


def test_a_folder_of_someones_data_is_refused_with_nothing_deleted(hub: HubServer, root: Path) -> None:
    data = root / REPO
    (data / "runs").mkdir(parents=True)
    (data / "runs" / "weights.bin").write_bytes(os.urandom(1000))
    (data / "results.csv").write_text("1,2,3\n")
    before = snapshot(data)
    r = pull_hf(hub, REPO, root)
    assert r.returncode == 4, r.stderr
    assert "results.csv" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(data) == before and hub.stats()["bytes_served"] == 0 and staging_is_empty(root)


def test_a_folder_of_another_model_with_the_same_names_is_refused_after_hashing(hub: HubServer, root: Path,
                                                                               tmp_path: Path) -> None:
    other = root / REPO
    for f in (tmp_path / "src").rglob("*"):  # same names and sizes, other bytes: only hashing tells
        if f.is_file():
            (other / f.relative_to(tmp_path / "src")).parent.mkdir(parents=True, exist_ok=True)
            (other / f.relative_to(tmp_path / "src")).write_bytes(os.urandom(f.stat().st_size))
    before = snapshot(other)
    r = pull_hf(hub, REPO, root)
    assert r.returncode == 4, r.stderr
    assert "not a copy of this model" in r.stderr
    assert snapshot(other) == before and hub.stats()["bytes_served"] == 0 and staging_is_empty(root)


def test_a_repair_after_adoption_keeps_what_is_not_the_models(hub: HubServer, root: Path, tmp_path: Path) -> None:
    dest = prestage(hub, root / REPO, tmp_path / "hf-cache")
    ready(pull_hf(hub, REPO, root))
    os.truncate(dest / SHARD, 1000)
    hub.reset_counters()
    ready(pull_hf(hub, REPO, root))  # quick verification finds the damage: a repair
    assert hub.stats()["bytes_served"] == (tmp_path / "src" / SHARD).stat().st_size
    assert (dest / "NOTES.md").read_text().startswith("fine-tuned")
    assert (dest / ".cache" / "huggingface" / "download").is_dir()
    manifest = read_manifest(dest)
    assert manifest is not None and manifest.foreign == (".cache", "NOTES.md")
    assert verify_deep(dest, require_manifest=True) == []


def test_an_update_drops_the_old_revisions_files_and_keeps_the_operators(hub: HubServer, root: Path,
                                                                        tmp_path: Path) -> None:
    dest = prestage(hub, root / REPO, tmp_path / "hf-cache")
    ready(pull_hf(hub, REPO, root))
    (dest / "sub").mkdir()
    (dest / "sub" / "mine.txt").write_text("mine")
    src2 = tmp_path / "src2"
    make_sharded_model(src2, 2, 300_000, seed=3)  # a new revision: one shard fewer
    commit = hub.add_repo(REPO, src2, lfs_min_size=100_000)
    ready(pull_hf(hub, f"{REPO}@{commit}", root, "--dest", str(dest)))
    assert not (dest / "model-00003-of-00003.safetensors").exists(), "a file of the old revision goes"
    assert (dest / "sub" / "mine.txt").read_text() == "mine" and (dest / "NOTES.md").exists()
    manifest = read_manifest(dest)
    assert manifest is not None and manifest.revision == commit
    assert manifest.foreign == (".cache", "NOTES.md", "sub")
    assert verify_deep(dest, require_manifest=True) == []


# ------------------------------------------------------------------------------------------------ the engine
SMALL = EngineOptions(multipart_threshold=1 * MiB, part_size=512 * KiB, chunk_size=64 * KiB,
                             checkpoint_size=128 * KiB)


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Path, list[RemoteFile]]:
    files = make_model(tmp_path / "origin", {"a.bin": 3 * MiB + 5, "nested/b.bin": 2 * MiB, "c.json": 300,
                                             "empty.txt": 0})
    return tmp_path / "origin", files


def _copy_of(origin_dir: Path, dest: Path) -> None:
    for p in origin_dir.rglob("*"):
        if p.is_file():
            (dest / p.relative_to(origin_dir)).parent.mkdir(parents=True, exist_ok=True)
            (dest / p.relative_to(origin_dir)).write_bytes(p.read_bytes())


def test_the_engine_tells_the_adoption_phases_and_counts_bytes_hashed(origin: tuple[Path, list[RemoteFile]],
                                                                      root: Path) -> None:
    origin_dir, files = origin
    dest = root / "m"
    _copy_of(origin_dir, dest)
    flip(dest / "nested/b.bin", 7)
    (dest / "c.json").unlink()
    phases: list[tuple[str, adopt.Adoption | None]] = []
    progress: list[tuple[int, int]] = []
    lock = threading.Lock()

    def on_progress(done: int, total: int) -> None:
        with lock:
            progress.append((done, total))

    with RangeServer(origin_dir) as srv:
        engine.pull(RangeSource(srv.url, files), dest, models_root=root, writer="n", options=SMALL,
                    progress=on_progress, on_phase=lambda name, a: phases.append((name, a)))
        fetched = srv.bytes_sent
    assert [p[0] for p in phases] == ["adopting", "adopted", "downloading"]
    adoption = phases[1][1]
    assert adoption is not None and not adoption.intact
    assert set(adoption.kept) == {"a.bin", "empty.txt"} and adoption.failed == ("nested/b.bin",)
    assert adoption.missing == ("c.json",) and adoption.foreign == ()
    hashed = 3 * MiB + 5 + 2 * MiB
    assert (hashed, hashed) in progress, "the hashing reports bytes hashed of those to hash"
    assert fetched == 2 * MiB + 300
    assert verify_deep(dest, require_manifest=True) == []


def test_foreign_files_survive_a_filesystem_that_will_not_hard_link_them(origin: tuple[Path, list[RemoteFile]],
                                                                         root: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    origin_dir, files = origin
    dest = root / "m"
    _copy_of(origin_dir, dest)
    (dest / "notes").mkdir()
    (dest / "notes" / "a.txt").write_text("kept")
    real_link = os.link

    def no_link(src: Any, dst: Any, **kw: Any) -> None:
        if "notes" in str(src):
            raise PermissionError(1, "Operation not permitted")
        real_link(src, dst, **kw)

    monkeypatch.setattr(adopt.os, "link", no_link)
    with RangeServer(origin_dir) as srv:
        engine.pull(RangeSource(srv.url, files), dest, models_root=root, writer="n", options=SMALL)
    assert (dest / "notes" / "a.txt").read_text() == "kept"
    assert verify_quick(dest, require_manifest=True) == []


def test_publish_itself_refuses_a_folder_without_any_of_the_models_files(origin: tuple[Path, list[RemoteFile]],
                                                                        root: Path) -> None:
    """The agent may call the engine's steps itself: ``publish`` keeps the rule without ``stage``."""
    origin_dir, files = origin
    with RangeServer(origin_dir) as srv:
        source = RangeSource(srv.url, files)
        listing = source.list_files()
        staging = staging_dir_for(root, root / "data", "n", 0)
        manifest = engine.stage(source, listing, staging, dest=root / "empty-for-now", writer="n", options=SMALL)
    (root / "data").mkdir()
    (root / "data" / "results.csv").write_text("1,2,3")
    with pytest.raises(DestinationError):
        publish(staging, root / "data", manifest)
    assert (root / "data" / "results.csv").read_text() == "1,2,3"


def test_an_adoption_killed_between_its_two_renames_gets_the_folder_back(root: Path) -> None:
    """Without ``RENAME_EXCHANGE`` (NFS) publish moves ``dest`` aside, then staging in: a kill between the two leaves
    the folder being adopted aside; the next holder (any writer) puts it back before anything else."""
    dest = root / "org" / "m"
    aside = aside_path(staging_dir_for(root, dest, "node-a", 3))
    (aside / "sub").mkdir(parents=True)
    (aside / "sub" / "w.bin").write_bytes(b"w")
    (aside / "NOTES.md").write_text("mine")
    recover_interrupted_publish(root, dest)
    assert (dest / "NOTES.md").read_text() == "mine" and (dest / "sub" / "w.bin").read_bytes() == b"w"
    assert not aside.exists()


def test_the_lease_shows_adopting_with_bytes_hashed_while_the_holder_hashes(origin: tuple[Path, list[RemoteFile]],
                                                                            root: Path) -> None:
    from modelherd.coordination import LeaseTiming, Phase, run_coordinated
    from modelherd.coordination.coordinator import identity_for
    from modelherd.coordination.filelease import FileLease

    origin_dir, files = origin
    dest = root / "m"
    _copy_of(origin_dir, dest)
    (dest / "NOTES.md").write_text("mine")
    seen: list[Any] = []
    identity = identity_for("test://model", None, dest, root)

    def on_phase(name: str, adoption: adopt.Adoption | None) -> None:
        if name != "adopted":
            return
        # the holder is still in the adoption phase: the Lease must say so within a renewal nudge (not a period)
        watcher = FileLease(root, identity, "watcher", duration_s=5)
        try:
            for _ in range(50):
                rec = watcher.observe()
                if rec is not None and rec.phase == Phase.ADOPTING and rec.status.bytes_done == 5 * MiB + 305:
                    seen.append(rec)
                    return
                threading.Event().wait(0.05)
        finally:
            watcher.close()

    with RangeServer(origin_dir) as srv:
        source = RangeSource(srv.url, files)
        lease = FileLease(root, identity, "node-a", duration_s=5, poll_interval_s=0.2, jitter_s=0.1)
        try:
            result = run_coordinated(lease, source=source, listing_fn=source.list_files, dest=dest, models_root=root,
                                     node="node-a", options=SMALL, on_phase=on_phase,
                                     timing=LeaseTiming(duration_s=5, renew_period_s=2, jitter_s=0.1))
        finally:
            lease.close()
        assert srv.bytes_sent == 0
    assert seen, "the Lease never showed Adopting with the bytes hashed"
    assert seen[0].status.bytes_total == 5 * MiB + 305 and seen[0].holder == "node-a"
    assert result.role == "holder" and result.manifest.foreign == ("NOTES.md",)
    assert verify_quick(dest, require_manifest=True) == []


def test_removing_an_adopted_model_removes_the_whole_folder(origin: tuple[Path, list[RemoteFile]],
                                                            root: Path) -> None:
    from modelherd.storage.cleanup import remove_published

    origin_dir, files = origin
    dest = root / "m"
    _copy_of(origin_dir, dest)
    (dest / "NOTES.md").write_text("mine")
    with RangeServer(origin_dir) as srv:
        engine.pull(RangeSource(srv.url, files), dest, models_root=root, writer="n", options=SMALL)
    assert remove_published(root, dest, writer="n", source_uri="test://model").outcome == "removed"
    assert not dest.exists()
