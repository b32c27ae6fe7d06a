"""Property-based tests of verification on generated hostile input (Hypothesis, derandomized).

The properties: verify returns Problems or nothing, never raises and never hangs (each example has a
deadline); a Problem always prints as one line; and on safetensors files built from plausible headers with
one mutation each, quick verification says "whole" exactly when the installed safetensors opens the file.
"""

from __future__ import annotations

import json
import struct
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelherd.storage.errors import VerificationError
from modelherd.storage.manifest import MANIFEST_NAME, read_manifest
from modelherd.storage.ready import published_model
from modelherd.storage.untrusted import UntrustedInputError, load_json
from modelherd.storage.verify import DTYPE_BITS, Problem, check_safetensors, verify_quick
from safetensors import SafetensorError, safe_open

from tests.modelgen import make_sharded_model, write_test_manifest

# Deterministic in CI (derandomize: the examples are a function of the test), no example database, and a
# bounded run time: a few hundred small examples, each with a deadline that a hang cannot meet.
FUZZ = settings(max_examples=250, deadline=timedelta(seconds=2), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SHARD = "model-00001-of-00001.safetensors"

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=24)
# Names worth trying as file names in an index: real, escaping, absolute, control characters, odd.
names = st.sampled_from([SHARD, "../x.safetensors", "/etc/passwd", "a\nb", "\x1b[31m", "", ".", "a:b",
                         "missing.safetensors", "sub/../../x", "x" * 300]) | st.text(max_size=20)
# Documents that are not JSON we read, in bulk shapes a generator of small values would never reach.
pathological = st.sampled_from(["[" * 5000 + "]" * 5000, "1" * 5000, "[NaN]", "{" * 3000, '"\\', "\ufeff{}",
                                '{"a": ' + "9" * 40 + "}", '{"weight_map": ' + "[" * 200 + "]" * 200 + "}"])


def documents(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Bytes of a document: a near-valid one, any JSON value, a pathological text, or raw bytes."""
    return st.one_of(
        valid.map(lambda v: json.dumps(v).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        pathological.map(str.encode),
        st.binary(max_size=64),
    )


def assert_reported(problems: list[Problem]) -> None:
    assert isinstance(problems, list)
    for p in problems:
        assert isinstance(p, Problem) and isinstance(p.path, str) and isinstance(p.message, str)
        line = str(p)
        assert line.isprintable(), line  # no newline, CR, ESC or other control character reaches the output


# ---- the JSON loader ----------------------------------------------------------------------------------------


@FUZZ
@given(documents(json_values) | st.text(max_size=64).map(str.encode))
def test_load_json_returns_a_value_or_raises_one_typed_error(raw: bytes) -> None:
    try:
        load_json(raw, max_bytes=1 << 20)
    except UntrustedInputError as e:
        assert str(e).isprintable()


# ---- safetensors headers: a Problem or valid, and "valid" means safetensors opens it ----------------------

dtypes = st.sampled_from(sorted(DTYPE_BITS))
shapes = st.lists(st.integers(0, 5), max_size=3)
MUTATIONS = ["none", "offset+1", "offset-1", "dim+1", "dtype", "drop-field", "extra-byte", "truncate",
             "metadata", "entry", "bool-dim", "huge-dim", "three-offsets", "swap-offsets"]


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A header of 0-4 tensors laid out as a writer would, then one mutation (or none)."""
    header: dict[str, Any] = {}
    pos = 0
    for i in range(draw(st.integers(0, 4))):
        dtype, shape = draw(dtypes), draw(shapes)
        numel = 1
        for d in shape:
            numel *= d
        n = -(-numel * DTYPE_BITS[dtype] // 8)  # rounded up: sub-byte shapes may be misaligned on purpose
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    data_len = pos
    mutation = draw(st.sampled_from(MUTATIONS))
    tensors = [k for k in header if k != "__metadata__"]
    victim = header[draw(st.sampled_from(tensors))] if tensors else None
    if victim is not None:
        if mutation == "offset+1":
            victim["data_offsets"][draw(st.integers(0, 1))] += 1
        elif mutation == "offset-1":
            victim["data_offsets"][draw(st.integers(0, 1))] -= 1
        elif mutation == "dim+1" and victim["shape"]:
            victim["shape"][0] += 1
        elif mutation == "dtype":
            victim["dtype"] = draw(dtypes | st.sampled_from(["Q9", "f32", ""]))
        elif mutation == "drop-field":
            del victim[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        elif mutation == "entry":
            header[tensors[0]] = draw(json_values)
        elif mutation == "bool-dim":
            victim["shape"] = [*victim["shape"], True]
        elif mutation == "huge-dim":
            victim["shape"] = [*victim["shape"], draw(st.sampled_from([2**64 - 1, 2**64, 2**63, 2**53 + 1]))]
        elif mutation == "three-offsets":
            victim["data_offsets"] = [*victim["data_offsets"], 0]
        elif mutation == "swap-offsets":
            victim["data_offsets"].reverse()
    if mutation == "extra-byte":
        data_len += 1
    elif mutation == "truncate" and data_len:
        data_len -= 1
    elif mutation == "metadata":
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(0, 7))  # writers pad the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw + bytes(max(0, data_len))


def safetensors_opens(path: Path) -> bool:
    try:
        with safe_open(str(path), "numpy") as f:
            f.keys()
    except SafetensorError:
        return False
    return True


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(safetensors_files())
def test_quick_verify_agrees_with_safetensors_on_mutated_headers(scratch: Path, raw: bytes) -> None:
    p = scratch / "model.safetensors"
    p.write_bytes(raw)
    reasons = check_safetensors(p)
    assert all(isinstance(r, str) for r in reasons)
    assert (reasons == []) == safetensors_opens(p), reasons


def with_length(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@FUZZ
@given(documents(st.dictionaries(st.text(max_size=6), json_values, max_size=3)).map(with_length)
       | st.builds(lambda n, body: struct.pack("<Q", n) + body, st.integers(0, 2**64 - 1), st.binary(max_size=32))
       | st.binary(max_size=12))
def test_any_safetensors_file_is_a_problem_or_valid(scratch: Path, raw: bytes) -> None:
    d = scratch / "header"
    d.mkdir(exist_ok=True)
    p = d / "model.safetensors"
    p.write_bytes(raw)
    reasons = check_safetensors(p)
    assert all(isinstance(r, str) for r in reasons)
    if reasons == []:
        assert safetensors_opens(p)
    assert_reported(verify_quick(d))


# ---- shard index, model_index.json, manifest -------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    make_sharded_model(d, 1, 1024)
    write_test_manifest(d)
    return d


index_docs = st.fixed_dictionaries({
    "metadata": json_values,
    "weight_map": st.dictionaries(st.text(max_size=8), names, max_size=4) | json_values,
})


@FUZZ
@given(documents(index_docs))
def test_any_shard_index_is_a_problem_or_valid(model: Path, doc: bytes) -> None:
    (model / "model.safetensors.index.json").write_bytes(doc)
    assert_reported(verify_quick(model, allow_extra=True))


model_index_docs = st.dictionaries(names, st.lists(json_values | st.none(), max_size=3) | json_values, max_size=4)


@FUZZ
@given(documents(model_index_docs))
def test_any_model_index_is_a_problem_or_valid(model: Path, doc: bytes) -> None:
    (model / "model_index.json").write_bytes(doc)
    try:
        assert_reported(verify_quick(model, allow_extra=True))
    finally:
        (model / "model_index.json").unlink()


manifest_entries = st.fixed_dictionaries(
    {"path": names | json_values, "size": st.integers(-1, 2**64) | json_values},
    optional={"checksums": st.dictionaries(st.text(max_size=6), st.text(max_size=8)) | json_values})
manifest_docs = st.fixed_dictionaries(
    {"source_uri": st.just("local:///test") | json_values, "revision": st.just("main") | json_values,
     "writer": st.text(max_size=4) | json_values, "completed_at": st.just("2025-01-01") | json_values,
     "files": st.lists(manifest_entries, max_size=3) | json_values},
    optional={"version": st.integers(-1, 3) | json_values})


@FUZZ
@given(documents(manifest_docs))
def test_any_manifest_is_read_or_a_verification_error_and_the_fast_path_never_raises(model: Path,
                                                                                     doc: bytes) -> None:
    mp = model / MANIFEST_NAME
    good = mp.read_bytes()
    mp.write_bytes(doc)
    try:
        try:
            read_manifest(model)
        except VerificationError as e:
            assert e.exit_code == 5 and str(e).isprintable()
        assert published_model(model, "local:///test", None) is None or doc == good
        assert_reported(verify_quick(model, require_manifest=True))
    finally:
        mp.write_bytes(good)
