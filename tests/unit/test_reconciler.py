"""The reconciler's state machine on fakes: no API server, no origin, no threads but the one a test starts.

The Reconciler is driven with its collaborators replaced: a dict-backed model and node cache, the real status
writer (agent/reporting/status.py) over in-memory labels / ConfigMap / Events that record every write in order, a
puller that publishes, fails or blocks until cancelled, a recording remover, and a fake clock. Model folders are
real (a tmp models root), so "published and verified" is the storage layer's own answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.basemodels import OPEN, ModelRef
from modelherd.agent.kube import ApiError
from modelherd.agent.lifecycle.claims import Claims
from modelherd.agent.lifecycle.puller import Pulled
from modelherd.agent.lifecycle.reconciler import NodeContext, Reconciler
from modelherd.agent.lifecycle.removal import Removal, RemovalOutcome, RemovalTarget
from modelherd.agent.ome.entry import parse_entry
from modelherd.agent.reporting.configmap import DATA_LIMIT, ConfigMapFullError, data_bytes
from modelherd.agent.reporting.metrics import AgentMetrics
from modelherd.agent.reporting.status import ModelStatusWriter
from modelherd.agent.settings import Settings
from modelherd.coordination import Role
from modelherd.storage.errors import CancelledError, SourceNotFoundError
from modelherd.storage.manifest import read_manifest
from prometheus_client import CollectorRegistry

from tests.modelgen import make_sharded_model, write_test_manifest

NODE = "node-a"
REF = ModelRef("BaseModel", "team", "tiny")
URI = "hf://org/tiny"


# ------------------------------------------------------------------------------------------------ fakes
class Journal(list[tuple[str, str, Any]]):
    """Every write the agent would send, in order: ("label"|"entry"|"event", key, value)."""


class FakeLabels:
    def __init__(self, journal: Journal) -> None:
        self.journal, self.values, self.deny = journal, {}, ""  # type: ignore[var-annotated]

    def current(self, key: str) -> str | None:
        return self.values.get(key)

    def set(self, key: str, value: str | None) -> bool:
        if self.values.get(key) == value:
            return False
        if self.deny:
            raise ApiError(403, "Forbidden", action=self.deny)
        self.journal.append(("label", key, value))
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value
        return True


class FakeConfigMap:
    """The node's ConfigMap: ``limit`` bytes of keys and values (the API server's 1 MiB, smaller in a test)."""

    def __init__(self, journal: Journal, limit: int = DATA_LIMIT) -> None:
        self.journal, self.data, self.ours = journal, {}, {}  # type: ignore[var-annotated]
        self.limit = limit

    def current(self, key: str) -> str | None:
        return self.data.get(key)

    def check_fits(self, key: str, render: Callable[[str | None], str | None]) -> None:
        new = render(self.data.get(key))
        before = data_bytes({"data": self.data})
        after = data_bytes({"data": {**self.data, key: new}}) if new is not None else before
        if after > self.limit and after > before:
            raise ConfigMapFullError("ome", NODE, key, after, len(self.data) + 1)

    def update(self, key: str, render: Callable[[str | None], str | None]) -> str | None:
        old = self.data.get(key)
        new = render(old)
        self.check_fits(key, lambda _old: new)
        if new != old:
            self.journal.append(("entry", key, new))
            if new is None:
                self.data.pop(key, None)
            else:
                self.data[key] = new
        if new is None:
            self.ours.pop(key, None)
        else:
            self.ours[key] = new
        return new

    def remove(self, key: str) -> None:
        self.update(key, lambda _old: None)

    def own(self, key: str, value: str) -> None:
        self.ours[key] = value

    def remembered(self) -> dict[str, str]:
        return dict(self.ours)


class FakeEvents:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def record(self, ref: ModelRef, uid: str, *, reason: str, message: str, warning: bool = False) -> None:
        self.journal.append(("event", reason, message))


class FakePuller:
    """Publishes the model (``"ok"``), raises ``error``, or blocks until cancelled (``"block"``: then raises
    ``CancelledError``; ``"block-then-finish"``: then publishes anyway)."""

    def __init__(self, mode: str = "ok", error: Exception | None = None, role: Role = Role.HOLDER) -> None:
        self.mode, self.error, self.role = mode, error, role
        self.calls: list[ModelRef] = []
        self.labels_seen: list[str | None] = []
        self.started = threading.Event()
        self.peek: Callable[[], str | None] = lambda: None

    def pull(self, spec: Any, *, cancel: threading.Event, progress: Any, on_listing: Any) -> Pulled:
        self.calls.append(spec.ref)
        self.labels_seen.append(self.peek())
        self.started.set()
        if self.mode.startswith("block"):
            cancel.wait(10)
            if self.mode == "block":
                raise CancelledError("cancelled")
            # "block-then-finish": the pull completed although it was cancelled meanwhile (a race)
        if self.error is not None:
            raise self.error
        publish(spec.dest)
        progress(0, 100)
        progress(100, 100)
        return Pulled(read_manifest(spec.dest), self.role)


class FakeRemover:
    def __init__(self) -> None:
        self.calls: list[tuple[ModelRef, RemovalTarget, bool]] = []

    def remove(self, ref: ModelRef, target: RemovalTarget, *, deleted: bool) -> Removal:
        self.calls.append((ref, target, deleted))
        return Removal(RemovalOutcome.REMOVED, "files removed")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 0.5
        return self.t


def publish(dest: Path) -> None:
    make_sharded_model(dest, n_shards=2, shard_bytes=4096)
    write_test_manifest(dest, source_uri=URI)


def cr(name: str = "tiny", *, uri: str = URI, path: str = "org/tiny", created: str = "2024-05-01T00:00:00Z",
       namespace: str = "team") -> dict[str, Any]:
    return {"kind": "BaseModel", "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                                              "creationTimestamp": created},
            "spec": {"storage": {"storageUri": uri, "path": path}}}


@dataclasses.dataclass
class Agent:
    rec: Reconciler
    models: dict[ModelRef, Mapping[str, Any]]
    journal: Journal
    labels: FakeLabels
    cm: FakeConfigMap
    puller: FakePuller
    remover: FakeRemover
    metrics: AgentMetrics
    registry: CollectorRegistry
    root: Path

    def label(self, ref: ModelRef = REF) -> str | None:
        return self.labels.values.get(ref.label_key)

    def entry(self, ref: ModelRef = REF) -> dict[str, Any] | None:
        return parse_entry(self.cm.data.get(ref.cm_key) or "")

    def events(self, reason: str) -> list[str]:
        return [msg for kind, r, msg in self.journal if kind == "event" and r == reason]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {**REF.metric_labels(), **labels})


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Agent]:
    def build(puller: FakePuller | None = None, *models: dict[str, Any]) -> Agent:
        root = tmp_path / "models"
        root.mkdir(exist_ok=True)
        journal = Journal()
        labels, cm = FakeLabels(journal), FakeConfigMap(journal)
        registry = CollectorRegistry()
        metrics = AgentMetrics(registry)
        cache = {ModelRef.of(m): m for m in models}
        settings = Settings(startup_jitter_s=0.0, progress_interval_s=60.0, poll_interval_s=0.1)
        status = ModelStatusWriter(configmap=cm, labels=labels, events=FakeEvents(journal),  # type: ignore[arg-type]
                                   metrics=metrics, node_name=NODE, storage_kind="local")
        puller = puller or FakePuller()
        puller.peek = lambda: labels.values.get(REF.label_key)
        remover = FakeRemover()
        node = NodeContext(node_name=NODE, namespace="ome", models_root=root, storage_kind="local",
                           get_model=cache.get, get_node=lambda: {"metadata": {"name": NODE, "labels": {}}},
                           policy=OPEN)
        rec = Reconciler(node, agent=settings.agent, leases=settings.leases, status=status, puller=puller,
                         remover=remover, claims=Claims(root, OPEN, lambda: list(cache.values())), metrics=metrics,
                         shutdown=threading.Event(), clock=Clock())
        return Agent(rec, cache, journal, labels, cm, puller, remover, metrics, registry, root)
    return build


# ------------------------------------------------------------------------------------------------ tests
def test_a_model_whose_cr_is_gone_loses_its_label_and_entry(make: Callable[..., Agent]) -> None:
    a = make(None, cr())
    assert a.rec.reconcile(REF) is True and a.label() == "Ready"
    del a.models[REF]
    a.journal.clear()

    assert a.rec.reconcile(REF) is True
    assert a.label() is None and a.entry() is None
    assert [k for k, *_ in a.journal[:2]] == ["label", "entry"]  # the label goes first, as it came first
    assert [(r, t.dest, deleted) for r, t, deleted in a.remover.calls] == [(REF, a.root / "org/tiny", True)]
    assert a.events("FilesRemoved") and not a.events("Removed")  # a deleted CR gets no "Removed" Event


def test_a_malformed_cr_is_failed_once_and_not_retried(make: Callable[..., Agent]) -> None:
    a = make(None, cr(uri="ftp://example.com/m"))
    assert a.rec.reconcile(REF) is True  # True: no back-off, it is retried when the CR changes
    assert a.label() == "Failed"
    entry = a.entry()
    assert entry is not None and entry["status"] == "Failed"
    assert "is not supported" in entry["modelherd"]["message"]
    assert len(a.events("Failed")) == 1
    writes = list(a.journal)

    assert a.rec.reconcile(REF) is True
    assert a.journal == writes  # the same verdict again: nothing written, no second Event
    assert a.puller.calls == []
    assert a.sample("modelherd_model_failures_total", reason="InvalidSpec") == 2


def test_a_published_verified_model_is_ready_with_no_pull(make: Callable[..., Agent]) -> None:
    a = make(None, cr())
    publish(a.root / "org/tiny")
    assert a.rec.reconcile(REF) is True
    assert a.puller.calls == []
    assert a.label() == "Ready" and (a.entry() or {}).get("status") == "Ready"
    assert a.sample("modelherd_lease_role", role="ready") == 1
    assert [t.dest for t in a.rec.verify_targets()] == [a.root / "org/tiny"]
    writes = list(a.journal)

    assert a.rec.reconcile(REF) is True  # a restart with the model on disk: not one write
    assert a.journal == writes


def test_a_pull_goes_updating_then_ready_with_its_role(make: Callable[..., Agent]) -> None:
    a = make(FakePuller(role=Role.HOLDER), cr())
    assert a.rec.reconcile(REF) is True
    assert a.puller.calls == [REF] and a.puller.labels_seen == ["Updating"]
    states = [(kind, value if kind == "label" else (parse_entry(value) or {}).get("status"))
              for kind, _key, value in a.journal if kind in ("label", "entry")]
    assert states == [("label", "Updating"), ("entry", "Updating"), ("label", "Ready"), ("entry", "Ready")]
    assert a.events("Ready") == [f"Ready at {a.root / 'org/tiny'} (downloaded under the Lease)"]
    assert a.sample("modelherd_lease_role", role="holder") == 1
    assert a.sample("model_agent_downloads_success_total") == 1
    assert a.sample("modelherd_origin_bytes_total") == 100
    assert a.rec.running() == {}


def test_a_failing_pull_is_failed_with_its_reason_an_event_and_a_retry(make: Callable[..., Agent]) -> None:
    a = make(FakePuller(error=SourceNotFoundError("hf://org/tiny was not found")), cr())
    assert a.rec.reconcile(REF) is False  # False: the worker re-queues it with back-off
    assert a.label() == "Failed"
    assert "hf://org/tiny was not found" in (a.entry() or {})["modelherd"]["message"]
    assert a.events("Failed") == ["hf://org/tiny was not found"]
    assert a.sample("modelherd_model_failures_total", reason="SourceNotFound") == 1
    assert a.sample("model_agent_downloads_failed_total") == 1

    assert a.rec.reconcile(REF) is False  # the retry: pulled again, stays Failed (no flap to Updating)
    assert a.puller.calls == [REF, REF] and a.puller.labels_seen[1] == "Failed"
    assert ("label", REF.label_key, "Updating") not in a.journal[-4:]


@pytest.mark.parametrize("mode", ["block", "block-then-finish"])
def test_a_delete_during_a_pull_writes_nothing_after_it(make: Callable[..., Agent], mode: str) -> None:
    a = make(FakePuller(mode=mode), cr())
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(a.rec.reconcile(REF)))
    worker.start()
    assert a.puller.started.wait(5)
    assert REF in a.rec.running()
    before = list(a.journal)

    last = a.models.pop(REF)
    a.rec.forget(REF, last)
    assert a.rec.cancel(REF, "the model was deleted") is True
    worker.join(5)
    assert results == [True] and not worker.is_alive()
    assert a.journal == before  # the cancelled pull wrote nothing
    assert a.rec.running() == {}

    assert a.rec.reconcile(REF) is True  # the reconcile that follows writes the final state: gone
    assert a.label() is None and a.entry() is None


def test_a_403_on_the_status_write_is_reported_once(make: Callable[..., Agent],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    a = make(None, cr())
    publish(a.root / "org/tiny")
    a.labels.deny = "patch nodes"
    with caplog.at_level(logging.ERROR, logger="modelherd.agent"):
        assert a.rec.reconcile(REF) is False
        assert a.rec.reconcile(REF) is False
    forbidden = [r.getMessage() for r in caplog.records if "403 Forbidden" in r.getMessage()]
    assert forbidden == [f"{REF.display}: the agent may not patch nodes (403 Forbidden): it cannot report this "
                         "model; restore the agent's RBAC"]
    assert a.rec.status_write_denied() == "patch nodes"
    assert len(a.events("Forbidden")) == 2  # the Event each time (the recorder rate-limits it)
    assert a.entry() is None  # the entry never comes before its label

    a.labels.deny = ""
    assert a.rec.reconcile(REF) is True
    assert a.rec.status_write_denied() is None and a.label() == "Ready"


def test_a_path_held_by_a_senior_cr_is_failed_before_any_pull(make: Callable[..., Agent]) -> None:
    senior = cr("first", uri="hf://org/other", created="2024-01-01T00:00:00Z")
    a = make(None, senior, cr())
    assert a.rec.reconcile(REF) is False  # re-checked with back-off: the holder may go away
    assert a.puller.calls == []
    assert a.label() == "Failed"
    message = (a.entry() or {})["modelherd"]["message"]
    assert "team/first" in message
    assert a.sample("modelherd_model_failures_total", reason="PathConflict") == 1


def test_a_model_that_does_not_fit_a_full_configmap_is_failed_by_label_and_event_and_the_others_keep_theirs(
        make: Callable[..., Agent]) -> None:
    """Someone else's key fills the map: the model is Failed (label, Warning Event naming the 1 MiB limit, the
    ConfigMapFull failure metric), no entry is written and no other key moves; once there is room, the retry makes
    it Ready."""
    a = make(None, cr())
    publish(a.root / "org/tiny")
    a.cm.data["someone-else"] = "x" * 2000
    a.cm.limit = 2100  # room for no entry
    assert a.rec.reconcile(REF) is False  # retried with back-off
    assert a.label() == "Failed" and a.entry() is None
    assert a.cm.data == {"someone-else": "x" * 2000}
    (message,) = a.events("Failed")
    assert "1 MiB" in message and "would hold" in message
    assert a.sample("modelherd_model_failures_total", reason="ConfigMapFull") == 1

    del a.cm.data["someone-else"]
    assert a.rec.reconcile(REF) is True
    assert a.label() == "Ready" and (a.entry() or {}).get("status") == "Ready"


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
                "num_key_value_heads": 8, "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
                "vocab_size": 128256, "transformers_version": "4.44.0"}


def test_a_ready_entry_that_only_fits_without_its_metadata_is_written_without_it(make: Callable[..., Agent]) -> None:
    a = make(None, cr())
    dest = a.root / "org/tiny"
    make_sharded_model(dest, n_shards=2, shard_bytes=4096)
    (dest / "config.json").write_text(json.dumps(LLAMA_CONFIG))  # what OME's parser reports metadata for
    write_test_manifest(dest, source_uri=URI)
    assert a.rec.reconcile(REF) is True
    full = a.cm.data[REF.cm_key]
    assert "config" in (a.entry() or {})  # with room: OME's metadata
    del a.cm.data[REF.cm_key]
    a.cm.limit = len(REF.cm_key) + len(full) - 1  # one byte short of the whole entry
    a.labels.values.pop(REF.label_key)
    assert a.rec.reconcile(REF) is True
    entry = a.entry()
    assert entry is not None and entry["status"] == "Ready" and "config" not in entry
    assert a.label() == "Ready"
