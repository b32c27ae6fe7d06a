"""ConfigMap entry values: Go's json.Marshal byte for byte (contract §1.3) and OME's merge rules (§1.4)."""

from __future__ import annotations

import json

import pytest
from modelherd.agent.ome.entry import (
    KEEP,
    STATUS_FAILED,
    STATUS_READY,
    STATUS_UPDATING,
    DownloadProgress,
    GoMap,
    go_float,
    go_json,
    parse_entry,
    render_entry,
)

READY_HF = (
    '{"name":"llama-3-1-8b-instruct","status":"Ready","config":{"modelType":"llama","modelArchitecture":'
    '"LlamaForCausalLM","modelFramework":{"name":"transformers","version":"4.43.0.dev0"},"modelFormat":{"name":'
    '"safetensors","version":"1.0.0"},"modelParameterSize":"8.03B","maxTokens":131072,"modelCapabilities":'
    '["TEXT_TO_TEXT"],"decodedModelConfiguration":{"architecture":"LlamaForCausalLM","context_length":131072,'
    '"has_vision":false,"is_embedding":false,"model_size_bytes":16060522496,"model_type":"llama","parameter_count":'
    '"8.03B","torch_dtype":"bfloat16","transformers_version":"4.43.0.dev0"},"artifact":{"sha":'
    '"0e9e39f249a16976918f6564b8830bc894c89659","parentPath":{"clusterbasemodel.llama-3-1-8b-instruct":'
    '"/mnt/data/models/llama-3-1-8b-instruct"},"childrenPaths":[]}}}'
)
PROGRESS = (
    '{"name":"llama-3-1-8b-instruct","status":"Updating","progress":{"phase":"downloading","totalBytes":16060522496,'
    '"completedBytes":4015130624,"totalFiles":12,"completedFiles":3,"speedBytesPerSec":125829120,'
    '"lastUpdated":"2026-05-06T10:15:30Z"}}'
)

PROG = DownloadProgress(phase="downloading", total_bytes=16060522496, completed_bytes=4015130624, total_files=12,
                        completed_files=3, speed_bytes_per_sec=125829120.0, last_updated="2026-05-06T10:15:30Z")


def _ready_config() -> dict[str, object]:
    # Go struct order for ModelConfig; the maps are GoMaps and are given here in a scrambled order on purpose.
    return {
        "modelType": "llama", "modelArchitecture": "LlamaForCausalLM",
        "modelFramework": GoMap(version="4.43.0.dev0", name="transformers"),
        "modelFormat": GoMap(version="1.0.0", name="safetensors"),
        "modelParameterSize": "8.03B", "maxTokens": 131072, "modelCapabilities": ["TEXT_TO_TEXT"],
        "decodedModelConfiguration": GoMap(
            transformers_version="4.43.0.dev0", torch_dtype="bfloat16", parameter_count="8.03B", model_type="llama",
            model_size_bytes=16060522496.0, is_embedding=False, has_vision=False, context_length=131072.0,
            architecture="LlamaForCausalLM"),
        "artifact": {"sha": "0e9e39f249a16976918f6564b8830bc894c89659",
                     "parentPath": GoMap({"clusterbasemodel.llama-3-1-8b-instruct":
                                          "/mnt/data/models/llama-3-1-8b-instruct"}),
                     "childrenPaths": []},
    }


def test_ready_example_byte_for_byte() -> None:
    assert render_entry(None, name="llama-3-1-8b-instruct", status=STATUS_READY, config=_ready_config()) == READY_HF


def test_progress_example_byte_for_byte() -> None:
    assert render_entry(None, name="llama-3-1-8b-instruct", status=STATUS_UPDATING, progress=PROG) == PROGRESS


def test_failed_example_and_oci_artifact() -> None:
    assert render_entry(None, name="m", status=STATUS_FAILED) == '{"name":"m","status":"Failed"}'
    cfg = {"modelType": "llama", "artifact": {"sha": "", "parentPath": None, "childrenPaths": None}}
    assert render_entry(None, name="m", status=STATUS_READY, config=cfg) == \
        '{"name":"m","status":"Ready","config":{"modelType":"llama","artifact":{"sha":"","parentPath":null,' \
        '"childrenPaths":null}}}'


def test_examples_round_trip_through_parse_entry() -> None:
    for literal in (READY_HF, PROGRESS):
        parsed = parse_entry(literal)
        assert parsed is not None
        assert go_json(parsed) == literal


def test_ready_clears_progress_even_when_one_is_passed() -> None:
    out = render_entry(PROGRESS, name="llama-3-1-8b-instruct", status=STATUS_READY, progress=PROG)
    assert out == '{"name":"llama-3-1-8b-instruct","status":"Ready"}'
    assert "progress" not in (parse_entry(render_entry(PROGRESS, name="x", status=STATUS_FAILED)) or {})


def test_updating_keeps_progress_by_default_and_none_removes_it() -> None:
    assert render_entry(PROGRESS, name="llama-3-1-8b-instruct", status=STATUS_UPDATING) == PROGRESS
    assert render_entry(PROGRESS, name="m", status=STATUS_UPDATING, progress=None) == \
        '{"name":"m","status":"Updating"}'


def test_status_write_keeps_config_and_none_removes_it() -> None:
    assert render_entry(READY_HF, name="llama-3-1-8b-instruct", status=STATUS_READY) == READY_HF
    flipped = render_entry(READY_HF, name="llama-3-1-8b-instruct", status=STATUS_FAILED)
    assert flipped == READY_HF.replace('"status":"Ready"', '"status":"Failed"')
    assert render_entry(READY_HF, name="m", status=STATUS_READY, config=None) == '{"name":"m","status":"Ready"}'


def test_unknown_fields_survive_in_their_order_after_omes_fields() -> None:
    prev = '{"modelUID":"u-1","status":"Ready","zeta":{"b":1,"a":2},"name":"m","artifactPendingEviction":true}'
    out = render_entry(prev, name="m", status=STATUS_UPDATING, progress=KEEP,
                       extra={"modelherd": {"sourceUri": "hf://org/m", "revision": "abc", "path": "/models/m"}})
    assert out == ('{"name":"m","status":"Updating","modelUID":"u-1","zeta":{"b":1,"a":2},'
                   '"artifactPendingEviction":true,"modelherd":{"sourceUri":"hf://org/m","revision":"abc",'
                   '"path":"/models/m"}}')
    again = render_entry(out, name="m", status=STATUS_READY, extra={"modelherd": {"path": "/models/n"}})
    assert again.endswith('"artifactPendingEviction":true,"modelherd":{"path":"/models/n"}}')


def test_extra_may_not_overwrite_omes_fields() -> None:
    with pytest.raises(ValueError, match="status"):
        render_entry(None, name="m", status=STATUS_READY, extra={"status": "Deleted"})


@pytest.mark.parametrize("prev", ["", "not json", "[1,2]", '"str"', "null", '{"a":NaN}', "[" * 100_000,
                                  '{"n":' + "9" * 100_000 + "}"])
def test_invalid_previous_gives_a_fresh_entry(prev: str) -> None:
    assert parse_entry(prev) is None
    assert render_entry(prev, name="m", status=STATUS_UPDATING) == '{"name":"m","status":"Updating"}'


def test_kept_config_that_go_could_not_decode_is_dropped() -> None:
    assert render_entry('{"name":"m","status":"Ready","config":"oops","progress":[1]}', name="m",
                        status=STATUS_UPDATING) == '{"name":"m","status":"Updating"}'


def test_uint64_beyond_2_53_stays_exact() -> None:
    big = 2**64 - 1
    p = DownloadProgress(phase="downloading", total_bytes=big, completed_bytes=2**53 + 1, total_files=2**32 - 1,
                         completed_files=0, speed_bytes_per_sec=0.5, last_updated="2026-05-06T10:15:30Z")
    out = render_entry(None, name="m", status=STATUS_UPDATING, progress=p)
    assert '"totalBytes":18446744073709551615,"completedBytes":9007199254740993,"totalFiles":4294967295' in out
    assert '"speedBytesPerSec":0.5' in out
    assert render_entry(out, name="m", status=STATUS_UPDATING) == out


@pytest.mark.parametrize(("field", "value"), [("total_bytes", 2**64), ("total_files", 2**32), ("completed_files", -1),
                                              ("completed_bytes", 1.5), ("total_bytes", True)])
def test_progress_refuses_values_outside_go_integer_types(field: str, value: object) -> None:
    kw: dict[str, object] = {"phase": "scanning", "total_bytes": 0, "completed_bytes": 0, "total_files": 0,
                             "completed_files": 0, "speed_bytes_per_sec": 0.0, "last_updated": "x"}
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        DownloadProgress(**kw)  # type: ignore[arg-type]


def test_html_and_line_separator_escaping_like_go() -> None:
    # Reference output of Go 1.26 json.Marshal(map[string]any{...}) (HTML-safe, sorted map keys, \b \f short forms).
    assert go_json(GoMap({"z": "<&>", "a": "\u2028é\x01\b\f\x7f\"\\", "m": 1.25})) == \
        '{"a":"\\u2028é\\u0001\\b\\f\x7f\\"\\\\","m":1.25,"z":"\\u003c\\u0026\\u003e"}'
    assert go_json({"k": "\u2029\n\r\t"}) == '{"k":"\\u2029\\n\\r\\t"}'
    assert go_json("\ud800") == '"\\ufffd"'


def test_floats_like_go() -> None:
    # Reference: Go 1.26 json.Marshal([]float64{...}).
    floats = [125829120, 0.1, 1e21, 1e20, 1.5e-7, 1e-6, 123456789.123, 5e-324, 1.7976931348623157e308, 2.5, 1e-10,
              12345678901234567890.0, 0.000123, 1e-7, 9.999999e-7, 1e100, 16060522496]
    assert go_json([float(f) for f in floats]) == (
        "[125829120,0.1,1e+21,100000000000000000000,1.5e-7,0.000001,123456789.123,5e-324,1.7976931348623157e+308,"
        "2.5,1e-10,12345678901234567000,0.000123,1e-7,9.999999e-7,1e+100,16060522496]")
    assert go_float(-0.0) == "-0"
    assert go_float(-1.5e-8) == "-1.5e-8"
    with pytest.raises(ValueError):
        go_float(float("nan"))


def test_go_json_refuses_what_go_cannot_marshal() -> None:
    with pytest.raises(TypeError):
        go_json({1: "x"})
    with pytest.raises(TypeError):
        go_json({"s": {1, 2}})


def test_non_ascii_is_kept_as_utf8() -> None:
    out = render_entry(None, name="模型", status=STATUS_READY)
    assert out == '{"name":"模型","status":"Ready"}'
    assert json.loads(out)["name"] == "模型"
