"""``agent/watching/selection.py``: the kube-scheduler's nodeSelector + required node affinity rules.

One table: each row is a ``spec.storage``, a node, the verdict, the key words its reason must hold and,
where one place explains it, the term/expression it points at.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.watching.selection import NodeVerdict, evaluate


def node(name: str = "node-a", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": dict(labels)}}


def node_with(labels: dict[str, str], name: str = "node-a") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}}


def expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    out: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        out["values"] = list(values)
    return out


def affinity(*terms: dict[str, Any]) -> dict[str, Any]:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


def term(*exprs: dict[str, Any], fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"matchExpressions": list(exprs)}
    if fields is not None:
        out["matchFields"] = fields
    return out


def one(*exprs: dict[str, Any]) -> dict[str, Any]:
    return affinity(term(*exprs))


@dataclass(frozen=True)
class Row:
    id: str
    storage: dict[str, Any] | None
    node: dict[str, Any]
    selected: bool
    words: tuple[str, ...]
    term: int | None = None
    expression: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


H200 = node(gpu="h200", zone="a", cores="16")

ROWS = [
    # -- no constraints ---------------------------------------------------------------------------
    Row("storage None", None, H200, True, ("no nodeSelector or nodeAffinity", "every node")),
    Row("empty storage", {}, H200, True, ("no nodeSelector or nodeAffinity", "every node")),
    Row("null selector and affinity", {"nodeSelector": None, "nodeAffinity": None}, H200, True, ("every node",)),
    Row("empty nodeSelector map", {"nodeSelector": {}}, H200, True, ("every node",)),
    Row("affinity without required part", {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": term(expr("gpu", "In", "a100"))}]}}, H200, True, ("every node",)),
    # -- nodeSelector -----------------------------------------------------------------------------
    Row("nodeSelector equal", {"nodeSelector": {"gpu": "h200", "zone": "a"}}, H200, True, ("nodeSelector matches",)),
    Row("nodeSelector other value", {"nodeSelector": {"gpu": "h200"}}, node(gpu="a100"), False,
        ("nodeSelector: gpu=h200 but the node has gpu=a100",)),
    Row("nodeSelector missing label", {"nodeSelector": {"gpu": "h200"}}, node(), False,
        ("nodeSelector: gpu=h200", "no label gpu")),
    Row("nodeSelector one of two pairs fails", {"nodeSelector": {"gpu": "h200", "zone": "b"}}, H200, False,
        ("zone=b", "the node has zone=a")),
    Row("nodeSelector not a map", {"nodeSelector": ["gpu=h200"]}, H200, False, ("nodeSelector", "invalid", "map")),
    Row("nodeSelector non-string value", {"nodeSelector": {"cores": 16}}, H200, False, ("nodeSelector", "invalid")),
    Row("nodeSelector ANDed with affinity: selector fails",
        {"nodeSelector": {"gpu": "a100"}, **one(expr("zone", "In", "a"))}, H200, False, ("nodeSelector: gpu=a100",)),
    Row("nodeSelector ANDed with affinity: affinity fails",
        {"nodeSelector": {"gpu": "h200"}, **one(expr("zone", "In", "b"))}, H200, False,
        ("nodeAffinity term 0, expression 0", "zone In [b]"), term=0, expression=0),
    Row("nodeSelector and affinity both match",
        {"nodeSelector": {"gpu": "h200"}, **one(expr("zone", "In", "a"))}, H200, True,
        ("nodeSelector matches and nodeAffinity term 0 matches",), term=0),
    # -- In / NotIn --------------------------------------------------------------------------------
    Row("In listed", one(expr("gpu", "In", "a100", "h200")), H200, True, ("term 0 matches",), term=0),
    Row("In not listed", one(expr("gpu", "In", "a100", "l4")), H200, False,
        ("nodeAffinity term 0, expression 0: gpu In [a100 l4] but the node has gpu=h200",), term=0, expression=0),
    Row("In missing label", one(expr("rack", "In", "r1")), H200, False, ("rack In [r1]", "no label rack"), 0, 0),
    Row("NotIn value not listed", one(expr("zone", "NotIn", "b", "c")), H200, True, ("matches",), term=0),
    Row("NotIn value listed", one(expr("gpu", "Exists"), expr("zone", "NotIn", "a", "b")), H200, False,
        ("nodeAffinity term 0, expression 1: zone NotIn [a b] but the node has zone=a",), term=0, expression=1),
    Row("NotIn matches a node without the label", one(expr("rack", "NotIn", "r1")), H200, True, ("matches",), 0),
    Row("In with the empty string value", one(expr("empty", "In", "")), node(empty=""), True, ("matches",), 0),
    # -- Exists / DoesNotExist ---------------------------------------------------------------------
    Row("Exists present", one(expr("gpu", "Exists")), H200, True, ("matches",), term=0),
    Row("Exists with empty label value", one(expr("gpu", "Exists")), node(gpu=""), True, ("matches",), term=0),
    Row("Exists absent", one(expr("rack", "Exists")), H200, False, ("rack Exists", "no label rack"), 0, 0),
    Row("DoesNotExist absent", one(expr("rack", "DoesNotExist")), H200, True, ("matches",), term=0),
    Row("DoesNotExist present", one(expr("gpu", "DoesNotExist")), H200, False,
        ("gpu DoesNotExist but the node has gpu=h200",), 0, 0),
    Row("Exists with null values", one({"key": "gpu", "operator": "Exists", "values": None}), H200, True,
        ("matches",), 0),
    # -- Gt / Lt -----------------------------------------------------------------------------------
    Row("Gt greater", one(expr("cores", "Gt", "8")), H200, True, ("matches",), term=0),
    Row("Gt equal is not greater", one(expr("cores", "Gt", "16")), H200, False,
        ("cores Gt 16 but the node has cores=16",), 0, 0),
    Row("Lt less", one(expr("cores", "Lt", "17")), H200, True, ("matches",), term=0),
    Row("Lt equal is not less", one(expr("cores", "Lt", "16")), H200, False, ("cores Lt 16", "cores=16"), 0, 0),
    Row("Gt compares numbers not strings", one(expr("cores", "Gt", "9")), node(cores="10"), True, ("matches",), 0),
    Row("Gt missing label", one(expr("cores", "Gt", "1")), node(), False, ("cores Gt 1", "no label cores"), 0, 0),
    Row("Gt node label not an integer", one(expr("cores", "Gt", "1")), node(cores="many"), False,
        ("cores=many is not an integer",), 0, 0),
    Row("Gt node label beyond int64", one(expr("cores", "Gt", "1")), node(cores=str(2**63)), False,
        ("not an integer",), 0, 0),
    Row("Gt value abc is invalid", one(expr("cores", "Gt", "abc")), H200, False,
        ("expression 0", "invalid", "'abc'", "integer"), 0, 0),
    Row("Gt value with two values is invalid", one(expr("cores", "Gt", "1", "2")), H200, False,
        ("invalid", "exactly one", "[1 2]"), 0, 0),
    Row("Lt without a value is invalid", one(expr("cores", "Lt")), H200, False, ("invalid", "exactly one"), 0, 0),
    Row("Gt value with a sign is not a label value", one(expr("cores", "Gt", "-1")), H200, False,
        ("invalid", "label value"), 0, 0),
    Row("Gt float value is invalid", one(expr("cores", "Gt", "1.5")), H200, False, ("invalid", "integer"), 0, 0),
    # -- malformed expressions ---------------------------------------------------------------------
    Row("unknown operator", one(expr("gpu", "Equals", "h200")), H200, False,
        ("nodeAffinity term 0, expression 0", "invalid", "'Equals'", "In, NotIn"), 0, 0),
    Row("operator is case sensitive", one(expr("gpu", "in", "h200")), H200, False, ("invalid", "'in'"), 0, 0),
    Row("missing operator", one({"key": "gpu", "values": ["h200"]}), H200, False, ("invalid", "None"), 0, 0),
    Row("values not a list", one({"key": "gpu", "operator": "In", "values": "h200"}), H200, False,
        ("invalid", "values must be a list"), 0, 0),
    Row("values holding a number", one({"key": "cores", "operator": "Gt", "values": [8]}), H200, False,
        ("invalid", "list of strings"), 0, 0),
    Row("In without values", one(expr("gpu", "In")), H200, False, ("invalid", "at least one value"), 0, 0),
    Row("Exists with values", one(expr("gpu", "Exists", "h200")), H200, False, ("invalid", "takes no values"), 0, 0),
    Row("key not a label key", one(expr("gpu type", "Exists")), H200, False, ("invalid", "'gpu type'"), 0, 0),
    Row("key with an uppercase prefix", one(expr("Example.com/gpu", "Exists")), H200, False,
        ("invalid", "prefix"), 0, 0),
    Row("key with a valid prefix", one(expr("nvidia.com/gpu.product", "In", "H200")),
        node_with({"nvidia.com/gpu.product": "H200"}), True, ("matches",), 0),
    Row("In value not a label value", one(expr("gpu", "In", "h 200")), H200, False,
        ("invalid", "label value"), 0, 0),
    Row("an invalid expression fails its term even after a matching one",
        one(expr("gpu", "In", "h200"), expr("zone", "Near", "a")), H200, False, ("expression 1", "invalid"), 0, 1),
    Row("an invalid expression wins over an earlier mismatch",
        one(expr("gpu", "In", "a100"), expr("cores", "Gt", "x")), H200, False, ("expression 1", "invalid"), 0, 1),
    Row("expression not an object", one("gpu=h200"), H200, False, ("invalid", "object"), 0, 0),  # type: ignore[arg-type]
    # -- matchFields -------------------------------------------------------------------------------
    Row("matchFields name In", affinity(term(fields=[expr("metadata.name", "In", "node-a")])), H200, True,
        ("term 0 matches",), term=0),
    Row("matchFields name In other node", affinity(term(fields=[expr("metadata.name", "In", "node-b")])), H200,
        False, ("nodeAffinity term 0, field 0: metadata.name In [node-b] but the node is node-a",), 0, 0),
    Row("matchFields name NotIn", affinity(term(fields=[expr("metadata.name", "NotIn", "node-b")])), H200, True,
        ("matches",), 0),
    Row("matchFields name NotIn this node", affinity(term(fields=[expr("metadata.name", "NotIn", "node-a")])),
        H200, False, ("field 0", "NotIn [node-a]"), 0, 0),
    Row("matchFields ANDed with matchExpressions",
        affinity(term(expr("gpu", "In", "h200"), fields=[expr("metadata.name", "In", "node-b")])), H200, False,
        ("field 0", "node-b"), 0, 0),
    Row("matchFields unsupported key", affinity(term(fields=[expr("metadata.uid", "In", "x")])), H200, False,
        ("field 0", "invalid", "metadata.uid", "only metadata.name"), 0, 0),
    Row("matchFields unsupported operator", affinity(term(fields=[expr("metadata.name", "Exists")])), H200, False,
        ("field 0", "invalid", "'Exists'"), 0, 0),
    Row("matchFields two values", affinity(term(fields=[expr("metadata.name", "In", "node-a", "node-b")])), H200,
        False, ("invalid", "exactly one value"), 0, 0),
    Row("matchFields are not checked on a node without a name (the scheduler's rule)",
        affinity(term(fields=[expr("metadata.name", "In", "node-b")])), node_with({"gpu": "h200"}, name=""), True,
        ("matches",), 0),
    # -- several terms, empty terms ----------------------------------------------------------------
    Row("second term matches", affinity(term(expr("gpu", "In", "a100")), term(expr("zone", "In", "a"))), H200, True,
        ("nodeAffinity term 1 matches",), term=1),
    Row("no term matches names each term's first failure",
        affinity(term(expr("gpu", "In", "a100")), term(expr("zone", "Exists"), expr("rack", "Exists"))), H200, False,
        ("no term matches", "term 0, expression 0: gpu In [a100]", "term 1, expression 1: rack Exists"), 0, 0),
    Row("an invalid term does not stop a later term matching",
        affinity(term(expr("gpu", "Bogus")), term(expr("gpu", "In", "h200"))), H200, True, ("term 1 matches",), 1),
    Row("an invalid term is named when nothing matches",
        affinity(term(expr("gpu", "Bogus")), term(expr("gpu", "In", "a100"))), H200, False,
        ("term 0, expression 0: invalid", "term 1, expression 0: gpu In [a100]"), 0, 0),
    Row("empty term matches nothing", affinity({}), H200, False, ("term 0", "empty term", "matches no node"), 0),
    Row("term with empty lists matches nothing", affinity({"matchExpressions": [], "matchFields": []}), H200, False,
        ("empty term",), 0),
    Row("empty term beside a matching term", affinity({}, term(expr("gpu", "Exists"))), H200, True,
        ("term 1 matches",), 1),
    Row("empty terms list matches nothing", affinity(), H200, False, ("no nodeSelectorTerms", "matches no node")),
    Row("null terms list matches nothing",
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": None}}}, H200,
        False, ("no nodeSelectorTerms",)),
    Row("terms not a list",
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": {"a": 1}}}},
        H200, False, ("invalid", "must be a list")),
    Row("term not an object", affinity("gpu"), H200, False, ("term 0", "invalid", "object"), 0),  # type: ignore[arg-type]
    Row("matchExpressions not a list", affinity({"matchExpressions": {"key": "gpu"}}), H200, False,
        ("term 0", "invalid", "matchExpressions must be a list"), 0),
    Row("nodeAffinity not an object", {"nodeAffinity": "gpu"}, H200, False, ("nodeAffinity", "invalid")),
    Row("node without labels", one(expr("gpu", "DoesNotExist")), {"metadata": {"name": "n"}}, True, ("matches",), 0),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_selection_table(row: Row) -> None:
    got = evaluate(row.storage, row.node)
    assert isinstance(got, NodeVerdict)
    assert got.selected is row.selected, got.reason
    for word in row.words:
        assert word in got.reason, f"{word!r} not in {got.reason!r}"
    assert "\n" not in got.reason
    assert (got.term, got.expression) == (row.term, row.expression), got.reason


def test_table_ids_are_unique() -> None:
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


def test_selection_does_not_modify_its_inputs() -> None:
    storage = {"nodeSelector": {"gpu": "h200"}, **affinity(term(expr("zone", "In", "a")), {})}
    before = repr(storage), repr(H200)
    evaluate(storage, H200)
    assert (repr(storage), repr(H200)) == before


def test_a_node_with_non_mapping_labels_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="labels"):
        evaluate({}, {"metadata": {"name": "n", "labels": ["gpu=h200"]}})


# -- the kube-scheduler's own code as the oracle ---------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
ORACLE = REPO / "tests" / "oracles" / "selection" / "main.go"
GO_MODULE = REPO / "e2e" / "controlplane"  # its go.mod already pins k8s.io/api and k8s.io/component-helpers

KEYS = ["gpu", "zone", "cores", "nvidia.com/gpu", "bad key", "Example.com/x", "a/b/c", ""]
VALUES = ["a", "b", "h200", "16", "8", "0", "abc", "-1", "", "a b", "9223372036854775808"]
OPERATORS = ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt", "Bogus", "in", ""]
NAMES = ["node-a", "node-b", ""]


def _random_case(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    """A well-typed (storage, node) pair from a small vocabulary, so that keys and values collide often."""
    labels = {k: rng.choice(VALUES) for k in rng.sample(KEYS[:4], rng.randint(0, 4))}
    node = {"metadata": {"name": rng.choice(NAMES), "labels": labels}}
    storage: dict[str, Any] = {}
    if rng.random() < 0.3:
        storage["nodeSelector"] = {k: rng.choice(VALUES[:5]) for k in rng.sample(KEYS[:4], rng.randint(0, 2))}
    if rng.random() < 0.9:
        terms = []
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            t: dict[str, Any] = {}
            if rng.random() < 0.9:
                t["matchExpressions"] = [
                    {"key": rng.choice(KEYS), "operator": rng.choice(OPERATORS),
                     "values": rng.sample(VALUES, rng.choice([0, 1, 1, 1, 2, 3]))}
                    for _ in range(rng.randint(0, 3))
                ]
            if rng.random() < 0.3:
                t["matchFields"] = [
                    {"key": "metadata.name", "operator": rng.choice(["In", "NotIn", "In", "Exists"]),
                     "values": rng.sample(NAMES[:2], rng.choice([0, 1, 1, 2]))}
                    for _ in range(rng.randint(0, 2))
                ]
            terms.append(t)
        storage["nodeAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
    return storage, node


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], list[str]]:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        pytest.skip("go is not installed: the scheduler oracle cannot be built")
    work = tmp_path_factory.mktemp("scheduler-oracle")
    mod = (GO_MODULE / "go.mod").read_text().splitlines()
    (work / "go.mod").write_text("\n".join(["module oracle", *mod[1:]]) + "\n")
    shutil.copy(GO_MODULE / "go.sum", work / "go.sum")
    shutil.copy(ORACLE, work / "main.go")
    binary = work / "oracle"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    built = subprocess.run([go, "build", "-o", str(binary), "."], cwd=work, env=env, capture_output=True,
                           text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]

    def run(lines: list[str]) -> list[str]:
        done = subprocess.run([str(binary)], input="\n".join(lines) + "\n", capture_output=True, text=True,
                              check=True, timeout=120)
        return done.stdout.splitlines()

    return run


@pytest.mark.slow
def test_selection_agrees_with_the_kube_scheduler(scheduler: Callable[[list[str]], list[str]]) -> None:
    rng = random.Random(20240901)
    cases = [_random_case(rng) for _ in range(20_000)]
    verdicts = scheduler([json.dumps({"storage": s, "node": n}) for s, n in cases])
    assert len(verdicts) == len(cases)
    seen: Counter[str] = Counter()
    for (storage, node_obj), verdict in zip(cases, verdicts, strict=True):
        assert verdict != "BADJSON", storage
        got = evaluate(storage, node_obj)
        seen[verdict] += 1
        context = f"{verdict}: {json.dumps(storage)} on {json.dumps(node_obj)} -> {got.reason}"
        assert got.selected is (verdict == "MATCH"), context
        if verdict == "ERROR":
            assert "invalid" in got.reason, context
        if verdict == "NOMATCH":
            assert "invalid" not in got.reason, context
    assert min(seen.values()) > 1000, seen  # the generator reaches every verdict
