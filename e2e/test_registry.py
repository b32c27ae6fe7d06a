"""ClusterBaseModels from an OCI registry on real nodes: the cluster's registry (Debian's ``docker-registry`` on the
host's 127.0.0.1, relayed to every node's loopback on the same port by ``e2e/cluster/up``), artifacts pushed with the
real ``oras`` CLI, shared storage (sshfs), the chart installed with helm.

Origin traffic is read from the registry's access log (``REGISTRY_LOG``, one combined-format line per request): every
blob GET the nodes made, with its status and the bytes sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent.ome.keys import configmap_key, node_label_key
from modelherd.storage.verify import verify_deep

from e2e.conftest import ROOT, Cluster, wait_for
from tests.modelgen import make_sharded_model

KiB, MiB = 1024, 1024 * 1024
MODELPACK = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
RAW_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
RAW_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
VALUES: dict[str, Any] = {"agent": {"extraArgs": ["--startup-jitter", "1"]}}
# 127.0.0.1 - - [07/Dec/2026:18:55:23 +0000] "GET /v2/org/m/blobs/sha256:<hex> HTTP/1.1" 200 3000 "" "ua"
BLOB_GET = re.compile(r'"GET /v2/(?P<repo>[^ ]+)/blobs/(?P<digest>sha256:[0-9a-f]{64}) HTTP/[0-9.]+" '
                      r'(?P<status>\d{3}) (?P<bytes>\d+)')


class Registry:
    """The cluster's registry, as the host sees it (``REGISTRY``: 127.0.0.1:PORT); pushes with the real ``oras``."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.host = cluster.env["REGISTRY"]
        self.log = Path(cluster.env["REGISTRY_LOG"])
        self.tmp = tmp
        out = subprocess.run(["bash", str(ROOT / "scripts" / "oras.sh")], check=True, capture_output=True, text=True,
                             timeout=900)
        self.oras_bin = out.stdout.strip().splitlines()[-1]

    def oras(self, *args: str, cwd: Path | None = None) -> str:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.tmp), "DOCKER_CONFIG": str(self.tmp)}
        done = subprocess.run([self.oras_bin, *args, "--plain-http"], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"oras {args[0]} failed: {done.stderr[-2000:]}"
        return done.stdout

    def push_blob(self, repo: str, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.tmp / f"blob-{digest[7:23]}"
        path.write_bytes(data)
        self.oras("blob", "push", f"{self.host}/{repo}", str(path))
        return {"digest": digest, "size": len(data)}

    def push_manifest(self, ref: str, manifest: dict[str, Any]) -> str:
        data = json.dumps(manifest).encode()
        path = self.tmp / f"manifest-{uuid.uuid4().hex[:8]}.json"
        path.write_bytes(data)
        self.oras("manifest", "push", f"{self.host}/{ref}", str(path), "--media-type", manifest["mediaType"])
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def log_offset(self) -> int:
        return self.log.stat().st_size

    def blob_gets(self, since: int) -> list[tuple[str, str, int, int]]:
        """(repo, digest, status, bytes sent) of every blob GET logged after byte ``since`` of the log."""
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [(m["repo"], m["digest"], int(m["status"]), int(m["bytes"])) for m in BLOB_GET.finditer(text)]


def push_modelpack(reg: Registry, tmp: Path, ref: str) -> dict[str, bytes]:
    """A ModelPack artifact (``oras push --artifact-type``): one raw layer per file, its path in
    ``org.cncf.model.filepath``; the files by path."""
    folder = tmp / "modelpack"
    make_sharded_model(folder, n_shards=4, shard_bytes=1 * MiB, seed=7)
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    (tmp / "mp-config.json").write_text(json.dumps({"descriptor": {"name": "e2e"}}))
    (tmp / "mp-annotations.json").write_text(json.dumps({n: {"org.cncf.model.filepath": n} for n in files}))
    layers = [f"{n}:{RAW_WEIGHT if n.endswith('.safetensors') else RAW_CONFIG}" for n in files]
    reg.oras("push", f"{reg.host}/{ref}", *layers, "--artifact-type", MODELPACK,
             "--config", f"{tmp / 'mp-config.json'}:{MODELPACK_CONFIG}",
             "--annotation-file", str(tmp / "mp-annotations.json"), cwd=folder)
    return files


def push_modelcar(reg: Registry, tmp: Path, ref: str) -> dict[str, bytes]:
    """A modelcar image: a base layer with a shell and ``/models``, a gzip layer adding to it; only ``/models`` is the
    model. The files by path under ``/models``."""
    (shard,) = make_sharded_model(tmp / "modelcar", n_shards=1, shard_bytes=2 * MiB, with_index=False, config=False,
                                  tokenizer=False, seed=8)
    weights = shard.read_bytes()
    files = {"model.safetensors": weights, "config.json": b'{"model_type": "llama"}',
             "tokenizer/tokenizer.json": b'{"version": "1.0"}'}
    base = _tar([("bin/sh", b"#!"), ("etc/passwd", b"root:x:0:0"), ("models/model.safetensors", weights)])
    top = _tar([("models/config.json", files["config.json"]),
                ("models/tokenizer/tokenizer.json", files["tokenizer/tokenizer.json"])], gz=True)
    repo = ref.split(":")[0]
    config = reg.push_blob(repo, json.dumps({"architecture": "amd64", "os": "linux",
                                             "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **reg.push_blob(repo, base)},
              {"mediaType": TAR_GZIP, **reg.push_blob(repo, top)}]
    reg.push_manifest(ref, {"schemaVersion": 2, "mediaType": IMAGE_MANIFEST,
                            "config": {"mediaType": IMAGE_CONFIG, **config}, "layers": layers})
    return files


def _tar(entries: list[tuple[str, bytes]], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _manifest_layers(reg: Registry, ref: str) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = json.loads(reg.oras("manifest", "fetch", f"{reg.host}/{ref}"))["layers"]
    return layers


def _entries(cluster: Cluster, release: str, nodes: list[str], names: dict[str, str]) -> dict[str, Any]:
    """node -> model -> (status, the agent's message) from the nodes' ConfigMaps: why a model is not Ready."""
    out: dict[str, Any] = {}
    for n in nodes:
        cm = cluster.core.read_namespaced_config_map(n, release).data or {}
        for kind, name in names.items():
            entry = json.loads(cm.get(configmap_key("ClusterBaseModel", "", name), "{}"))
            out.setdefault(n, {})[kind] = (entry.get("status"), (entry.get("modelherd") or {}).get("message"))
    return out


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[str]:
    if cluster.env.get("STORAGE") != "shared":
        pytest.skip("needs a cluster with --storage shared")
    if not cluster.env.get("REGISTRY"):
        pytest.skip("this cluster has no registry (REGISTRY in DIR/env: e2e/cluster/up starts one)")
    ns = f"mh-reg-{uuid.uuid4().hex[:6]}"
    # the registry is on every node's loopback: a CR's model reaches it only because the operator lists it
    cluster.install(ns, cluster.chart_values(**VALUES, storage={"registry": {"insecure": [cluster.env["REGISTRY"]]}}))
    yield ns
    cluster.uninstall(ns)
    cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_cluster_base_models_from_the_registry_are_ready_on_every_node_after_one_download(
        cluster: Cluster, release: str, tmp_path: Path) -> None:
    nodes = cluster.nodes()
    assert len(nodes) >= 3
    reg = Registry(cluster, tmp_path)
    tag = uuid.uuid4().hex[:6]
    refs = {"modelpack": f"org/model-{tag}:v1", "modelcar": f"org/car-{tag}:v1"}
    want = {"modelpack": push_modelpack(reg, tmp_path, refs["modelpack"]),
            "modelcar": push_modelcar(reg, tmp_path, refs["modelcar"])}
    layers = {kind: _manifest_layers(reg, ref) for kind, ref in refs.items()}
    names = {kind: f"reg-{kind}-{tag}" for kind in refs}
    labels = {kind: node_label_key("ClusterBaseModel", "", n) for kind, n in names.items()}
    since = reg.log_offset()
    try:
        for kind, ref in refs.items():
            cluster.create_cbm(names[kind], f"oci://{reg.host}/{ref}")
        try:
            wait_for(lambda: all(cluster.node_labels(n).get(lb) == "Ready" for n in nodes for lb in labels.values()),
                     90, f"{sorted(labels.values())}=Ready on {nodes}")
        except AssertionError as e:
            raise AssertionError(f"{e}; the nodes' entries: {_entries(cluster, release, nodes, names)}") from None
        def entries_ready() -> bool:  # the label is written first, the entry right after (OME's order)
            return all(status == "Ready" for by_kind in _entries(cluster, release, nodes, names).values()
                       for status, _ in by_kind.values())
        wait_for(entries_ready, 30, "every node's entries Ready")
        for n in nodes:
            cm = cluster.core.read_namespaced_config_map(n, release).data or {}
            for name in names.values():
                entry = json.loads(cm[configmap_key("ClusterBaseModel", "", name)])
                assert entry["status"] == "Ready", (n, entry)

        # one download: every layer's blob sent once, whole, and nothing else (no image config, no second node)
        gets = reg.blob_gets(since)
        for kind, ref in refs.items():
            repo = ref.split(":")[0]
            got = sorted((d, status, sent) for r, d, status, sent in gets if r == repo)
            assert got == sorted((la["digest"], 200, la["size"]) for la in layers[kind]), (kind, got)
        print(f"\nregistry: {len(gets)} blob GETs, {sum(g[3] for g in gets)} bytes for "
              f"{sum(la['size'] for ls in layers.values() for la in ls)} bytes of layers, {len(nodes)} nodes Ready")

        # the files on the shared export are the pushed ones, with a manifest that verifies
        export = Path(cluster.env["SHARED_EXPORT"])
        for kind, ref in refs.items():
            dest = export / ref.split(":")[0]
            on_disk = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
            assert set(want[kind]) <= on_disk, (kind, sorted(on_disk))
            for path, data in want[kind].items():
                assert (dest / path).read_bytes() == data, (kind, path)
            assert verify_deep(dest, require_manifest=True) == [], kind
        assert not (export / refs["modelcar"].split(":")[0] / "etc").exists(), "only /models of a modelcar"
    finally:
        for name in names.values():
            cluster.delete_cbm(name)
        wait_for(lambda: all(cluster.node_labels(n).get(lb) is None for n in nodes for lb in labels.values()), 60,
                 "the models' labels gone from every node")
