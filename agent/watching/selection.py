"""Does this node want this model? Kubernetes' scheduler semantics for ``spec.storage``.

``evaluate(storage, node)`` applies ``spec.storage.nodeSelector`` AND
``spec.storage.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution`` to a Node object exactly as the
kube-scheduler applies a pod's ``nodeSelector`` and required node affinity
(``k8s.io/component-helpers/scheduling/corev1/nodeaffinity``, ``RequiredNodeAffinity.Match``, with the
label-selector rules of ``k8s.io/apimachinery/pkg/labels``):

- ``nodeSelector``: every pair must equal a node label (no validation, like the scheduler's
  ``SelectorFromSet``); an empty or null map constrains nothing.
- ``nodeSelectorTerms`` are ORed; a null required affinity constrains nothing, but an empty or null
  terms list matches no node, and an empty term (no ``matchExpressions``, no ``matchFields``) matches no
  node (the scheduler skips it).
- Within a term every ``matchExpressions`` entry and every ``matchFields`` entry must hold (AND).
- ``In``: the label exists and its value is listed. ``NotIn``: the label is absent or its value is not
  listed (a node WITHOUT the label matches). ``Exists`` / ``DoesNotExist``: the key is present / absent.
  ``Gt`` / ``Lt``: the label exists, parses as a base-10 int64, and is strictly greater / less.
- A term with an invalid expression (unknown operator, ``In``/``NotIn`` without values, ``Exists`` with
  values, ``Gt``/``Lt`` without exactly one integer value, a key that is not a qualified name, a value that
  is not a label value) fails as a whole, however its other expressions fare; other terms can still select
  the node (the scheduler's ``LazyErrorNodeSelector``: parse errors only count when no term matches).
  A node label that is not an integer never matches ``Gt``/``Lt``; that is a mismatch, not an error.
- ``matchFields`` supports ``metadata.name`` with ``In``/``NotIn`` and exactly one value (the API server's
  validation, which the scheduler relies on; another key or operator makes the term invalid). As in the
  scheduler, ``matchFields`` are not checked for a node that has no name.
- ``preferredDuringSchedulingIgnoredDuringExecution`` is ignored: it ranks nodes, it never excludes one.

Malformed shapes (a values field that is not a list of strings, a term that is not an object, a
``nodeSelector`` that is not a string map) never select a node through that part, and the reason says why.

``evaluate(None, node)`` selects the node: a model without ``spec.storage`` has no constraints (OME does the
same). The agent treats a CR without ``storage`` as a Failed model before it asks; ``None`` here only means
"no constraints".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["NodeVerdict", "evaluate"]

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")
_FIELD_OPERATORS = ("In", "NotIn")
_NODE_NAME_FIELD = "metadata.name"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# k8s.io/apimachinery/pkg/util/validation: qualified names and label values.
_QNAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# strconv.ParseInt(s, 10, 64): an optional sign, then ASCII digits only.
_GO_INT_RE = re.compile(r"^[+-]?[0-9]+$")


@dataclass(frozen=True)
class NodeVerdict:
    """The verdict for one (model, node) pair.

    ``reason`` is one human line for ``modelherd explain`` and logs. ``term`` is the index of the matching
    ``nodeSelectorTerms`` entry when the affinity selected the node; when it did not, ``term`` and
    ``expression`` locate the first failure (lowest term index; ``expression`` indexes that term's
    ``matchExpressions``, or its ``matchFields`` when the reason says ``field``), and the reason names the
    failure of every term. Both are ``None`` when the failure (or the match) is not a single term's.
    """

    selected: bool
    reason: str
    term: int | None = None
    expression: int | None = None


class _Invalid(Exception):
    """An expression or term the scheduler would refuse to parse (the message says why)."""


@dataclass(frozen=True)
class _Failure:
    """Why one term does not match: where, and the human sentence."""

    field: bool
    index: int | None
    message: str

    def place(self, term: int) -> str:
        if self.index is None:
            return f"term {term}"
        return f"term {term}, {'field' if self.field else 'expression'} {self.index}"


def _fmt_values(values: Sequence[str]) -> str:
    return "[" + " ".join(values) + "]"


def _label_key_problem(key: str) -> str | None:
    """``IsQualifiedName``: an optional DNS-1123 subdomain prefix and '/', then a name of at most 63 chars."""
    parts = key.split("/")
    if len(parts) > 2:
        return f"key {key!r} is not a qualified name (at most one '/')"
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix):
            return f"key {key!r} has an invalid prefix (a lowercase DNS subdomain is needed)"
    if not name or len(name) > 63 or not _QNAME_RE.match(name):
        return (f"key {key!r} is not a valid label key (alphanumerics, '-', '_' or '.', "
                "starting and ending alphanumeric, at most 63)")
    return None


def _label_value_problem(value: str) -> str | None:
    """``IsValidLabelValue``: empty, or a qualified-name-shaped string of at most 63 characters."""
    if value == "" or (len(value) <= 63 and _QNAME_RE.match(value)):
        return None
    return f"value {value!r} is not a valid label value"


def _parse_int64(text: str) -> int | None:
    """``strconv.ParseInt(text, 10, 64)``: the integer, or None when Go would return an error."""
    if not _GO_INT_RE.match(text):
        return None
    number = int(text)
    return number if _INT64_MIN <= number <= _INT64_MAX else None


def _values_of(raw: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``values`` list (null or absent is empty); anything but a list of strings is invalid."""
    values = raw.get("values")
    if values is None:
        return ()
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _Invalid(f"values must be a list of strings, got {values!r}")
    return tuple(values)


def _entry(raw: object, what: str, operator_name: str, operators: Sequence[str]) -> tuple[Mapping[str, Any], str]:
    """An entry that is an object with a known operator (checked first, as the scheduler's switch does)."""
    if not isinstance(raw, Mapping):
        raise _Invalid(f"{what} must be an object, got {raw!r}")
    operator = raw.get("operator")
    if operator not in operators:
        raise _Invalid(f"{operator_name} {operator!r} is not one of {', '.join(operators)}")
    return raw, str(operator)


@dataclass(frozen=True)
class _Requirement:
    """One parsed ``matchExpressions`` entry; only ever built from a valid expression."""

    key: str
    operator: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, raw: object) -> _Requirement:
        """Validate like ``labels.NewRequirement`` (operator first, as the scheduler's switch does)."""
        raw, operator = _entry(raw, "a match expression", "operator", _OPERATORS)
        key = raw.get("key")
        if not isinstance(key, str):
            raise _Invalid(f"key must be a string, got {key!r}")
        values = _values_of(raw)
        problem = _label_key_problem(key)
        if problem:
            raise _Invalid(problem)
        if operator in ("In", "NotIn") and not values:
            raise _Invalid(f"{key} {operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise _Invalid(f"{key} {operator} takes no values, got {_fmt_values(values)}")
        if operator in ("Gt", "Lt"):
            if len(values) != 1:
                raise _Invalid(f"{key} {operator} needs exactly one integer value, got {_fmt_values(values)}")
            if _parse_int64(values[0]) is None:
                raise _Invalid(f"{key} {operator} {values[0]!r}: the value must be an integer")
        for value in values:
            problem = _label_value_problem(value)
            if problem:
                raise _Invalid(f"{key} {operator}: {problem}")
        return cls(key=key, operator=operator, values=values)

    def describe(self) -> str:
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{self.key} {self.operator}"
        if self.operator in ("Gt", "Lt"):
            return f"{self.key} {self.operator} {self.values[0]}"
        return f"{self.key} {self.operator} {_fmt_values(self.values)}"

    def mismatch(self, labels: Mapping[str, str]) -> str | None:
        """None when the node's labels satisfy this requirement, else the sentence saying why not."""
        present = self.key in labels
        value = labels.get(self.key)
        has = f"the node has {self.key}={value}" if present else f"the node has no label {self.key}"
        if self.operator == "In":
            ok = present and value in self.values
        elif self.operator == "NotIn":
            ok = not present or value not in self.values
        elif self.operator == "Exists":
            ok = present
        elif self.operator == "DoesNotExist":
            ok = not present
        else:  # Gt / Lt
            if not present:
                ok = False
            else:
                node_number = _parse_int64(str(value))
                if node_number is None:
                    return f"{self.describe()} but the node's {self.key}={value} is not an integer"
                bound = int(self.values[0])
                ok = node_number > bound if self.operator == "Gt" else node_number < bound
        return None if ok else f"{self.describe()} but {has}"


@dataclass(frozen=True)
class _FieldRequirement:
    """One parsed ``matchFields`` entry: ``metadata.name`` In/NotIn one value."""

    key: str
    operator: str
    value: str

    @classmethod
    def parse(cls, raw: object) -> _FieldRequirement:
        raw, operator = _entry(raw, "a match field", "field operator", _FIELD_OPERATORS)
        key = raw.get("key")
        if key != _NODE_NAME_FIELD:
            raise _Invalid(f"field key {key!r} is not supported (only {_NODE_NAME_FIELD})")
        values = _values_of(raw)
        if len(values) != 1:
            raise _Invalid(f"{key} {operator} needs exactly one value, got {_fmt_values(values)}")
        return cls(key=key, operator=operator, value=values[0])

    def mismatch(self, node_name: str) -> str | None:
        equal = node_name == self.value
        if equal == (self.operator == "In"):
            return None
        return f"{self.key} {self.operator} [{self.value}] but the node is {node_name}"


def _list_of(raw: Mapping[str, Any], name: str) -> list[Any]:
    value = raw.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"{name} must be a list, got {value!r}")
    return value


def _term_failure(raw_term: object, labels: Mapping[str, str], node_name: str) -> _Failure | None:
    """None when the term selects the node; else its first invalid entry, or failing entry if all are valid.

    Invalid entries win over mismatches: the scheduler refuses a term it cannot parse outright.
    """
    if not isinstance(raw_term, Mapping):
        return _Failure(False, None, f"invalid: a term must be an object, got {raw_term!r}")
    try:
        raw_exprs = _list_of(raw_term, "matchExpressions")
        raw_fields = _list_of(raw_term, "matchFields")
    except _Invalid as err:
        return _Failure(False, None, f"invalid: {err}")
    if not raw_exprs and not raw_fields:
        return _Failure(False, None, "empty term (no matchExpressions or matchFields) matches no node")
    exprs: list[_Requirement] = []
    for i, raw in enumerate(raw_exprs):
        try:
            exprs.append(_Requirement.parse(raw))
        except _Invalid as err:
            return _Failure(False, i, f"invalid: {err}")
    fields: list[_FieldRequirement] = []
    for i, raw in enumerate(raw_fields):
        try:
            fields.append(_FieldRequirement.parse(raw))
        except _Invalid as err:
            return _Failure(True, i, f"invalid: {err}")
    for i, expr in enumerate(exprs):
        why = expr.mismatch(labels)
        if why:
            return _Failure(False, i, why)
    if node_name:  # the scheduler skips matchFields for a node without a name
        for i, fld in enumerate(fields):
            why = fld.mismatch(node_name)
            if why:
                return _Failure(True, i, why)
    return None


def _node_selector_failure(selector: object, labels: Mapping[str, str]) -> str | None:
    """None when every pair equals a node label; else the first failing pair (keys in sorted order)."""
    if not isinstance(selector, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        return f"nodeSelector: invalid: must be a map of label to string value, got {selector!r}"
    for key in sorted(selector):
        want = selector[key]
        if key not in labels:
            return f"nodeSelector: {key}={want} but the node has no label {key}"
        if labels[key] != want:
            return f"nodeSelector: {key}={want} but the node has {key}={labels[key]}"
    return None


def _node_identity(node: Mapping[str, Any]) -> tuple[Mapping[str, str], str]:
    metadata = node.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"node.metadata must be a mapping, got {type(metadata).__name__}")
    labels = metadata.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise TypeError(f"node.metadata.labels must be a mapping, got {type(labels).__name__}")
    name = metadata.get("name") or ""
    return labels, str(name)


def evaluate(storage: Mapping[str, Any] | None, node: Mapping[str, Any]) -> NodeVerdict:
    """Whether ``node`` (a Node object as the API returns it) should hold the model with ``spec.storage``.

    Invariant: ``selected`` is exactly the kube-scheduler's verdict for a pod with this ``nodeSelector`` and
    required node affinity (see the module docstring), and ``reason`` never claims a match that did not
    happen. ``storage=None`` selects every node. Raises ``TypeError`` only for a node whose metadata or
    labels are not mappings (a Node from the API always has them right).
    """
    labels, node_name = _node_identity(node)
    if storage is None:
        return NodeVerdict(True, "no nodeSelector or nodeAffinity: every node")
    selector = storage.get("nodeSelector")
    has_selector = selector is not None and selector != {}
    if has_selector:
        selector_failure = _node_selector_failure(selector, labels)
        if selector_failure:
            return NodeVerdict(False, selector_failure)
    matched_selector = "nodeSelector matches" if has_selector else ""

    affinity = storage.get("nodeAffinity")
    if affinity is None:
        required = None
    elif not isinstance(affinity, Mapping):
        return NodeVerdict(False, f"nodeAffinity: invalid: must be an object, got {affinity!r}")
    else:
        required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        if has_selector:
            return NodeVerdict(True, matched_selector)
        return NodeVerdict(True, "no nodeSelector or nodeAffinity: every node")
    if not isinstance(required, Mapping):
        return NodeVerdict(False, f"nodeAffinity: invalid: required affinity must be an object, got {required!r}")
    terms = required.get("nodeSelectorTerms")
    if terms is None:
        terms = []
    if not isinstance(terms, list):
        return NodeVerdict(False, f"nodeAffinity: invalid: nodeSelectorTerms must be a list, got {terms!r}")
    if not terms:
        return NodeVerdict(False, "nodeAffinity: no nodeSelectorTerms, which matches no node")

    failures: list[tuple[int, _Failure]] = []
    for index, term in enumerate(terms):
        failure = _term_failure(term, labels, node_name)
        if failure is None:
            prefix = f"{matched_selector} and " if matched_selector else ""
            return NodeVerdict(True, f"{prefix}nodeAffinity term {index} matches", term=index)
        failures.append((index, failure))
    first_index, first = failures[0]
    if len(failures) == 1:
        reason = f"nodeAffinity {first.place(first_index)}: {first.message}"
    else:
        parts = "; ".join(f"{f.place(i)}: {f.message}" for i, f in failures)
        reason = f"nodeAffinity: no term matches ({parts})"
    return NodeVerdict(False, reason, term=first_index, expression=first.index)
