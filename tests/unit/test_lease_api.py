"""KubernetesLease over an injected LeaseApi (no server): raw-JSON bodies, resourceVersion, error classification."""

from __future__ import annotations

import re
from typing import Any

import pytest
from modelherd.coordination import LeaseApiError, LeaseStatus, ModelIdentity
from modelherd.coordination.errors import CoordinationError, LeaseLostError, LeaseUnavailableError
from modelherd.coordination.kubelease import KubernetesLease

MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
IDENTITY = ModelIdentity("hf://org/model@main", "main", "org/model")


class FakeLeases:
    """Stores one Lease; ``fail`` makes the next call raise a LeaseApiError with that status."""

    def __init__(self) -> None:
        self.stored: dict[str, Any] | None = None
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.fail: int | None = None
        self.rv = 0

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            status, self.fail = self.fail, None
            raise LeaseApiError(status, "Scripted", "scripted")

    def _store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        self.stored = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}
        return self.stored

    def get(self, namespace: str, name: str, *, timeout_s: float) -> dict[str, Any] | None:
        self._maybe_fail()
        return self.stored

    def create(self, namespace: str, body: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        self._maybe_fail()
        self.sent.append(("create", body))
        if self.stored is not None:
            raise LeaseApiError(409, "AlreadyExists")
        return self._store(body)

    def replace(self, namespace: str, name: str, body: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        self._maybe_fail()
        self.sent.append(("replace", body))
        assert self.stored is not None
        if body["metadata"].get("resourceVersion") != self.stored["metadata"]["resourceVersion"]:
            raise LeaseApiError(409, "Conflict")
        return self._store(body)

    def list(self, namespace: str, label_selector: str, *, timeout_s: float) -> list[dict[str, Any]]:
        return [self.stored] if self.stored else []

    def watch(self, *args: Any, **kwargs: Any) -> Any:
        raise LeaseApiError(0, "ConnectionRefusedError")


def test_bodies_are_raw_json_with_six_digit_microtimes_and_every_replace_carries_the_version() -> None:
    api = FakeLeases()
    lease = KubernetesLease(api, "ns", IDENTITY, "node-a")
    held = lease.try_acquire(None, LeaseStatus())
    assert held is not None and held.version == "1"
    renewed = lease.renew(held, LeaseStatus(bytes_done=5, bytes_total=10))
    assert renewed.version == "2" and renewed.status.bytes_done == 5
    (verb0, created), (verb1, replaced) = api.sent
    assert (verb0, verb1) == ("create", "replace") and "resourceVersion" not in created["metadata"]
    assert replaced["metadata"]["resourceVersion"] == "1"
    for body in (created, replaced):
        assert MICROTIME.match(body["spec"]["renewTime"]) and MICROTIME.match(body["spec"]["acquireTime"])
    with pytest.raises(LeaseLostError):
        lease.renew(held, LeaseStatus())  # version 1 is stale now: 409
    assert lease.counter.by_verb() == {"create": 1, "update": 2}


def test_failures_are_classified_with_hints() -> None:
    api = FakeLeases()
    lease = KubernetesLease(api, "ns", IDENTITY, "node-a")
    api.fail = 403
    with pytest.raises(CoordinationError, match="refused") as refused:
        lease.observe()
    assert not isinstance(refused.value, LeaseUnavailableError) and "leases" in (refused.value.hint or "")
    for status in (0, 429, 503):
        api.fail = status
        with pytest.raises(LeaseUnavailableError):
            lease.observe()
    held = lease.try_acquire(None, LeaseStatus())
    assert held is not None
    assert KubernetesLease(api, "ns", IDENTITY, "node-b").try_acquire(None, LeaseStatus()) is None  # 409
