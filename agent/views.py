"""Read-only views for people: ``modelherd explain`` (one node's decisions) and ``modelherd status`` (the
cluster, from the per-node ConfigMaps and the Leases). Each makes a handful of list/get requests; nothing is
written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..storage import fsdetect
from ..storage.errors import ModelherdError
from .kubeapi import ApiError, request
from .models import GROUP, OPEN, PLURALS, VERSION, ModelRef, SpecPolicy, model_spec
from .reporting.configmap import STATUS_LABEL
from .reporting.entry import parse_entry
from .reporting.keys import parse_configmap_key
from .watching.selection import evaluate


def _items(api: Any, path: str, **query: str) -> list[dict[str, Any]]:
    try:
        items: list[dict[str, Any]] = request(api, "GET", path, query=list(query.items())).get("items") or []
        return items
    except ApiError as e:
        if e.status == 404:
            return []
        raise


def _models(api: Any) -> list[tuple[ModelRef, dict[str, Any]]]:
    out: list[tuple[ModelRef, dict[str, Any]]] = []
    for kind, plural in PLURALS.items():
        for obj in _items(api, f"/apis/{GROUP}/{VERSION}/{plural}"):
            obj = {**obj, "kind": kind}
            out.append((ModelRef.of(obj), obj))
    return sorted(out, key=lambda t: t[0])


def _storage_mode(models_root: Path, mode: str) -> str:
    if mode != "auto":
        return mode
    if not models_root.is_dir():
        return "unknown (the models root is not on this machine)"
    try:
        return fsdetect.resolve_storage_mode("auto", fsdetect.detect_filesystem(models_root))
    except (OSError, ModelherdError) as e:
        return f"unknown ({e})"


def explain(api: Any, *, node_name: str, namespace: str, models_root: Path, storage_mode: str,
            policy: SpecPolicy = OPEN) -> list[dict[str, Any]]:
    """One row per BaseModel/ClusterBaseModel: selected here or why not, destination, storage mode, status."""
    root = Path(os.path.realpath(models_root.expanduser()))
    try:
        node: Mapping[str, Any] = request(api, "GET", f"/api/v1/nodes/{node_name}")
        node_found = True
    except ApiError as e:
        if e.status != 404:
            raise
        node, node_found = {"metadata": {"name": node_name}}, False
    try:
        cm = request(api, "GET", f"/api/v1/namespaces/{namespace}/configmaps/{node_name}")
    except ApiError as e:
        if e.status != 404:
            raise
        cm = {}
    data = cm.get("data") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    mode = _storage_mode(root, storage_mode)
    rows = []
    for ref, obj in _models(api):
        spec = model_spec(obj, root, policy)
        sel = evaluate(spec.storage, node)
        entry = parse_entry(data.get(ref.cm_key, "")) or {}
        rows.append({
            "kind": ref.kind, "namespace": ref.namespace, "name": ref.name, "node": node_name,
            "nodeFound": node_found, "selected": sel.selected, "reason": sel.reason,
            "term": sel.term, "expression": sel.expression,
            "storageUri": spec.storage_uri, "dest": str(spec.dest) if spec.dest else None,
            "problem": spec.problem or None, "storageMode": mode,
            "status": entry.get("status"), "label": labels.get(ref.label_key),
            "labelKey": ref.label_key, "configMapKey": ref.cm_key,
            "message": (entry.get("modelherd") or {}).get("message") if isinstance(entry.get("modelherd"), dict)
            else None,
        })
    return rows


def format_explain(rows: list[dict[str, Any]], node: str) -> str:
    if not rows:
        return f"no BaseModel or ClusterBaseModel in the cluster (node {node})"
    lines = []
    for r in rows:
        what = f"{r['kind']} {r['namespace'] + '/' if r['namespace'] else ''}{r['name']}"
        verdict = "selected" if r["selected"] else "NOT selected"
        lines.append(f"{what}: {verdict} on {node}: {r['reason']}")
        lines.append(f"  source {r['storageUri'] or '-'} -> {r['dest'] or '-'} ({r['storageMode']} storage)")
        if r["problem"]:
            lines.append(f"  problem: {r['problem']}")
        lines.append(f"  status here: {r['status'] or '-'} (label {r['labelKey']}={r['label'] or '-'})"
                     + (f": {r['message']}" if r.get("message") else ""))
    return "\n".join(lines)


def cluster_status(api: Any, *, namespace: str) -> list[dict[str, Any]]:
    """One row per model found in any node's ConfigMap: nodes per state, plus its Lease (holder, progress)."""
    from ..coordination.identity import MANAGED_BY, MANAGED_BY_LABEL
    from ..coordination.kube import record_from_raw
    from ..coordination.views import view_of

    models: dict[tuple[str, str, str], dict[str, Any]] = {}
    for cm in _items(api, f"/api/v1/namespaces/{namespace}/configmaps", labelSelector=f"{STATUS_LABEL}=true"):
        node = str((cm.get("metadata") or {}).get("name") or "")
        for key, value in (cm.get("data") or {}).items():
            parsed = parse_configmap_key(key)
            entry = parse_entry(value) if isinstance(value, str) else None
            if parsed is None or entry is None:
                continue
            kind, ns, name = parsed
            row = models.setdefault(parsed, {"kind": kind, "namespace": ns, "name": name, "Ready": [],
                                             "Updating": [], "Failed": [], "storageUri": "", "path": "",
                                             "lease": None})
            status = str(entry.get("status") or "")
            if status in ("Ready", "Updating", "Failed"):
                row[status].append(node)
            mine = entry.get("modelherd")
            ours: dict[str, Any] = mine if isinstance(mine, dict) else {}
            row["storageUri"] = row["storageUri"] or str(ours.get("storageUri") or "")
            row["path"] = row["path"] or str(ours.get("path") or "")
    try:
        raw = _items(api, f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases",
                     labelSelector=f"{MANAGED_BY_LABEL}={MANAGED_BY}")
        leases = [view_of(record_from_raw(it)) for it in raw]
    except (ApiError, ModelherdError):
        leases = []
    for row in models.values():
        for lease in leases:
            if row["path"] and row["path"].rstrip("/").endswith("/" + lease.dest.strip("/")) and \
                    row["storageUri"].split("@")[0].rstrip("/") == lease.source.split("@")[0].rstrip("/"):
                row["lease"] = {"name": lease.name, "holder": lease.holder, "phase": lease.phase,
                                "bytesDone": lease.bytes_done, "bytesTotal": lease.bytes_total,
                                "transitions": lease.transitions, "updated": lease.updated,
                                "filesystem": lease.filesystem}
        for s in ("Ready", "Updating", "Failed"):
            row[s].sort()
    return [models[k] for k in sorted(models)]


def format_status(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no model status reported by any node"
    header = ("MODEL", "READY", "UPDATING", "FAILED", "LEASE HOLDER", "PROGRESS")
    table = [header]
    for r in rows:
        what = f"{'cbm' if r['kind'] == 'ClusterBaseModel' else 'bm'}/" + \
            (f"{r['namespace']}/" if r["namespace"] else "") + r["name"]
        lease = r["lease"] or {}
        total = int(lease.get("bytesTotal") or 0)
        progress = f"{100 * int(lease.get('bytesDone') or 0) / total:.0f}% ({lease.get('phase')})" if total else "-"
        table.append((what, ",".join(r["Ready"]) or "-", ",".join(r["Updating"]) or "-",
                      ",".join(r["Failed"]) or "-", lease.get("holder") or "-", progress))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)
