"""Validating custom resources against their CRD's ``openAPIV3Schema`` the way the API server's strict field
validation does: unknown fields are errors (not pruned) wherever the schema lists the properties and does not say
``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of one OpenAPI v3 schema node (and, recursively, of the schema nodes in it) made strict."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    if isinstance(out.get("not"), dict):
        out["not"] = _strict(out["not"])
    pattern = out.get("pattern")
    if isinstance(pattern, str) and pattern.startswith("^(?i)"):
        out["pattern"] = "(?i)^" + pattern[5:]  # Go's RE2 takes inline flags anywhere; Python's only first
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


class CRDSchemas:
    """The served versions' schemas of some CRDs, by (apiVersion, kind)."""

    def __init__(self, crds: Iterable[dict[str, Any]]) -> None:
        self._validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
        for crd in crds:
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
                cls.check_schema(schema)
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                self._validators[key] = cls(schema)

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> CRDSchemas:
        docs: list[dict[str, Any]] = []
        for path in paths:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
        return cls(docs)

    def kinds(self) -> set[tuple[str, str]]:
        return set(self._validators)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """What is wrong with ``obj`` (empty: valid). KeyError when no CRD here defines its kind."""
        validator = self._validators[(obj["apiVersion"], obj["kind"])]
        return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
