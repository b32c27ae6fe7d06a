"""Read-only views for people: ``modelherd explain`` (one node's decisions) and ``modelherd status`` (the
cluster, from the per-node ConfigMaps and the Leases). Each makes a handful of list/get requests through the
process's one client (agent/kube/); nothing is written.

Invariant: a model's row shows the Lease of its download only when that Lease's identity is the model's, as
coordination writes it (:func:`coordination.coordinator.identity_for`): the same canonical source (revision
included) and the same destination, the Lease's root-relative folder being the trailing part of the absolute
path the node reported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from ..coordination.kubelease import list_leases
from ..coordination.leaseviews import LeaseView
from ..storage import fsdetect
from ..storage.errors import ModelherdError
from ..storage.uri import parse_uri
from .basemodels import GROUP, OPEN, PLURALS, VERSION, ModelRef, SpecPolicy, model_spec
from .kube import ApiError, KubeClient, request
from .kube.leases import KubeLeases
from .ome.entry import parse_entry
from .ome.keys import parse_configmap_key
from .ome.states import WRITTEN_STATUSES, ModelStatus
from .reporting.configmap import STATUS_LABEL
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


def same_download(lease: LeaseView, storage_uri: str, path: str) -> bool:
    """``lease`` is the Lease of pulling ``storage_uri`` (a CR's, as an entry records it) into ``path`` (the
    absolute folder a node reported): its source is that URI's canonical form, revision included, and its
    destination (relative to the models root, or absolute outside it) names that folder."""
    if not path or not lease.dest:
        return False
    try:
        canonical = parse_uri(storage_uri).canonical
    except (ModelherdError, ValueError):
        return False
    if lease.source != canonical:
        return False
    want, dest = PurePosixPath(path), PurePosixPath(lease.dest)
    if dest.is_absolute():
        return want == dest
    return len(want.parts) > len(dest.parts) and want.parts[-len(dest.parts):] == dest.parts


def cluster_status(api: KubeClient | Any, *, namespace: str) -> list[dict[str, Any]]:
    """One row per model found in any node's ConfigMap: nodes per state, plus its Lease (holder, progress)."""
    models: dict[tuple[str, str, str], dict[str, Any]] = {}
    for cm in _items(api, f"/api/v1/namespaces/{namespace}/configmaps", labelSelector=f"{STATUS_LABEL}=true"):
        node = str((cm.get("metadata") or {}).get("name") or "")
        for key, value in (cm.get("data") or {}).items():
            parsed = parse_configmap_key(key)
            entry = parse_entry(value) if isinstance(value, str) else None
            if parsed is None or entry is None:
                continue
            kind, ns, name = parsed
            row = models.setdefault(parsed, {"kind": kind, "namespace": ns, "name": name,
                                             **{s.value: [] for s in WRITTEN_STATUSES}, "storageUri": "", "path": "",
                                             "lease": None})
            status = str(entry.get("status") or "")
            if status in WRITTEN_STATUSES:
                row[status].append(node)
            mine = entry.get("modelherd")
            ours: dict[str, Any] = mine if isinstance(mine, dict) else {}
            row["storageUri"] = row["storageUri"] or str(ours.get("storageUri") or "")
            row["path"] = row["path"] or str(ours.get("path") or "")
    try:
        leases = list_leases(KubeLeases(api), namespace)
    except ModelherdError:
        leases = []
    for row in models.values():
        for lease in leases:
            if same_download(lease, row["storageUri"], row["path"]):
                row["lease"] = {"name": lease.name, "holder": lease.holder, "phase": lease.phase,
                                "bytesDone": lease.bytes_done, "bytesTotal": lease.bytes_total,
                                "transitions": lease.transitions, "updated": lease.updated,
                                "filesystem": lease.filesystem}
        for s in WRITTEN_STATUSES:
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
        table.append((what, ",".join(r[ModelStatus.READY]) or "-", ",".join(r[ModelStatus.UPDATING]) or "-",
                      ",".join(r[ModelStatus.FAILED]) or "-", lease.get("holder") or "-", progress))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)
