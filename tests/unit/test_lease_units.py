"""Lease naming, the observation clock, backend choice and the lease table (no server needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from modelherd.coordination import LeaseRecord, LeaseStatus, LeaseTiming, ModelIdentity, Observation, choose_backend
from modelherd.coordination.errors import CoordinationError
from modelherd.coordination.leaseviews import LeaseView, format_leases, view_of
from modelherd.storage.errors import ConfigError

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("uri", [
    "hf://meta-llama/Llama-3.1-8B-Instruct@main",
    "hf://Org/" + "Ünïcode_Model.v2" * 10,
    "oci://n/ns/b/bucket/o/some/deep/prefix/",
    "hf://x@refs/pr/7",
    "hf://___",
])
def test_lease_names_are_dns_labels_of_at_most_63_characters(uri: str) -> None:
    name = ModelIdentity(uri, "main", "dest/" + "d" * 400).lease_name
    assert DNS_LABEL.match(name) and len(name) <= 63, name


def test_the_lease_name_depends_on_source_revision_and_destination() -> None:
    base = ModelIdentity("hf://org/model", "main", "org/model")
    names = {base.lease_name,
             ModelIdentity("hf://org/model", "v2", "org/model").lease_name,
             ModelIdentity("hf://org/model", "main", "elsewhere").lease_name,
             ModelIdentity("hf://org/other", "main", "org/model").lease_name}
    assert len(names) == 4
    assert ModelIdentity("hf://org/model", "main", "org/model").lease_name == base.lease_name


def test_expiry_is_measured_from_the_last_change_we_saw_not_from_record_timestamps() -> None:
    now = [100.0]
    seen = Observation(clock=lambda: now[0])
    rec = LeaseRecord(name="l", version="1", holder="a", transitions=0, duration_s=10,
                      renew_time="1999-01-01T00:00:00.000000Z")  # an ancient renewTime is ignored
    assert seen.see(rec)
    now[0] += 9.9
    assert not seen.expired(10)
    assert not seen.see(rec)  # same version again: no change, the clock keeps running
    now[0] += 0.1
    assert seen.expired(10)
    assert seen.see(LeaseRecord(name="l", version="2", holder="a", transitions=0, duration_s=10))
    assert seen.remaining(10) == 10


def test_auto_coordination_follows_the_storage_and_the_credentials(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    assert choose_backend("auto", "shared", kubeconfig) == "kubernetes"
    assert choose_backend("auto", "shared", tmp_path / "absent") == "file"
    assert choose_backend("auto", "local", kubeconfig) == "none"
    assert choose_backend("file", "local", None) == "file"
    assert choose_backend("none", "shared", kubeconfig) == "none"
    with pytest.raises(ConfigError, match="no kubeconfig"):
        choose_backend("kubernetes", "shared", tmp_path / "absent")
    with pytest.raises(ConfigError, match="unknown coordination mode"):
        choose_backend("zookeeper", "shared", None)


def test_a_renew_period_that_cannot_beat_the_deadline_is_refused() -> None:
    with pytest.raises(CoordinationError, match="renew period"):
        LeaseTiming(duration_s=10, renew_period_s=9.5).check()
    LeaseTiming(duration_s=3, renew_period_s=1).check()


def test_the_lease_table_shows_holder_phase_and_progress() -> None:
    rec = LeaseRecord(name="mh-model-abc", version="7", holder="gpu-node-3", transitions=2, duration_s=30,
                      source="hf://org/model", dest="org/model", updated="2026-01-01T00:00:00.000000Z",
                      status=LeaseStatus(bytes_done=3 * 1024**3, bytes_total=12 * 1024**3))
    table = format_leases([view_of(rec), LeaseView("mh-done-1", "", "Complete", 5, 5, 0, "hf://a/b", "a/b", "")])
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["NAME", "HOLDER", "PHASE", "PROGRESS"]
    assert "gpu-node-3" in lines[1] and "3.0GiB/12.0GiB 25%" in lines[1]
    assert lines[2].split()[1] == "-" and "Complete" in lines[2]
    assert format_leases([]) == "no modelherd leases"
