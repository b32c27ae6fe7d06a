"""Periodic verification on real model folders: the Verifier's quick and deep passes, the findings record
beside a model, and the flags. The enqueue callback is a list (the work queue's ``add``); nothing of ours is
mocked."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from modelherd.agent.basemodels import ModelRef
from modelherd.agent.cli import build_parser, load_settings
from modelherd.agent.lifecycle.verifier import Verifier, VerifyTarget, node_phase
from modelherd.agent.reporting.metrics import AgentMetrics
from modelherd.agent.settings import VerificationSettings
from modelherd.storage import findings
from modelherd.storage.manifest import read_manifest
from modelherd.storage.ready import damage, inspect_published
from modelherd.storage.throttle import MB
from prometheus_client import CollectorRegistry

from tests.modelgen import make_sharded_model, write_test_manifest

KiB, MiB = 1024, 1024 * 1024
REF = ModelRef("ClusterBaseModel", "", "tiny")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    dest = tmp_path / "models" / "org" / "tiny"
    make_sharded_model(dest, n_shards=4, shard_bytes=128 * KiB)
    write_test_manifest(dest)
    return dest


def _verifier(model: Path, node: str = "node-a", *, quick: float = 600.0, deep: float = 3600.0,
              mbps: float = 0.0) -> tuple[Verifier, list[ModelRef], CollectorRegistry]:
    queued: list[ModelRef] = []
    registry = CollectorRegistry()
    target = VerifyTarget(REF, model, "local:///test", None)
    v = Verifier(VerificationSettings(interval_s=quick, deep_interval_s=deep, max_mbps=mbps), node_name=node,
                 targets=lambda: [target], enqueue=queued.append, metrics=AgentMetrics(registry),
                 shutdown=threading.Event())
    return v, queued, registry


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _shards(model: Path) -> list[Path]:
    return sorted(model.glob("model-*.safetensors"))


def test_truncated_and_deleted_shards_fail_the_quick_pass_and_the_model_is_enqueued(model: Path) -> None:
    v, queued, registry = _verifier(model)
    assert v.quick_pass() == [] and queued == []
    s1, _, s3, _ = _shards(model)
    os.truncate(s1, s1.stat().st_size - 100)
    s3.unlink()
    failed = v.quick_pass()
    assert queued == [REF]
    paths = {p.path for p in failed[0][1]}
    assert {s1.name, s3.name} <= paths
    assert registry.get_sample_value("modelherd_verification_failures_total",
                                     {**REF.metric_labels(), "kind": "quick"}) == 1


def test_a_flipped_byte_is_invisible_to_quick_but_deep_records_it_for_every_node(model: Path) -> None:
    victim = _shards(model)[1]
    _flip(victim, victim.stat().st_size - 10)  # inside tensor data: headers and sizes are intact
    a, queued_a, registry = _verifier(model, "node-a")
    b, queued_b, _ = _verifier(model, "node-b")
    assert a.quick_pass() == [] and b.quick_pass() == [], "quick verification cannot see a flipped data byte"
    manifest = read_manifest(model)
    assert manifest is not None
    problems = a.deep_one(VerifyTarget(REF, model, "local:///test", None), manifest)
    assert [p.path for p in problems] == [victim.name] and "sha256 mismatch" in problems[0].message
    assert queued_a == [REF]
    # recorded beside the model, not inside it
    record = findings.findings_path(model)
    assert record.parent == model.parent and record.exists()
    assert not any(p.name.endswith(findings.SUFFIX) for p in model.rglob("*"))
    # every check that decides Ready now sees it: the other node's quick pass and the engine's damage()
    assert [p.path for p in damage(model, manifest)] == [victim.name]
    failed = b.quick_pass()
    assert queued_b == [REF] and "deep verification: sha256 mismatch" in failed[0][1][0].message
    assert registry.get_sample_value("modelherd_verification_failures_total",
                                     {**REF.metric_labels(), "kind": "deep"}) == 1
    assert registry.get_sample_value("modelherd_deep_verify_bytes_total", REF.metric_labels()) == \
        manifest.total_bytes


def test_a_republished_copy_makes_the_old_findings_stale_and_the_quick_pass_removes_them(model: Path) -> None:
    manifest = read_manifest(model)
    assert manifest is not None
    findings.record_deep_pass(model, manifest, [(_shards(model)[0].name, "sha256 mismatch")], by="node-a")
    assert damage(model, manifest) != []
    write_test_manifest(model)  # a repair publishes a new manifest (a new file)
    fresh = read_manifest(model)
    assert fresh is not None and findings.read_findings(model, fresh) is None
    assert isinstance(inspect_published(model, "local:///test", None), type(fresh))
    v, queued, _ = _verifier(model)
    assert v.quick_pass() == [] and queued == []
    assert not findings.findings_path(model).exists()


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"stamp": 5}', b"\x00" * 100])
def test_a_malformed_findings_record_reads_as_none(model: Path, body: bytes) -> None:
    manifest = read_manifest(model)
    assert manifest is not None
    findings.findings_path(model).write_bytes(body)
    assert findings.read_findings(model, manifest) is None
    assert damage(model, manifest) == []


def test_a_record_naming_files_outside_the_manifest_names_none_of_them(model: Path) -> None:
    manifest = read_manifest(model)
    assert manifest is not None
    findings.record_deep_pass(model, manifest, [("../../etc/passwd", "x"), ("nope.bin", "y")], by="evil")
    got = findings.read_findings(model, manifest)
    assert got is not None and got.problems == ()
    assert damage(model, manifest) == []


def test_deep_verification_on_shared_storage_is_done_by_one_node_per_interval(model: Path) -> None:
    manifest = read_manifest(model)
    assert manifest is not None
    a, _, _ = _verifier(model, "node-a", deep=3600.0)
    b, _, _ = _verifier(model, "node-b", deep=3600.0)
    assert a.due_for_deep() == [], "a copy just published was hashed as it streamed: not due"
    later = time.time() + 2 * 3600
    assert len(a.due_for_deep(later)) == 1
    findings.record_deep_pass(model, manifest, [], by="node-a", at=later)
    assert b.due_for_deep(later + 60) == [], "node-b sees node-a's fresh pass and skips it"
    off, _, _ = _verifier(model, deep=0.0)
    assert off.due_for_deep(later * 2) == []


def test_deep_verification_reads_at_the_configured_rate(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    make_sharded_model(dest, n_shards=2, shard_bytes=2 * MiB)
    write_test_manifest(dest)
    manifest = read_manifest(dest)
    assert manifest is not None
    v, _, _ = _verifier(dest, mbps=5.0)
    started = time.monotonic()
    assert v.deep_one(VerifyTarget(REF, dest, "local:///test", None), manifest) == []
    elapsed = time.monotonic() - started
    expected = manifest.total_bytes / (5 * MB)
    assert expected * 0.9 <= elapsed <= expected * 1.1


def test_the_verifier_thread_repeats_quick_passes_and_stops_at_once(model: Path) -> None:
    v, queued, _ = _verifier(model, quick=0.2, deep=0.0)
    v.start()
    try:
        deadline = time.monotonic() + 5
        while v.passes["quick"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert v.passes["quick"] >= 3
        _shards(model)[0].unlink()
        deadline = time.monotonic() + 2
        while not queued and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queued and queued[0] == REF
    finally:
        v.shutdown.set()
        started = time.monotonic()
        v.join(2.0)
    assert time.monotonic() - started < 1.0 and v.alive()


def test_each_node_works_at_its_own_fixed_phase() -> None:
    phases = {node_phase(f"node-{i}") for i in range(20)}
    assert len(phases) == 20 and all(0 <= p < 1 for p in phases)
    assert node_phase("node-1") == node_phase("node-1")


def test_verify_flags_take_durations_as_ome_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("MODELHERD_")]:
        monkeypatch.delenv(k)
    defaults = load_settings(build_parser().parse_args(["agent"]))
    assert (defaults.verify_interval_s, defaults.deep_verify_interval_s) == (600.0, 168 * 3600.0)
    args = build_parser().parse_args(["agent", "--verify-interval", "30s", "--deep-verify-interval", "0",
                                      "--verify-max-mbps", "50"])
    s = load_settings(args)
    assert (s.verify_interval_s, s.deep_verify_interval_s, s.verify_max_mbps) == (30.0, 0.0, 50.0)
    assert load_settings(build_parser().parse_args(["agent", "--verify-interval", "90"])).verify_interval_s == 90
    monkeypatch.setenv("MODELHERD_DEEP_VERIFY_INTERVAL_S", "6h")
    assert load_settings(build_parser().parse_args(["agent"])).deep_verify_interval_s == 6 * 3600
    with pytest.raises(ValueError):
        load_settings(build_parser().parse_args(["agent", "--verify-interval", "1d"]))


def test_an_unchanged_folder_is_not_reread_but_a_header_rewritten_with_its_old_mtime_is_caught(model: Path) -> None:
    v, queued, _ = _verifier(model)
    assert v.quick_pass() == []
    assert v._clean, "a clean folder's fingerprint is kept"
    victim = _shards(model)[0]
    st = victim.stat()
    with open(victim, "r+b") as f:
        f.write(b"\xff" * 8)  # the header length: now implausible
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    failed = v.quick_pass()
    assert queued == [REF] and failed[0][1][0].path == victim.name
