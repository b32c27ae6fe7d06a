"""The filesystem id: one random id per filesystem, created atomically by whoever looks first."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from modelherd.storage import fsid
from modelherd.storage.errors import ModelsRootError


def _id_in_child(root: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    fsid._cache.clear()
    out.put(fsid.filesystem_id(Path(root)))


def test_many_processes_racing_to_create_the_marker_all_read_one_id(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_id_in_child, args=(str(tmp_path), out)) for _ in range(12)]
    for p in procs:
        p.start()
    ids = {out.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(10)
    assert len(ids) == 1 and len(next(iter(ids))) == 32
    assert (tmp_path / fsid.MARKER_NAME).read_text().strip() == next(iter(ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == [fsid.MARKER_NAME], "no temporary file is left"


def test_two_roots_are_two_filesystems_and_the_id_survives_a_new_process(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ida, idb = fsid.filesystem_id(a), fsid.filesystem_id(b)
    assert ida != idb
    fsid._cache.clear()
    assert fsid.filesystem_id(a) == ida


@pytest.mark.parametrize("content", ["", "abc", "g" * 32, "0" * 31, "0" * 32 + "\n" + "1" * 32])
def test_a_marker_that_is_not_one_id_is_an_error_never_replaced(tmp_path: Path, content: str) -> None:
    (tmp_path / fsid.MARKER_NAME).write_text(content)
    fsid._cache.clear()
    with pytest.raises(ModelsRootError, match="does not hold one id"):
        fsid.filesystem_id(tmp_path)
    assert (tmp_path / fsid.MARKER_NAME).read_text() == content


def test_a_read_only_root_without_a_marker_has_no_id_and_reads_one_once_it_exists(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a read-only bind mount")
    root = tmp_path / "root"
    root.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nfrom pathlib import Path\nfrom modelherd.storage.fsid import filesystem_id\n"
                     "print(repr(filesystem_id(Path(sys.argv[1]))))\n")
    script = f'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec {sys.executable} {probe} "$0"'

    def read_only_view() -> str:
        run = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(root)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert read_only_view() == "''"
    assert list(root.iterdir()) == []
    made = fsid.filesystem_id(root)  # a writable node creates it
    assert read_only_view() == repr(made)


def test_a_filesystem_without_hard_links_gets_one_id_by_exclusive_create(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno as _errno

    def no_links(*_a: object, **_k: object) -> None:
        raise OSError(_errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    made = fsid.filesystem_id(tmp_path)
    assert len(made) == 32 and (tmp_path / fsid.MARKER_NAME).read_text().strip() == made
    assert sorted(p.name for p in tmp_path.iterdir()) == [fsid.MARKER_NAME]
    fsid._cache.clear()
    assert fsid.filesystem_id(tmp_path) == made


def test_an_empty_marker_being_written_is_waited_for_then_refused(tmp_path: Path) -> None:
    (tmp_path / fsid.MARKER_NAME).write_text("")
    fsid._cache.clear()
    with pytest.raises(ModelsRootError):
        fsid._read(tmp_path / fsid.MARKER_NAME, settle_s=0.2)
