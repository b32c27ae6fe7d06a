"""Removing published models and staging (storage/cleanup.py) and the exclusive operation under a lease
(coordination/exclusive.py), on real files and real file leases; no cluster needed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from modelherd.coordination.backend import Phase
from modelherd.coordination.exclusive import run_exclusive
from modelherd.coordination.filelease import FileLease
from modelherd.coordination.identity import ModelIdentity
from modelherd.storage.cleanup import collect_staging, remove_published, remove_staging_of, staging_key
from modelherd.storage.errors import UnsafePathError
from modelherd.storage.manifest import Manifest, ManifestFile, write_manifest
from modelherd.storage.paths import STAGING_DIRNAME

SOURCE = "hf://org/model"


def publish_fake(dest: Path, source: str = SOURCE, data: bytes = b"weights" * 100) -> Path:
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(data)
    write_manifest(dest, Manifest(source_uri=source, revision="abc", writer="n",
                                  files=(ManifestFile("model.safetensors", len(data)),)))
    return dest


def test_remove_published_removes_the_model_and_open_files_stay_readable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dest = publish_fake(root / "org" / "model")
    held = (dest / "model.safetensors").open("rb")
    try:
        assert remove_published(root, dest, writer="n1", source_uri=SOURCE + "@v2").outcome == "removed"
        assert held.read() == b"weights" * 100, "an open file stays readable after the removal"
    finally:
        held.close()
    assert not dest.exists() and not (root / "org").exists(), "the emptied org/ folder goes as well"
    assert root.is_dir()
    assert os.listdir(root / STAGING_DIRNAME) == [], "the trash is deleted"
    assert remove_published(root, dest, writer="n1", source_uri=SOURCE).outcome == "absent"


@pytest.mark.parametrize("case", ["no-manifest", "other-source", "nested-model", "symlink"])
def test_remove_published_keeps_what_it_did_not_publish(tmp_path: Path, case: str) -> None:
    root = tmp_path / "root"
    dest = root / "org" / "model"
    if case == "no-manifest":
        dest.mkdir(parents=True)
        (dest / "user-file").write_text("mine")
    elif case == "other-source":
        publish_fake(dest, source="hf://other/repo")
    elif case == "nested-model":
        publish_fake(dest)
        publish_fake(dest / "inner")
    else:
        publish_fake(root / "real")
        dest.parent.mkdir(parents=True)
        dest.symlink_to(root / "real")
    before = sorted(str(p) for p in root.rglob("*"))
    result = remove_published(root, dest, writer="n1", source_uri=SOURCE)
    assert result.outcome == "kept" and result.detail
    assert sorted(str(p) for p in root.rglob("*")) == before


@pytest.mark.parametrize("where", ["outside", "root", "reserved"])
def test_remove_published_refuses_paths_outside_the_models_root(tmp_path: Path, where: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dest = {"outside": tmp_path / "elsewhere", "root": root, "reserved": root / ".modelherd-leases" / "x"}[where]
    if where != "root":
        publish_fake(dest)
    with pytest.raises(UnsafePathError):
        remove_published(root, dest, writer="n1")
    assert dest.exists()


def test_racing_removers_remove_a_model_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    dest = publish_fake(root / "org" / "model")
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def one(i: int) -> None:
        start.wait()
        outcomes.append(remove_published(root, dest, writer=f"n{i}", source_uri=SOURCE).outcome)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes).count("removed") == 1, outcomes
    assert not dest.exists()


def _plant(root: Path, dest: Path, writer: str, age_s: float | None) -> Path:
    folder = root / STAGING_DIRNAME / f"{staging_key(root, dest)}.{writer}.0"
    (folder / "d").mkdir(parents=True)
    (folder / "d" / "f").write_bytes(b"x")
    if age_s is not None:
        t = time.time() - age_s
        for p in (folder / "d" / "f", folder / "d", folder):
            os.utime(p, (t, t))
    return folder


def test_collect_staging_removes_only_unchanged_unprotected_staging_by_its_bound(tmp_path: Path) -> None:
    root = tmp_path / "root"
    orphan_old = _plant(root, root / "gone", "a", 7200)
    orphan_new = _plant(root, root / "gone2", "a", None)
    wanted_old = _plant(root, root / "wanted", "a", 7200)
    wanted_stale = _plant(root, root / "wanted2", "a", 2 * 86400)
    protected = _plant(root, root / "busy", "a", 7200)
    newest_inside = _plant(root, root / "gone3", "a", 7200)
    (newest_inside / "d" / "f").write_bytes(b"written just now")
    lock = root / STAGING_DIRNAME / f"{orphan_old.name}.lock"
    lock.write_text("1 host")
    wanted = {staging_key(root, root / "wanted"), staging_key(root, root / "wanted2")}
    removed = collect_staging(root, wanted=wanted, protected={staging_key(root, root / "busy")},
                              orphan_age_s=3600, stale_age_s=86400)
    assert sorted(removed) == sorted([orphan_old.name, wanted_stale.name])
    assert not orphan_old.exists() and not wanted_stale.exists()
    for kept in (orphan_new, wanted_old, protected, newest_inside):
        assert kept.exists(), kept.name
    # the orphan's lock file was held by nobody: the collector owned the staging (own_staging) to remove it,
    # and an owner removes its lock file on release
    assert not lock.exists()


def test_remove_staging_of_removes_every_writer_of_that_destination_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    mine = [_plant(root, root / "org/m", w, None) for w in ("n1", "n2.example.com")]
    other = _plant(root, root / "org/m2", "n1", None)
    assert sorted(remove_staging_of(root, root / "org/m")) == sorted(p.name for p in mine)
    assert other.exists()


def test_run_exclusive_runs_once_and_later_callers_find_it_done(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    identity = ModelIdentity(SOURCE, "", "org/model")
    ran: list[str] = []
    results: dict[str, bool | None] = {}
    start = threading.Barrier(4)

    def node(name: str) -> None:
        lease = FileLease(root, identity, name, duration_s=5, poll_interval_s=0.2, jitter_s=0.05)
        start.wait()

        def op() -> bool:
            ran.append(name)
            time.sleep(0.2)
            return True
        results[name] = run_exclusive(lease, op, done_phase=Phase.REMOVED, working_phase=Phase.REMOVING,
                                      max_wait_s=30, jitter_s=0.05)

    threads = [threading.Thread(target=node, args=(f"n{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ran) == 1, ran
    assert sorted(results.values(), key=str) == [None, None, None, True]
    record = FileLease(root, identity, "late").observe()
    assert record is not None and not record.held and record.phase == Phase.REMOVED


def test_run_exclusive_that_did_nothing_keeps_the_previous_phase(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    lease = FileLease(root, ModelIdentity(SOURCE, "", "org/model"), "n1", duration_s=5)
    assert run_exclusive(lease, lambda: False, done_phase=Phase.REMOVED, working_phase=Phase.REMOVING) is False
    record = lease.observe()
    assert record is not None and not record.held and record.phase != Phase.REMOVED
    # a later caller runs it again (nothing was recorded as done)
    assert run_exclusive(lease, lambda: True, done_phase=Phase.REMOVED, working_phase=Phase.REMOVING) is True
