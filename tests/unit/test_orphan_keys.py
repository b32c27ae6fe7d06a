"""Deciding which ConfigMap entries belong to live models compares keys, never names parsed back from keys:
a truncated key (a ClusterBaseModel name over 236 bytes, a BaseModel namespace + name over 242) parses into a
name no CR has."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from modelherd.agent.basemodels import ModelRef
from modelherd.agent.controller.controller import ModelController
from modelherd.agent.ome.keys import parse_configmap_key
from modelherd.agent.runner import NodeAgent

LONG_CBM = ModelRef("ClusterBaseModel", "", "c" * 250)
LONG_BM = ModelRef("BaseModel", "team", "b" * 240)
SHORT = ModelRef("ClusterBaseModel", "", "llama")


def _orphans(live: list[ModelRef], keys: list[str]) -> list[ModelRef]:
    added: list[ModelRef] = []
    cm = {"data": {k: "{}" for k in keys}}
    agent: Any = SimpleNamespace(namespace="ome", node_name="n1", _all_refs=lambda: live,
                                 cm_informer=SimpleNamespace(get=lambda key: cm if key == "ome/n1" else None),
                                 queue=SimpleNamespace(add=added.append))
    NodeAgent._enqueue_orphans(agent)
    return added


def test_truncated_keys_parse_into_names_no_cr_has() -> None:
    for ref in (LONG_CBM, LONG_BM):
        assert len(ref.cm_key.encode()) == 253
        parsed = parse_configmap_key(ref.cm_key)
        assert parsed is not None and ModelRef(*parsed) != ref and ModelRef(*parsed).cm_key == ref.cm_key


def test_the_sweep_keeps_live_entries_whose_keys_are_truncated() -> None:
    live = [LONG_CBM, LONG_BM, SHORT]
    assert _orphans(live, [r.cm_key for r in live] + ["not-a-model-key"]) == []


def test_the_sweep_enqueues_orphans_truncated_or_not_as_their_parsed_ref() -> None:
    gone_long = ModelRef("ClusterBaseModel", "", "g" * 250)
    gone_bm = ModelRef("BaseModel", "other", "x" * 250)
    keys = [LONG_CBM.cm_key, SHORT.cm_key, gone_long.cm_key, gone_bm.cm_key, "clusterbasemodel.deleted"]
    added = _orphans([LONG_CBM, SHORT], keys)
    want = [ModelRef(*p) for k in keys[2:] if (p := parse_configmap_key(k)) is not None]
    assert added == want
    assert [r.cm_key for r in added] == keys[2:]  # what the reconciler removes is exactly the orphan key


def test_the_controller_maps_keys_to_the_crs_that_compute_them() -> None:
    parsed = parse_configmap_key(LONG_CBM.cm_key)
    assert parsed is not None
    named_like_the_key = ModelRef(*parsed)  # a CR named like the truncated key: OME maps it to the same key
    ctl: Any = SimpleNamespace(_all_refs=lambda: [LONG_CBM, LONG_BM, SHORT, named_like_the_key])
    assert ModelController._refs_for_keys(ctl, [LONG_CBM.cm_key]) == {LONG_CBM, named_like_the_key}
    assert ModelController._refs_for_keys(ctl, [LONG_BM.cm_key, "team.basemodel.gone"]) == {LONG_BM}
    ctl = SimpleNamespace(_all_refs=lambda: [LONG_BM, SHORT])
    assert ModelController._refs_for_keys(ctl, [LONG_CBM.cm_key, SHORT.cm_key]) == {SHORT}
    assert ModelController._refs_for_keys(ctl, []) == set()
