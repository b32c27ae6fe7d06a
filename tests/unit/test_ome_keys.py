"""OME's label and ConfigMap keys: the contract's examples and vectors cross-checked against Go.

The vectors were computed by a throw-away Go program implementing the contract's algorithm (§2.2), run on Go 1.26;
they are committed here as literal strings. Lengths are bytes: the multibyte cases cut characters in two, and a split
character's dangling bytes read as U+FFFD (what Go's JSON encoder sends for them).
"""

from __future__ import annotations

import hashlib

import pytest
from modelherd.agent.ome.keys import (
    configmap_key,
    node_label_key,
    parse_configmap_key,
    truncate_with_hash,
)

CBM = "ClusterBaseModel"
BM = "BaseModel"

# (kind, namespace, name, node label key, ConfigMap key)
VECTORS = [
    (CBM, '', 'llama-3-1-8b-instruct',
     'models.ome.io/clusterbasemodel.llama-3-1-8b-instruct',
     'clusterbasemodel.llama-3-1-8b-instruct'),
    (CBM, '', 'deepseek-r1-distill-qwen-32b-instruct-fp8',
     'models.ome.io/clusterbasemodel.918b9325-l-qwen-32b-instruct-fp8',
     'clusterbasemodel.deepseek-r1-distill-qwen-32b-instruct-fp8'),
    (BM, 'default', 'llama-3-1-8b',
     'models.ome.io/default.basemodel.llama-3-1-8b',
     'default.basemodel.llama-3-1-8b'),
    (BM, 'production-team', 'llama-3-70b-instruct-awq',
     'models.ome.io/95e93964.basemodel.llama-3-70b-instruct-awq',
     'production-team.basemodel.llama-3-70b-instruct-awq'),
    (BM, 'ml-platform-research', 'deepseek-r1-distill-qwen-32b-instruct-fp8',
     'models.ome.io/d61c7e60.basemodel.918b9325-qwen-32b-instruct-fp8',
     'ml-platform-research.basemodel.deepseek-r1-distill-qwen-32b-instruct-fp8'),
    (CBM, '', 'a' * 32,
     'models.ome.io/clusterbasemodel.' + 'a' * 32,
     'clusterbasemodel.' + 'a' * 32),
    (CBM, '', 'a' * 33,
     'models.ome.io/clusterbasemodel.852785c8-' + 'a' * 23,
     'clusterbasemodel.' + 'a' * 33),
    (BM, 'ns', 'n' * 36,
     'models.ome.io/ns.basemodel.' + 'n' * 36,
     'ns.basemodel.' + 'n' * 36),
    (BM, 'ns', 'n' * 37,
     'models.ome.io/ns.basemodel.4cfca78c-' + 'n' * 27,
     'ns.basemodel.' + 'n' * 37),
    (BM, 'nsnsnsns', 'n' * 30,
     'models.ome.io/nsnsnsns.basemodel.' + 'n' * 30,
     'nsnsnsns.basemodel.' + 'n' * 30),
    (BM, 'nsnsnsns', 'n' * 31,
     'models.ome.io/nsnsnsns.basemodel.620ab6e0-' + 'n' * 21,
     'nsnsnsns.basemodel.' + 'n' * 31),
    (BM, 'nsnsnsnsn', 'n' * 29,
     'models.ome.io/nsnsnsnsn.basemodel.' + 'n' * 29,
     'nsnsnsnsn.basemodel.' + 'n' * 29),
    (BM, 'nsnsnsnsn', 'n' * 30,
     'models.ome.io/3fce7c26.basemodel.' + 'n' * 30,
     'nsnsnsnsn.basemodel.' + 'n' * 30),
    (BM, 'team-alpha', 'short',
     'models.ome.io/team-alpha.basemodel.short',
     'team-alpha.basemodel.short'),
    (CBM, '', '模型模型模型模型模型模型',
     'models.ome.io/clusterbasemodel.45608548-\ufffd\ufffd型模型模型模型',
     'clusterbasemodel.模型模型模型模型模型模型'),
    (CBM, '', 'ü' * 17,
     'models.ome.io/clusterbasemodel.2759b0f7-\ufffd' + 'ü' * 11,
     'clusterbasemodel.' + 'ü' * 17),
    (CBM, '', 'x模型模型模型模型模型模型模型模型模型模型模型',
     'models.ome.io/clusterbasemodel.a22d9098-\ufffd\ufffd型模型模型模型',
     'clusterbasemodel.x模型模型模型模型模型模型模型模型模型模型模型'),
    (BM, '命名空间', '模型模型模型模型模型模型',
     'models.ome.io/db772f3f.basemodel.45608548-型模型模型模型',
     '命名空间.basemodel.模型模型模型模型模型模型'),
    (CBM, '', 'm' * 236,
     'models.ome.io/clusterbasemodel.289871bf-' + 'm' * 23,
     'clusterbasemodel.' + 'm' * 236),
    (CBM, '', 'm' * 237,
     'models.ome.io/clusterbasemodel.b1483fe7-' + 'm' * 23,
     'clusterbasemodel.b1483fe7-' + 'm' * 227),
    (BM, 'ns', 'm' * 240,
     'models.ome.io/ns.basemodel.5b87dd9b-' + 'm' * 27,
     'ns.basemodel.' + 'm' * 240),
    (BM, 'ns', 'm' * 241,
     'models.ome.io/ns.basemodel.615497d6-' + 'm' * 27,
     'ns.basemodel.615497d6-' + 'm' * 231),
    (BM, 'n' * 9, 'm' * 234,
     'models.ome.io/f943f1d1.basemodel.9f61df8c-' + 'm' * 21,
     'f943f1d1.basemodel.' + 'm' * 234),
    (BM, 'n' * 9, 'm' * 233,
     'models.ome.io/f943f1d1.basemodel.c24e46c2-' + 'm' * 21,
     'n' * 9 + '.basemodel.' + 'm' * 233),
    (BM, 'a.basemodel.b', 'c',
     'models.ome.io/a.basemodel.b.basemodel.c',
     'a.basemodel.b.basemodel.c'),
]


@pytest.mark.parametrize(("kind", "ns", "name", "label", "key"), VECTORS)
def test_keys_match_go(kind: str, ns: str, name: str, label: str, key: str) -> None:
    assert node_label_key(kind, ns, name) == label  # type: ignore[arg-type]
    assert configmap_key(kind, ns, name) == key  # type: ignore[arg-type]


def test_contract_table_examples() -> None:
    assert node_label_key(CBM, "", "deepseek-r1-distill-qwen-32b-instruct-fp8") == \
        "models.ome.io/clusterbasemodel.918b9325-l-qwen-32b-instruct-fp8"
    assert node_label_key(BM, "ml-platform-research", "deepseek-r1-distill-qwen-32b-instruct-fp8") == \
        "models.ome.io/d61c7e60.basemodel.918b9325-qwen-32b-instruct-fp8"


def test_label_name_part_never_exceeds_49_bytes_for_ascii() -> None:
    for ns_len in (0, 1, 8, 9, 30, 63):
        for name_len in (1, 29, 30, 31, 38, 39, 100, 253):
            key = node_label_key(BM, "n" * ns_len, "m" * name_len)
            assert len(key.split("/", 1)[1]) <= 49, (ns_len, name_len)
    assert len(node_label_key(CBM, "", "m" * 253).split("/", 1)[1]) == 49


def test_truncate_keeps_fitting_strings_and_hashes_whole_string() -> None:
    assert truncate_with_hash("abc", 3) == "abc"
    s = "x" * 20
    h = hashlib.sha256(s.encode()).hexdigest()
    assert truncate_with_hash(s, 19) == h[:8] + "-" + "x" * 10


def test_truncate_with_tiny_budget_is_only_the_hash() -> None:
    s = "production-team"
    h = hashlib.sha256(s.encode()).hexdigest()
    assert truncate_with_hash(s, 8) == h[:8] == "95e93964"
    assert truncate_with_hash(s, 9) == h[:9]
    assert truncate_with_hash(s, 10) == h[:8] + "-" + "m"


def test_truncate_counts_bytes_not_characters() -> None:
    name = "é" * 10  # 10 characters, 20 bytes
    assert truncate_with_hash(name, 19) != name
    assert truncate_with_hash(name, 20) == name


@pytest.mark.parametrize(("key", "parsed"), [
    ("clusterbasemodel.llama-3-1-8b-instruct", (CBM, "", "llama-3-1-8b-instruct")),
    ("default.basemodel.llama-3-1-8b", (BM, "default", "llama-3-1-8b")),
    ("a.basemodel.b.basemodel.c", (BM, "a", "b.basemodel.c")),  # split on the first separator, as Go
    ("clusterbasemodel.", (CBM, "", "")),
    ("basemodel.x", None),
    ("something-else", None),
])
def test_parse_configmap_key(key: str, parsed: tuple[str, str, str] | None) -> None:
    assert parse_configmap_key(key) == parsed


def test_parse_inverts_untruncated_keys() -> None:
    for kind, ns, name in [(CBM, "", "m"), (BM, "team", "llama-3"), (BM, "ns", "m" * 240)]:
        assert parse_configmap_key(configmap_key(kind, ns, name)) == (kind, ns, name)  # type: ignore[arg-type]
