"""Tar layers from a real registry (Debian's docker-registry, pushed with the real ``oras`` CLI): modelcar images
(tar, tar+gzip, tar+zstd layers; only ``/models`` taken; whiteouts across layers), ModelPack tar layers, oras
folders; pulled through the engine and ``modelherd pull``; hostile layers (each a typed error, nothing written
outside staging, nothing published); repair of a damaged extracted file fetching only its layer."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from modelherd.storage import engine, tarlayer
from modelherd.storage.errors import UnsafeArchiveError, UnsafePathError
from modelherd.storage.manifest import read_manifest
from modelherd.storage.options import EngineOptions
from modelherd.storage.paths import STAGING_DIRNAME
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.sources.registry import RegistrySource
from modelherd.storage.types import RemoteFile
from modelherd.storage.uri import parse_uri
from modelherd.storage.verify import verify_quick

from tests.registry_fixtures import Registry

pytestmark = [pytest.mark.multiprocess]

FAST = RetryPolicy(retries=2, backoff_s=0.01, backoff_max_s=0.05)
SMALL = EngineOptions(retry=FAST, multipart_threshold=4096, part_size=1024, chunk_size=512, fsync=False)
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
MODELPACK = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"

Entry = tuple[str, bytes] | tarfile.TarInfo


def tar_bytes(entries: list[Entry], compress: str = "") -> bytes:
    """A tar of ``entries`` (name and bytes for a regular file, or a ready TarInfo with no data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tf.addfile(info, io.BytesIO(e[1]))
    raw = buf.getvalue()
    if compress == "gzip":
        return gzip.compress(raw)
    if compress == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def info(name: str, kind: bytes, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.size = kind, linkname, size
    return ti


def push_blob(reg: Registry, tmp: Path, repo: str, data: bytes) -> dict[str, Any]:
    path = tmp / f"blob-{hashlib.sha256(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return {"digest": reg.push_blob(repo, path), "size": len(data)}


def push_image(reg: Registry, tmp: Path, ref: str, layers: list[bytes], media: list[str] | None = None) -> str:
    """A modelcar image: an image config and one image layer per tar; the manifest digest."""
    repo = ref.split(":")[0]
    config = push_blob(reg, tmp, repo, json.dumps({"architecture": "amd64", "os": "linux",
                                                   "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    media = media or [LAYER] * len(layers)
    descs = [{"mediaType": m, **push_blob(reg, tmp, repo, data)} for m, data in zip(media, layers, strict=True)]
    return reg.push_manifest(ref, {"schemaVersion": 2, "mediaType": IMAGE_MANIFEST,
                                   "config": {"mediaType": IMAGE_CONFIG, **config}, "layers": descs}, tmp)


def source(reg: Registry, ref: str) -> RegistrySource:
    return RegistrySource(parse_uri(f"oci://{reg.host}/{ref}"), retry=FAST)


def pull(src: Any, root: Path, options: EngineOptions = SMALL) -> Any:
    return engine.pull(src, root / "model", models_root=root, writer="test", options=options)


def assert_published(root: Path, files: dict[str, bytes]) -> None:
    dest = root / "model"
    manifest = read_manifest(dest)
    assert manifest is not None
    assert {f.path: f.checksums["sha256"] for f in manifest.files} == \
        {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert verify_quick(dest, require_manifest=True) == []
    assert not any(".modelherd-layers" in p.name for p in dest.rglob("*"))


def assert_nothing_published(root: Path, tmp_path: Path, before: set[Path]) -> None:
    assert not (root / "model").exists()
    stray = [p for p in root.rglob("*") if p.is_file() and STAGING_DIRNAME not in p.relative_to(root).parts]
    assert stray == []
    outside = {p for p in tmp_path.rglob("*") if "registry" not in p.relative_to(tmp_path).parts
               and root not in p.parents and p != root}
    assert outside - before == set()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "models"
    r.mkdir()
    return r


class CountingSource:
    """A RegistrySource that records which blobs were opened."""

    def __init__(self, inner: RegistrySource) -> None:
        self.inner, self.uri, self.opened = inner, inner.uri, set()

    def list_files(self) -> Any:
        return self.inner.list_files()

    def open(self, file: RemoteFile, start: int = 0, end: int | None = None) -> Any:
        self.opened.add(file.locator)
        return self.inner.open(file, start, end)

    def close(self) -> None:
        self.inner.close()


# -- modelcar images, ModelPack tar layers, oras folders --------------------------------------------------------


@pytest.mark.parametrize("compress", ["", "gzip", "zstd"])
def test_a_modelcar_image_takes_only_models_and_applies_whiteouts(registry, tmp_path, root, compress):
    weights = os.urandom(20_000)
    base = tar_bytes([("bin/sh", b"#!"), ("etc/passwd", b"root:x:0:0"), info("models", tarfile.DIRTYPE),
                      ("models/model.bin", weights), ("models/old.bin", b"stale"),
                      ("models/sub/a.txt", b"a"), ("models/sub/b.txt", b"b"), ("models/gone/x", b"x")], compress)
    top = tar_bytes([("models/.wh.old.bin", b""), ("models/sub/.wh..wh..opq", b""), ("models/sub/c.txt", b"c"),
                     ("models/.wh.gone", b""), ("models/config.json", b"{}"),
                     info("models/link.bin", tarfile.SYMTYPE, "model.bin"),
                     info("models/hard.json", tarfile.LNKTYPE, "models/config.json")], compress)
    media = [LAYER + ("+" + compress if compress else "")] * 2
    digest = push_image(registry, tmp_path, "org/car:v1", [base, top], media)
    manifest = pull(source(registry, "org/car:v1"), root)
    assert manifest.revision == digest and len(manifest.archives) == 2
    assert_published(root, {"model.bin": weights, "sub/c.txt": b"c", "config.json": b"{}",
                             "link.bin": weights, "hard.json": b"{}"})
    assert not (root / "model" / "etc").exists() and not (root / "model" / "bin").exists()
    assert pull(source(registry, "org/car:v1"), root).completed_at == manifest.completed_at  # the fast path


def test_a_modelpack_tar_layer_beside_a_raw_layer(registry, tmp_path, root):
    weights = os.urandom(9000)
    repo = "org/mp"
    tar = push_blob(registry, tmp_path, repo, tar_bytes([("shards/w1.bin", weights), ("shards/w2.bin", b"2")]))
    raw = push_blob(registry, tmp_path, repo, b'{"a": 1}')
    config = push_blob(registry, tmp_path, repo, b"{}")
    registry.push_manifest(f"{repo}:v1", {
        "schemaVersion": 2, "mediaType": IMAGE_MANIFEST, "artifactType": MODELPACK,
        "config": {"mediaType": MODELPACK_CONFIG, **config},
        "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.tar", **tar,
                    "annotations": {"org.cncf.model.filepath": "shards"}},
                   {"mediaType": "application/vnd.cncf.model.config.v1.raw", **raw,
                    "annotations": {"org.cncf.model.filepath": "config.json"}}]}, tmp_path)
    pull(source(registry, f"{repo}:v1"), root)
    assert_published(root, {"shards/w1.bin": weights, "shards/w2.bin": b"2", "config.json": b'{"a": 1}'})


def test_modelherd_pull_of_a_modelcar_image(registry, tmp_path, root):
    weights = os.urandom(5000)
    push_image(registry, tmp_path, "org/car:v1", [tar_bytes([("models/w.bin", weights)], "gzip")],
               [LAYER + "+gzip"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    done = subprocess.run([sys.executable, "-m", "modelherd.agent.cli", "pull", f"oci://{registry.host}/org/car:v1",
                           "--models-root", str(root), "--dest", str(root / "model"), "--no-progress"],
                          env=env, text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_published(root, {"w.bin": weights})


# -- repair --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_extracted_file_refetches_only_its_layer(registry, tmp_path, root, damage):
    a, b = os.urandom(7000), os.urandom(8000)
    push_image(registry, tmp_path, "org/car:v1", [tar_bytes([("models/a.bin", a)]),
                                                   tar_bytes([("models/b.bin", b), ("models/c.txt", b"c")])])
    first = pull(source(registry, "org/car:v1"), root)
    owner = next(f.archive for f in first.files if f.path == "b.bin")
    target = root / "model" / "b.bin"
    if damage == "truncate":
        target.write_bytes(b[:100])
    else:
        target.unlink()
    counting = CountingSource(source(registry, "org/car:v1"))
    pull(counting, root)
    assert counting.opened == {owner}
    assert_published(root, {"a.bin": a, "b.bin": b, "c.txt": b"c"})


# -- hostile layers ------------------------------------------------------------------------------------------------


HOSTILE: dict[str, list[Entry]] = {
    "dotdot": [("models/../../escape.txt", b"x")],
    "absolute": [("/models/abs.txt", b"x")],
    "symlink-out": [info("models/evil", tarfile.SYMTYPE, "/etc"), ("models/evil/passwd", b"x")],
    "symlink-up": [info("models/evil", tarfile.SYMTYPE, "../../.."), ("models/evil/escape.txt", b"x")],
    "hardlink-passwd": [info("models/passwd", tarfile.LNKTYPE, "/etc/passwd")],
    "hardlink-out": [info("models/passwd", tarfile.LNKTYPE, "etc/passwd")],
    "device": [info("models/null", tarfile.CHRTYPE)],
    "fifo": [info("models/pipe", tarfile.FIFOTYPE)],
    "huge": [info("models/huge.bin", tarfile.REGTYPE, size=10**15)],
    "reserved": [("models/.modelherd-manifest.json", b"{}")],
    "models-symlink": [info("models", tarfile.SYMTYPE, "/etc")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_modelcar_layer_is_refused(registry, tmp_path, root, case):
    push_image(registry, tmp_path, "org/evil:v1", [tar_bytes([("models/ok.bin", b"ok"), *HOSTILE[case]])])
    before = {p for p in tmp_path.rglob("*") if "registry" not in p.relative_to(tmp_path).parts
              and root not in p.parents and p != root}
    with pytest.raises(UnsafePathError) as got:
        pull(source(registry, "org/evil:v1"), root)
    assert isinstance(got.value, UnsafeArchiveError) or case == "dotdot"
    assert_nothing_published(root, tmp_path, before)
    assert not list((root / STAGING_DIRNAME).glob("*/*")) if (root / STAGING_DIRNAME).exists() else True


def test_too_many_files_or_entries_are_refused(registry, tmp_path, root, monkeypatch):
    push_image(registry, tmp_path, "org/many:v1", [tar_bytes([(f"models/f{i}", b"x") for i in range(20)])])
    with pytest.raises(UnsafeArchiveError, match="more than 10 files"):
        pull(source(registry, "org/many:v1"), root, EngineOptions(retry=FAST, fsync=False, max_files=10))
    monkeypatch.setattr(tarlayer, "MAX_ENTRIES", 15)
    with pytest.raises(UnsafeArchiveError, match="more than 15 tar entries"):
        pull(source(registry, "org/many:v1"), root)
    assert not (root / "model").exists()
