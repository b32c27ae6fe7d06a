"""Verification on hostile and unlucky input: it reports a Problem, it never crashes, hangs or lies.

Every document verify or the manifest reader parses (safetensors header, shard index, model_index.json,
completion manifest) gets the same hostile payloads; files that are not regular files are never opened;
dtypes are checked against the installed safetensors itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modelherd.storage import verify
from modelherd.storage.errors import MalformedListingError, SourceError, VerificationError
from modelherd.storage.manifest import MANIFEST_NAME, read_manifest
from modelherd.storage.options import EngineOptions
from modelherd.storage.ready import published_model
from modelherd.storage.sources.local import LocalSource
from modelherd.storage.types import RemoteFile
from modelherd.storage.untrusted import UntrustedInputError, load_json, open_regular
from modelherd.storage.uri import parse_uri
from modelherd.storage.verify import DTYPE_BITS, MAX_FILES, Problem, check_safetensors, verify_deep, verify_quick
from safetensors import SafetensorError, deserialize, safe_open

from tests.modelgen import make_diffusers_model, make_sharded_model, write_test_manifest

# ---- helpers ----------------------------------------------------------------------------------------------


def safetensors_bytes(header: dict[str, object] | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def text(problems: list[Problem]) -> str:
    return "\n".join(map(str, problems))


class Watchdog:
    """Unblocks a reader stuck in ``open()`` of a FIFO (by opening its write end) after ``after`` seconds,
    and remembers that it had to: a test can then fail instead of hanging the suite."""

    def __init__(self, fifo: Path, after: float = 5.0) -> None:
        self.fired = False
        self._fifo = fifo
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(after,), daemon=True)

    def _run(self, after: float) -> None:
        if self._done.wait(after):
            return
        self.fired = True
        with contextlib.suppress(OSError):
            os.close(os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader sees EOF

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


@contextlib.contextmanager
def fifo_guard(fifo: Path) -> Iterator[Watchdog]:
    with Watchdog(fifo) as w:
        yield w
    assert not w.fired, f"blocked opening the FIFO {fifo.name}: a FIFO must be reported, never opened"


DEEP = "[" * 100_000 + "]" * 100_000
# A valid integer that Python refuses to parse (digit limit, default 4300) ...
HUGE_INT = "1" * 5000
# ... and one it parses, whose products and messages overflowed float conversion / str() formatting.
BIG_INT = "9" * 4000


# ---- one safe JSON loader ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "needle"), [
    (DEEP, "nested more than"),
    ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested more than"),
    ("[" * 300_000, "brackets do not balance"),
    (HUGE_INT, "digits"),
    (f"[{BIG_INT}]", "digits"),
    ("[NaN]", "NaN is not JSON"),
    ('{"a": -Infinity}', "Infinity is not JSON"),
    ("{", "not JSON"),
    (b"\xff{}", "invalid UTF-8"),
    ("\ufeff{}", "not JSON"),
])
def test_load_json_refuses_hostile_documents_with_one_typed_error(doc: str | bytes, needle: str) -> None:
    with pytest.raises(UntrustedInputError) as ei:
        load_json(doc, max_bytes=10**7)
    assert needle in str(ei.value)


def test_load_json_keeps_strings_that_look_like_brackets_and_allows_sane_depth() -> None:
    deep_but_fine = "[" * 100 + "]" * 100
    assert load_json(f'{{"k": "{"[" * 10_000}", "d": {deep_but_fine}}}', max_bytes=10**6)["k"] == "[" * 10_000
    with pytest.raises(UntrustedInputError, match="more than the 10 allowed"):
        load_json("[" + "1," * 10 + "1]", max_bytes=10)


# ---- hostile JSON in each document verify reads -------------------------------------------------------------


HOSTILE = {
    "deep nesting": DEEP,
    "deep nesting inside an object": '{"weight_map": ' + "[" * 50_000 + "]" * 50_000 + "}",
    "integer beyond the digit limit": HUGE_INT,
    "integer in a field": '{"weight_map": {"t": ' + HUGE_INT + "}}",
    "NaN": '{"x": NaN}',
    "not UTF-8": "\udcff",  # written with surrogateescape: the byte 0xff
}


def _write(p: Path, doc: str) -> None:
    p.write_bytes(doc.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("doc", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("name", ["model.safetensors.index.json", "model_index.json", MANIFEST_NAME])
def test_hostile_json_document_is_a_problem_not_a_crash(tmp_path: Path, name: str, doc: str) -> None:
    make_sharded_model(tmp_path, 1, 1024)
    _write(tmp_path / name, doc)
    problems = verify_quick(tmp_path)
    assert name in {p.path for p in problems}, text(problems)
    assert all("\n" not in str(p) for p in problems)


@pytest.mark.parametrize("doc", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_json_in_a_safetensors_header_is_a_problem(tmp_path: Path, doc: str) -> None:
    p = tmp_path / "model.safetensors"
    p.write_bytes(safetensors_bytes(doc.encode("utf-8", "surrogateescape")))
    reasons = check_safetensors(p)
    assert reasons and all(r.startswith("header") for r in reasons), reasons
    assert [q.path for q in verify_quick(tmp_path)] == ["model.safetensors"]


@pytest.mark.parametrize(("tensor", "needle"), [
    ({"dtype": "U8", "shape": [int(BIG_INT)], "data_offsets": [0, 1]}, "an integer of 4000 digits"),
    ({"dtype": "U8", "shape": [10**25], "data_offsets": [0, 1]}, "bad shape"),
    ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}, "overflows 64 bits"),
    ({"dtype": "U8", "shape": [2**63, 2**63, 0], "data_offsets": [0, 0]}, "overflows 64 bits"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [0, 2**64]}, "bad data_offsets"),
    ({"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}, "bad shape"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [False, True]}, "bad data_offsets"),
    ({"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}, "unknown dtype"),
    ({"dtype": "U8", "shape": [1] * 100_000, "data_offsets": [0, 2]}, "needs 1"),
])
def test_absurd_shapes_and_offsets_are_problems_like_safetensors_says(tmp_path: Path, tensor: dict[str, object],
                                                                       needle: str) -> None:
    p = tmp_path / "x.safetensors"
    raw = safetensors_bytes({"t": tensor}, b"\0\0")
    p.write_bytes(raw)
    reasons = check_safetensors(p)
    assert needle in "\n".join(reasons)
    assert all(len(r) < 400 for r in reasons), "an absurd value is shown abridged"
    with pytest.raises(SafetensorError):
        deserialize(raw)


def test_size_check_is_exact_past_two_to_the_53(tmp_path: Path) -> None:
    """2**53 + 1 bytes of U8: a float computed 2**53 and reported a size mismatch that is not there."""
    n = 2**53 + 1
    p = tmp_path / "x.safetensors"
    p.write_bytes(safetensors_bytes({"t": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}))
    reasons = check_safetensors(p)
    assert not any("needs" in r for r in reasons), reasons
    assert any(r.startswith(f"truncated: tensors need {n} data bytes") for r in reasons)


def test_metadata_must_map_strings_to_strings_like_safetensors_says(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    t = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    for meta, ok in (({"format": "pt"}, True), (None, True), ({"n": 1}, False), (["pt"], False)):
        raw = safetensors_bytes({"__metadata__": meta, "t": t}, b"x")
        p.write_bytes(raw)
        assert (check_safetensors(p) == []) is ok, meta
        with contextlib.nullcontext() if ok else pytest.raises(SafetensorError):
            deserialize(raw)


def test_lone_surrogate_tensor_name_is_refused_like_safetensors_does(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    raw = safetensors_bytes(b'{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"x")
    p.write_bytes(raw)
    assert "not valid Unicode" in "\n".join(check_safetensors(p))
    with pytest.raises(SafetensorError):
        deserialize(raw)
    assert "\\ud800" in text(verify_quick(tmp_path)), "printed escaped, never as a raw surrogate"


# ---- the completion manifest: hostile → VerificationError, and the fast path says "not published" ------------


def _manifest_doc(**file: object) -> str:
    entry = {"path": "config.json", "size": 2, "checksums": {}, **file}
    return json.dumps({"source_uri": "hf://org/m", "revision": "main", "writer": "t",
                       "completed_at": "2025-01-01T00:00:00+00:00", "files": [entry]})


HOSTILE_MANIFESTS = {
    **HOSTILE,
    "size Infinity": _manifest_doc(size=float("inf")),
    "size is a float": _manifest_doc(size=2.5),
    "size negative": _manifest_doc(size=-1),
    "size is a string": _manifest_doc(size="2"),
    "path escapes": _manifest_doc(path="../evil"),
    "path with a newline": _manifest_doc(path="config.json\nOK"),
    "path is a number": _manifest_doc(path=3),
    "checksums a list": _manifest_doc(checksums=[["sha256", "00"]]),
    "files not a list": '{"files": {"a": 1}, "source_uri": "x"}',
    "a list": "[]",
    "source_uri not a string": json.dumps({"source_uri": ["x"], "revision": "r", "writer": "w",
                                           "completed_at": "c", "files": []}),
}


@pytest.mark.parametrize("doc", HOSTILE_MANIFESTS.values(), ids=HOSTILE_MANIFESTS.keys())
def test_hostile_manifest_is_a_verification_error_and_not_published(tmp_path: Path, doc: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    _write(tmp_path / MANIFEST_NAME, doc)
    with pytest.raises(VerificationError) as ei:
        read_manifest(tmp_path)
    assert ei.value.exit_code == 5 and ei.value.hint
    assert "\n" not in ei.value.message
    assert published_model(tmp_path, "hf://org/m", None) is None
    assert [p.path for p in verify_quick(tmp_path, require_manifest=True)] == [MANIFEST_NAME]


def test_manifest_that_is_a_folder_or_unreadable_is_a_verification_error(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).mkdir()
    with pytest.raises(VerificationError, match="directory"):
        read_manifest(tmp_path)
    assert published_model(tmp_path, "hf://org/m", None) is None
    assert [p.path for p in verify_quick(tmp_path)] == [MANIFEST_NAME]


# ---- FIFOs, sockets and devices are reported, never opened --------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json", "model_index.json",
                                  MANIFEST_NAME])
def test_fifo_named_like_a_model_file_is_reported_not_opened(tmp_path: Path, name: str) -> None:
    make_sharded_model(tmp_path, 1, 1024)
    (tmp_path / name).unlink(missing_ok=True)
    os.mkfifo(tmp_path / name)
    with fifo_guard(tmp_path / name):
        problems = verify_quick(tmp_path)
        assert published_model(tmp_path, "local:///test", None) is None
    assert any(p.path == name and "named pipe (FIFO)" in p.message for p in problems), text(problems)


def test_fifo_listed_in_the_manifest_is_not_hashed_by_deep_verify(tmp_path: Path) -> None:
    make_sharded_model(tmp_path, 1, 1024)
    write_test_manifest(tmp_path)
    (tmp_path / "config.json").unlink()
    os.mkfifo(tmp_path / "config.json")
    with fifo_guard(tmp_path / "config.json"):
        problems = verify_deep(tmp_path)
    assert {p.path for p in problems} == {"config.json"}


def test_socket_named_like_a_model_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_sharded_model(tmp_path, 1, 1024, with_index=False)
    (tmp_path / "model.safetensors").unlink()
    with socket.socket(socket.AF_UNIX) as s:
        monkeypatch.chdir(tmp_path)  # AF_UNIX paths are limited to ~108 bytes; bind relative to the folder
        s.bind("model.safetensors")
        problems = verify_quick(tmp_path)
    assert [(p.path, p.message) for p in problems] == [
        ("model.safetensors", "is a socket, not a regular file (not opened)")]


def test_device_named_like_a_model_file_is_reported_not_opened(tmp_path: Path) -> None:
    try:
        os.mknod(tmp_path / "model.safetensors", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
    except PermissionError:
        pytest.skip("no CAP_MKNOD here")
    problems = verify_quick(tmp_path)
    assert [p.message for p in problems] == ["is a character device, not a regular file (not opened)"]


def test_symlink_inside_to_a_fifo_and_dangling_symlink_are_reported(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "pipe")
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "nowhere")
    with fifo_guard(tmp_path / "pipe"):
        by = {p.path: p.message for p in verify_quick(tmp_path)}
    assert "named pipe" in by["model.safetensors"] and "named pipe" in by["pipe"]
    assert "dangling symlink" in by["gone.safetensors"]


def test_open_regular_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p")
    with fifo_guard(tmp_path / "p"), pytest.raises(UntrustedInputError, match="FIFO"):
        open_regular(tmp_path / "p")
    (tmp_path / "f").write_bytes(b"abc")
    with open_regular(tmp_path / "f") as f:
        assert f.read() == b"abc"


def test_local_source_reports_a_fifo_when_listing_and_never_opens_one(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    src = LocalSource(parse_uri(f"local://{tmp_path}"))
    listed = src.list_files().files
    assert [f.path for f in listed] == ["config.json"]
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(SourceError, match=r"model\.safetensors is a named pipe"):
        src.list_files()
    # a file swapped for a FIFO after the listing: open refuses it at once
    (tmp_path / "config.json").unlink()
    os.mkfifo(tmp_path / "config.json")
    with fifo_guard(tmp_path / "config.json"), pytest.raises(SourceError, match="named pipe"):
        src.open(RemoteFile("config.json", 2, locator="config.json"))


# ---- dtypes: the table is the installed safetensors' -------------------------------------------------------


def installed_safetensors_dtypes() -> list[str]:
    """The dtype names the installed safetensors accepts, from its own error message for an unknown one
    (empty if it ever stops listing them: the table test then fails and says so)."""
    try:
        deserialize(safetensors_bytes({"t": {"dtype": "NOT_A_DTYPE", "shape": [0], "data_offsets": [0, 0]}}))
    except SafetensorError as e:
        return re.findall(r"`([A-Z0-9_]+)`", str(e).partition("expected one of")[2])
    return []


INSTALLED_DTYPES = installed_safetensors_dtypes()


def safetensors_bits(dtype: str) -> int:
    """Bits per element as the installed safetensors sees them: the one byte length it accepts for 8
    elements (8 elements x any bit width fill whole bytes)."""
    accepted = []
    for nbytes in range(1, 65):
        try:
            deserialize(safetensors_bytes({"t": {"dtype": dtype, "shape": [8], "data_offsets": [0, nbytes]}},
                                          b"\0" * nbytes))
            accepted.append(nbytes)
        except SafetensorError:
            pass
    assert len(accepted) == 1, (dtype, accepted)
    return accepted[0]


def test_dtype_table_is_exactly_what_the_installed_safetensors_accepts() -> None:
    assert INSTALLED_DTYPES, "the installed safetensors no longer lists its dtypes in its error message"
    assert {"F8_E4M3FNUZ", "F8_E5M2FNUZ"} <= set(INSTALLED_DTYPES)  # ROCm FP8 checkpoints
    assert {d: safetensors_bits(d) for d in INSTALLED_DTYPES} == DTYPE_BITS


@pytest.mark.parametrize("dtype", INSTALLED_DTYPES)
def test_every_dtype_safetensors_accepts_verifies(tmp_path: Path, dtype: str) -> None:
    p = tmp_path / "model.safetensors"
    n = 8 * 3  # elements: whole bytes for every width
    size = n * safetensors_bits(dtype) // 8
    p.write_bytes(safetensors_bytes({"t": {"dtype": dtype, "shape": [2, 12], "data_offsets": [0, size]}},
                                    b"\x01" * size))
    with safe_open(str(p), "numpy") as f:
        assert list(f.keys()) == ["t"]
    assert check_safetensors(p) == []
    assert verify_quick(tmp_path) == []


# ---- names: control characters never reach the output raw; POSIX names are names --------------------------


def test_problem_prints_as_one_line_whatever_the_name() -> None:
    forged = Problem("x.safetensors\n/models/m: OK\x1b[2K", "bad \x1b[31mred\r")
    line = str(forged)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.startswith("'x.safetensors\\n/models/m: OK\\x1b[2K': ")
    assert str(Problem("a:b.txt", "missing")) == "a:b.txt: missing"


def test_diffusers_class_name_with_a_newline_cannot_forge_a_line(tmp_path: Path) -> None:
    make_diffusers_model(tmp_path)
    doc = json.loads((tmp_path / "model_index.json").read_text())
    doc["ghost"] = ["diffusers", "Cls\nmodel_index.json: OK"]
    (tmp_path / "model_index.json").write_text(json.dumps(doc))
    problems = verify_quick(tmp_path)
    assert len(problems) == 1 and "'ghost'" in problems[0].message
    assert "\n" not in str(problems[0])


# ---- bounds: a tree that is no model folder (local:///, local:///proc/self) stops the walk at once ------------


def _empty_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.close(os.open(folder / f"f{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))


def test_more_files_than_a_model_may_have_is_one_problem_quickly(tmp_path: Path) -> None:
    assert MAX_FILES == EngineOptions().max_files == 20_000
    _empty_files(tmp_path / "a", MAX_FILES // 2)
    _empty_files(tmp_path / "b", MAX_FILES // 2 + 1)
    t0 = time.monotonic()
    problems = verify_quick(tmp_path)
    assert time.monotonic() - t0 < 10
    assert [str(p) for p in problems] == [f".: more than {MAX_FILES} files: not a model folder"]


def test_walk_stops_at_the_first_file_too_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _empty_files(tmp_path, 500)
    stats = 0
    real_stat = os.stat

    def counting_stat(*args: Any, **kwargs: Any) -> os.stat_result:
        nonlocal stats
        stats += 1
        return real_stat(*args, **kwargs)

    monkeypatch.setattr(verify.os, "stat", counting_stat)
    problems = verify_quick(tmp_path, max_files=10)
    monkeypatch.undo()
    assert [p.message for p in problems] == ["more than 10 files: not a model folder"]
    assert stats <= 12  # the folder itself, ten files: never the other 490


def test_exactly_max_files_plus_the_manifest_verifies(tmp_path: Path) -> None:
    _empty_files(tmp_path / "sub", 9)
    (tmp_path / "config.json").write_text("{}")
    write_test_manifest(tmp_path)
    assert verify_quick(tmp_path, require_manifest=True, max_files=10) == []
    assert verify_deep(tmp_path, require_manifest=True, max_files=10) == []
    (tmp_path / "extra").write_text("")
    assert [p.message for p in verify_quick(tmp_path, max_files=10)] == ["more than 10 files: not a model folder"]
    # past its bounds deep verification hashes nothing: the one problem, no manifest findings
    assert [p.message for p in verify_deep(tmp_path, max_files=10)] == ["more than 10 files: not a model folder"]


def test_a_tree_of_empty_folders_is_bounded_too(tmp_path: Path) -> None:
    deep = tmp_path
    for i in range(30):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    assert [p.message for p in verify_quick(tmp_path, max_files=20)] == ["more than 20 folders: not a model folder"]


def test_a_deadline_of_zero_stops_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_sharded_model(tmp_path, n_shards=2)
    write_test_manifest(tmp_path)
    assert verify_quick(tmp_path, require_manifest=True) == []

    def no_walk(*_: Any, **__: Any) -> Any:
        raise AssertionError("scandir after the deadline")

    monkeypatch.setattr(verify.os, "scandir", no_walk)
    for check in (verify_quick, verify_deep):
        problems = check(tmp_path, deadline_s=0)
        assert len(problems) == 1 and problems[0].path == "."
        assert problems[0].message.startswith("not verified within 0 s: stopped")


def test_deadline_stops_a_walk_that_is_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _empty_files(tmp_path, 200)
    clock = iter(range(10_000))  # every look at the clock is one second later
    monkeypatch.setattr(verify.time, "monotonic", lambda: float(next(clock)))
    problems = verify_quick(tmp_path, deadline_s=50)
    monkeypatch.undo()
    assert [p.message for p in problems] == ["not verified within 50 s: stopped (too many or too slow files for a "
                                             "model folder)"]
    assert next(clock) < 60  # it stopped at the deadline, not after the 200 files


def test_local_source_listing_is_bounded(tmp_path: Path) -> None:
    _empty_files(tmp_path / "m", 11)
    with pytest.raises(MalformedListingError, match="more than 10 files: not a model folder"):
        LocalSource(parse_uri(f"local://{tmp_path}"), max_files=10).list_files()
    (tmp_path / "m" / "f00000").unlink()
    write_test_manifest(tmp_path)  # modelherd's own files do not count
    listed = LocalSource(parse_uri(f"local://{tmp_path}"), max_files=10).list_files().files
    assert len(listed) == 10
