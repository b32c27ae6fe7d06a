"""A model that leaves the node leaves no metric series behind (``AgentMetrics.forget_model``)."""

from __future__ import annotations

from modelherd.agent.basemodels import ModelRef
from modelherd.agent.reporting.metrics import OME_LABELS, AgentMetrics
from prometheus_client import CollectorRegistry, generate_latest


def _touch_every_series(m: AgentMetrics, labels: dict[str, str]) -> None:
    """Give ``labels`` a series in every per-model metric, with each extra label the agent uses."""
    m.init_model(labels)
    m.set_state(labels, "Ready")
    m.set_role(labels, "holder")
    m.clear_progress(labels)
    for c in (m.downloads_success, m.md5_failed, m.download_bytes, m.origin_bytes, m.verified_bytes,
              m.deep_verify_bytes):
        c.labels(**labels).inc()
    for g in (m.download_progress, m.download_total, m.download_last_progress, m.lease_holder_progress):
        g.labels(**labels).set(1)
    m.download_duration.labels(**labels).observe(3)
    m.rate_limit_wait.labels(**labels).observe(2)
    m.failures.labels(**labels, reason="VerificationFailed").inc()
    m.failures.labels(**labels, reason="DownloadFailed").inc()
    for kind in ("quick", "deep"):
        m.verification_failures.labels(**labels, kind=kind).inc()
        m.last_verification.labels(**labels, kind=kind).set(1)


def _series_of(text: str, ref: ModelRef) -> list[str]:
    needle = f'name="{ref.name}",'
    return [line for line in text.splitlines() if not line.startswith("#") and needle in line]


def test_forget_model_drops_every_series_of_that_model_and_only_those() -> None:
    registry = CollectorRegistry()
    m = AgentMetrics(registry)
    gone = ModelRef("ClusterBaseModel", "", "gone")
    kept = ModelRef("BaseModel", "team", "kept")
    same_name = ModelRef("BaseModel", "other", "gone")  # same name, other namespace: another model
    for ref in (gone, kept, same_name):
        _touch_every_series(m, ref.metric_labels())
    before = generate_latest(registry).decode()
    per_model = {metric._name for metric in m.per_model()}
    assert len(per_model) >= 20
    assert all(any(f"{name}" in line for line in _series_of(before, gone)) for name in per_model)

    m.forget_model(gone.metric_labels())

    after = generate_latest(registry).decode()
    assert not [line for line in after.splitlines() if 'model_type="ClusterBaseModel"' in line]
    assert _series_of(after, kept) == _series_of(before, kept)
    assert [line for line in after.splitlines() if 'namespace="other"' in line] == \
        [line for line in before.splitlines() if 'namespace="other"' in line]
    m.forget_model(gone.metric_labels())  # twice, or a model never seen: nothing to do, nothing raised
    m.forget_model(ModelRef("BaseModel", "x", "never").metric_labels())
    assert generate_latest(registry).decode() == after


def test_create_delete_cycles_leave_the_exposition_as_it_was() -> None:
    registry = CollectorRegistry()
    m = AgentMetrics(registry)
    _touch_every_series(m, ModelRef("BaseModel", "team", "kept").metric_labels())
    baseline = generate_latest(registry)
    for i in range(50):
        labels = ModelRef("ClusterBaseModel", "", f"m-{i}").metric_labels()
        _touch_every_series(m, labels)
        m.forget_model(labels)
    assert generate_latest(registry) == baseline
    assert tuple(OME_LABELS) == ("model_type", "namespace", "name")
