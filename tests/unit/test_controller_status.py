"""The controller's pure parts: ConfigMaps → status lists/state, the deletion gate, the status patch, the keys a
ConfigMap change touches, and the ``controller`` command's settings."""

from __future__ import annotations

import json
from typing import Any

import pytest
from modelherd.agent.cli import build_parser, load_settings
from modelherd.agent.controller.controller import changed_keys
from modelherd.agent.controller.leader import LeaderElector
from modelherd.agent.controller.status import NodeStatuses, lifecycle_state, node_statuses, status_patch
from modelherd.agent.ome.entry import render_entry
from modelherd.storage.errors import ConfigError

KEY = "team.basemodel.llama"


def cm(node: str, data: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": node, "namespace": "ome"}, "data": data}


def entry(status: str) -> str:
    return json.dumps({"name": "llama", "status": status})


def everyone(_node: str) -> bool:
    return True


def test_state_is_ready_if_any_ready_else_failed_if_any_failed_else_in_transit() -> None:
    assert lifecycle_state(["a"], ["b"]) == "Ready"
    assert lifecycle_state([], ["b"]) == "Failed"
    assert lifecycle_state([], []) == "In_Transit"


def test_lists_are_sorted_and_only_ready_and_failed_count() -> None:
    cms = [cm("n3", {KEY: render_entry(None, name="llama", status="Ready")}),
           cm("n1", {KEY: entry("Ready")}), cm("n2", {KEY: entry("Failed")}), cm("n4", {KEY: entry("Updating")}),
           cm("n5", {KEY: entry("Deleted")}), cm("n6", {KEY: "{not json"}),
           cm("n7", {"other.basemodel.x": entry("Ready")}),
           cm("n8", {KEY: "[1, 2]"})]
    got = node_statuses(KEY, cms, everyone)
    assert got.ready == ("n1", "n3")
    assert got.failed == ("n2",)
    assert got.state == "Ready"


def test_deletion_is_held_by_every_entry_but_a_parsed_deleted_one() -> None:
    cms = [cm("n1", {KEY: entry("Ready")}), cm("n2", {KEY: entry("Updating")}), cm("n3", {KEY: "{not json"}),
           cm("n4", {KEY: entry("Deleted")}), cm("n5", {})]
    assert node_statuses(KEY, cms, everyone).holding == ("n1", "n2", "n3")
    assert node_statuses(KEY, [cm("n4", {KEY: entry("Deleted")})], everyone).holding == ()


def test_configmaps_of_nodes_that_are_gone_neither_count_nor_hold() -> None:
    cms = [cm("alive", {KEY: entry("Failed")}), cm("gone", {KEY: entry("Ready")})]
    got = node_statuses(KEY, cms, lambda n: n == "alive")
    assert got == NodeStatuses(ready=(), failed=("alive",), holding=("alive",))
    assert got.state == "Failed"


def test_status_patch_is_none_when_the_status_already_says_it() -> None:
    s = NodeStatuses(ready=("a",), failed=())
    assert status_patch({"state": "Ready", "nodesReady": ["a"], "lifecycle": "x"}, s) is None
    assert status_patch({"state": "In_Transit", "nodesReady": [], "nodesFailed": []}, NodeStatuses()) is None


def test_status_patch_sets_state_and_lists_and_removes_empty_lists() -> None:
    assert status_patch(None, NodeStatuses()) == {"state": "In_Transit", "nodesReady": None, "nodesFailed": None}
    assert status_patch({"state": "Ready", "nodesReady": ["b", "a"]}, NodeStatuses(ready=("a", "b"))) == \
        {"state": "Ready", "nodesReady": ["a", "b"], "nodesFailed": None}
    assert status_patch({"state": "Ready", "nodesReady": ["a"]}, NodeStatuses(failed=("a",))) == \
        {"state": "Failed", "nodesReady": None, "nodesFailed": ["a"]}


def test_a_removed_key_is_a_changed_key() -> None:
    # OME's map function looks only at present keys, so a removal never re-enqueued the model (§11.16)
    old = cm("n1", {KEY: entry("Ready"), "x.basemodel.y": entry("Ready")})
    new = cm("n1", {"x.basemodel.y": entry("Ready")})
    assert changed_keys(new, old) == {KEY}
    assert changed_keys(old, new) == {KEY}
    assert changed_keys(new, new) == set()
    assert changed_keys(old, None) == {KEY, "x.basemodel.y"}


@pytest.mark.parametrize(("lease", "renew", "retry"), [(15, 10, 10), (10, 10, 2), (15, 20, 2), (15, 10, 0)])
def test_leader_timings_must_be_ordered(lease: float, renew: float, retry: float) -> None:
    with pytest.raises(ConfigError) as e:
        LeaderElector(None, "ome", "l", "me", on_started_leading=lambda: None, on_stopped_leading=lambda: None,
                      lease_duration_s=lease, renew_deadline_s=renew, retry_period_s=retry)
    assert "retry period < renew deadline < lease duration" in e.value.message


def test_controller_flags_and_defaults() -> None:
    default = load_settings(build_parser().parse_args(["controller"]))
    assert (default.controller_port, default.leader_elect) == (8081, True)
    assert (default.leader_elect_lease_duration_s, default.leader_elect_renew_deadline_s,
            default.leader_elect_retry_period_s) == (15.0, 10.0, 2.0)
    s = load_settings(build_parser().parse_args([
        "controller", "--port", "9000", "--no-leader-elect", "--namespace", "models",
        "--leader-elect-lease-duration", "1m", "--leader-elect-renew-deadline", "30s",
        "--leader-elect-retry-period", "500ms"]))
    assert (s.controller_port, s.leader_elect, s.namespace) == (9000, False, "models")
    assert (s.leader_elect_lease_duration_s, s.leader_elect_renew_deadline_s, s.leader_elect_retry_period_s) == \
        (60.0, 30.0, 0.5)
    assert s.port == 8080, "the agent's port is untouched"
