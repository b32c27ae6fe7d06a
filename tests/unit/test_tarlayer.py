"""tarlayer.extract_layers on tars built here: hostile entries are typed errors that write nothing outside the
destination; last wins for duplicates; pax headers and sizes bounded."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from modelherd.storage.errors import UnsafeArchiveError
from modelherd.storage.tarlayer import Layer, extract_layers
from modelherd.storage.types import Unpack

from tests.integration.test_registry_tar import HOSTILE, info, tar_bytes

WHY = {"dotdot": "leaves the model folder", "absolute": "absolute name", "symlink-out": "outside the model folder",
       "symlink-up": "outside the model folder", "hardlink-passwd": "absolute name",
       "hardlink-out": "outside the model folder", "device": "special file", "fifo": "special file",
       "huge": "claims 1000000000000000 bytes", "reserved": "reserved prefix", "models-symlink": "is not a folder"}


def extract(tmp_path: Path, tars: list[bytes], root: str = "models", **kw: object) -> dict[str, str]:
    dest = tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    layers = []
    for i, data in enumerate(tars):
        blob = tmp_path / f"layer{i}"
        blob.write_bytes(data)
        layers.append(Layer(blob, f"sha256:{hashlib.sha256(data).hexdigest()}", Unpack(i, root, bool(root))))
    got = extract_layers(layers, dest, max_files=100, fsync=False, **kw)  # type: ignore[arg-type]
    return {p: e.sha256 for p, e in got.items()}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_entries_are_refused_and_write_nothing_outside(tmp_path, case):
    with pytest.raises(UnsafeArchiveError, match=WHY[case]):
        extract(tmp_path, [tar_bytes([("models/ok.bin", b"ok"), *HOSTILE[case]])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "layer0"]
    assert all((p.is_file() and not p.is_symlink()) or p.is_dir() for p in (tmp_path / "dest").rglob("*"))


def test_last_entry_wins_and_an_earlier_hard_link_keeps_its_bytes(tmp_path):
    got = extract(tmp_path, [tar_bytes([("models/a", b"one"), info("models/b", tarfile.LNKTYPE, "models/a"),
                                        ("models/a", b"two")])])
    assert (tmp_path / "dest/a").read_bytes() == b"two" and (tmp_path / "dest/b").read_bytes() == b"one"
    assert got["a"] == hashlib.sha256(b"two").hexdigest()


def test_a_huge_pax_header_is_refused(tmp_path, monkeypatch):
    from modelherd.storage import tarlayer
    monkeypatch.setattr(tarlayer, "MAX_HEADER_BYTES", 100)
    with pytest.raises(UnsafeArchiveError, match="extended tar header"):
        extract(tmp_path, [tar_bytes([("models/" + "x" * 200, b"x")])])


def test_a_truncated_layer_is_refused(tmp_path):
    data = tar_bytes([("models/a", b"a" * 5000)])
    with pytest.raises(UnsafeArchiveError, match=r"not a readable tar|holds"):
        extract(tmp_path, [data[:2048]])


def test_a_file_under_a_file_is_refused(tmp_path):
    with pytest.raises(UnsafeArchiveError, match="under the file"):
        extract(tmp_path, [tar_bytes([("models/a", b"a"), ("models/a/b", b"b")])])


def test_whole_archive_layers_take_every_entry(tmp_path):
    got = extract(tmp_path, [tar_bytes([("dir/x", b"x"), ("dir/.wh.y", b"kept as a file")])], root="")
    assert set(got) == {"dir/x", "dir/.wh.y"}


# Python before 3.11.4 (Debian bookworm's 3.11.2, the e2e agent image) has no tarfile.data_filter: the same checks
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_without_tarfiles_data_filter_hostile_entries_are_still_refused(tmp_path, monkeypatch, case):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.delattr(tarfile, "FilterError", raising=False)
    monkeypatch.delattr(tarfile.TarInfo, "replace", raising=False)
    test_hostile_entries_are_refused_and_write_nothing_outside(tmp_path, case)


def test_without_tarfiles_data_filter_a_modelcar_with_links_extracts(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    monkeypatch.delattr(tarfile, "FilterError", raising=False)
    monkeypatch.delattr(tarfile.TarInfo, "replace", raising=False)
    got = extract(tmp_path, [tar_bytes([("bin/sh", b"#!"), ("models/w.bin", b"w"), ("models/sub/c.json", b"{}"),
                                        info("models/sub/link.bin", tarfile.SYMTYPE, "../w.bin"),
                                        info("models/hard.json", tarfile.LNKTYPE, "models/sub/c.json")])])
    assert sorted(got) == ["hard.json", "sub/c.json", "sub/link.bin", "w.bin"]
    assert (tmp_path / "dest/sub/link.bin").read_bytes() == b"w"


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    return ti


FILTER_CASES = [_member("a/b.bin"), _member("a/"), _member("../x"), _member("a/../../x"),
                _member("dev", tarfile.CHRTYPE), _member("fifo", tarfile.FIFOTYPE),
                _member("a/l", tarfile.SYMTYPE, "../b"), _member("a/l", tarfile.SYMTYPE, "../../b"),
                _member("a/l", tarfile.SYMTYPE, "/etc/passwd"), _member("h", tarfile.LNKTYPE, "a/b.bin"),
                _member("h", tarfile.LNKTYPE, "../b"), _member("h", tarfile.LNKTYPE, "/etc/passwd")]


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="this Python has no tarfile.data_filter to agree with")
@pytest.mark.parametrize("member", FILTER_CASES, ids=lambda m: f"{m.name}->{m.linkname}")
def test_the_fallback_refuses_exactly_what_tarfiles_data_filter_refuses(tmp_path, member):
    from modelherd.storage.tarlayer import _data_filter_problem
    try:
        tarfile.data_filter(member, str(tmp_path))
        refused = False
    except tarfile.FilterError:
        refused = True
    assert (_data_filter_problem(member, str(tmp_path)) is not None) == refused


def test_the_fallback_refuses_an_absolute_name_which_tarfiles_data_filter_would_strip(tmp_path):
    from modelherd.storage.tarlayer import _data_filter_problem
    assert "absolute" in (_data_filter_problem(_member("/etc/passwd"), str(tmp_path)) or "")
