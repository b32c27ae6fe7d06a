"""RegistrySource against a real registry (Debian's docker-registry, i.e. CNCF distribution) on loopback, artifacts
pushed with the real ``oras`` CLI: ORAS file artifacts and ModelPack manifests, anonymous, basic and token auth, a
tag resolved once, registries that ignore Range or redirect to blob storage, and hostile registries (each a typed
error, nothing published, nothing written outside the models root's staging)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from modelherd.storage import engine
from modelherd.storage.errors import (
    AuthError,
    MalformedListingError,
    SourceError,
    SourceNotFoundError,
    UnsafePathError,
    VerificationError,
)
from modelherd.storage.manifest import read_manifest
from modelherd.storage.options import EngineOptions
from modelherd.storage.paths import STAGING_DIRNAME
from modelherd.storage.retry import RetryPolicy
from modelherd.storage.sources import open_source
from modelherd.storage.sources.registry import RegistrySource
from modelherd.storage.uri import parse_uri

from tests.registry_fixtures import Registry, RegistryProxy
from tests.support import read_all

pytestmark = [pytest.mark.multiprocess]

FAST = RetryPolicy(retries=2, backoff_s=0.01, backoff_max_s=0.05)
SMALL = EngineOptions(retry=FAST, multipart_threshold=4096, part_size=1024, chunk_size=512, fsync=False)
MODELPACK = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
RAW_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"


def write_files(folder: Path, files: dict[str, bytes]) -> list[str]:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return list(files)


def model_files() -> dict[str, bytes]:
    return {"model.safetensors": os.urandom(10_000), "config.json": b'{"model_type": "llama"}',
            "tokenizer/tokenizer.json": b"{}" * 300}


def source(reg: Registry | RegistryProxy, ref: str, **kw: Any) -> RegistrySource:
    return RegistrySource(parse_uri(f"oci://{reg.host}/{ref}"), retry=FAST, **kw)


def pull(src: RegistrySource, root: Path, **kw: Any) -> Any:
    return engine.pull(src, root / "model", models_root=root, writer="test", options=SMALL, **kw)


def assert_published(root: Path, files: dict[str, bytes]) -> None:
    dest = root / "model"
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    manifest = read_manifest(dest)
    assert manifest is not None
    assert {f.path: f.checksums["sha256"] for f in manifest.files} == \
        {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}


def assert_nothing_published(root: Path) -> None:
    """No destination, and nothing under the models root but (an empty) staging."""
    assert not (root / "model").exists()
    stray = [p for p in root.rglob("*") if p.is_file() and STAGING_DIRNAME not in p.relative_to(root).parts]
    assert stray == []


def docker_config(reg: Registry, user: str, password: str | None = None) -> dict[str, Any]:
    pw = reg.users[user] if password is None else password
    return {"auths": {f"http://{reg.host}": {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}}}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "models"
    r.mkdir()
    return r


# -- ORAS and ModelPack artifacts, anonymous ----------------------------------------------------------------------


def test_oras_file_artifact_is_pulled_byte_exact_with_the_manifest_digest_as_revision(registry, tmp_path, root):
    files = model_files()
    digest = registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files))
    src = source(registry, "org/model:v1")
    listing = src.list_files()
    assert listing.revision == digest and listing.uri == f"oci://{registry.host}/org/model:v1"
    assert {f.path: f.size for f in listing.files} == {n: len(d) for n, d in files.items()}
    assert all(f.locator == "sha256:" + f.checksums["sha256"] for f in listing.files)
    manifest = pull(src, root)
    assert manifest.revision == digest
    assert_published(root, files)
    again = pull(source(registry, "org/model:v1"), root)  # complete: the fast path, nothing fetched
    assert again.revision == digest


def test_modelpack_manifest_takes_paths_from_the_filepath_annotation(registry, tmp_path, root):
    files = {"w.bin": os.urandom(5000), "cfg.json": b'{"a": 1}'}
    write_files(tmp_path, files)
    (tmp_path / "modelpack-config.json").write_text(json.dumps({"descriptor": {"name": "tiny"}}))
    (tmp_path / "annotations.json").write_text(json.dumps({
        "w.bin": {"org.cncf.model.filepath": "weights/model-00001.safetensors"},
        "cfg.json": {"org.cncf.model.filepath": "config.json"}}))
    digest = registry.push_files("org/mp:v1", tmp_path, [f"w.bin:{RAW_WEIGHT}",
                                                        "cfg.json:application/vnd.cncf.model.weight.config.v1.raw"],
                                 extra=("--artifact-type", MODELPACK, "--config",
                                        f"modelpack-config.json:{MODELPACK_CONFIG}",
                                        "--annotation-file", "annotations.json"))
    src = source(registry, "org/mp:v1")
    assert sorted(f.path for f in src.list_files().files) == ["config.json", "weights/model-00001.safetensors"]
    assert pull(src, root).revision == digest
    assert_published(root, {"weights/model-00001.safetensors": files["w.bin"], "config.json": files["cfg.json"]})


def test_a_tag_is_resolved_once_and_the_digest_is_the_revision(registry, tmp_path, root):
    first = model_files()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    digest = registry.push_files("org/model:v1", tmp_path / "a", write_files(tmp_path / "a", first))
    src = source(registry, "org/model:v1")
    listing = src.list_files()
    moved = registry.push_files("org/model:v1", tmp_path / "b", write_files(tmp_path / "b", model_files()))
    assert moved != digest
    manifest = pull(src, root, listing=listing)  # the tag moved between listing and download
    assert manifest.revision == digest
    assert_published(root, first)
    assert source(registry, "org/model:v1").list_files().revision == moved


def test_a_digest_reference_pins_the_manifest(registry, tmp_path, root):
    files = model_files()
    digest = registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files))
    src = open_source(parse_uri(f"oci://{registry.host}/org/model@{digest}"), retry=FAST)
    assert src.list_files().revision == digest
    with pytest.raises(SourceNotFoundError):
        source(registry, "org/model@sha256:" + "0" * 64).list_files()
    with pytest.raises(SourceNotFoundError):
        source(registry, "org/model:nope").list_files()


def test_a_folder_pushed_with_oras_is_unpacked(registry, tmp_path, root):
    files = {"dir/x.bin": os.urandom(3000), "dir/sub/y.txt": b"y" * 10}
    write_files(tmp_path, files)
    digest = registry.push_files("org/tar:v1", tmp_path, ["dir"])
    listing = source(registry, "org/tar:v1").list_files()
    assert len(listing.archives) == 1 and not listing.plain_files
    manifest = pull(source(registry, "org/tar:v1"), root)
    assert manifest.revision == digest and manifest.archives == (listing.archives[0].locator,)
    assert_published(root, files)


# -- auth -----------------------------------------------------------------------------------------------------------


def test_basic_auth_from_a_docker_config_file(basic_registry, tmp_path, root):
    files = model_files()
    basic_registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files), user="puller")
    with pytest.raises(AuthError) as denied:
        source(basic_registry, "org/model:v1").list_files()
    assert "basic" in str(denied.value)
    wrong = docker_config(basic_registry, "puller", "not-the-password")
    with pytest.raises(AuthError) as refused:
        source(basic_registry, "org/model:v1", auth=wrong).list_files()
    assert "not-the-password" not in str(refused.value)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(docker_config(basic_registry, "puller")))
    pull(source(basic_registry, "org/model:v1", auth=str(config)), root)
    assert_published(root, files)


def test_bearer_token_flow_asks_for_pull_only(token_registry, tmp_path, root):
    files = model_files()
    token_registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files), user="puller")
    issuer = token_registry.issuer
    assert issuer is not None
    with pytest.raises(AuthError):
        source(token_registry, "org/model:v1").list_files()  # anonymous tokens grant nothing
    issuer.requests.clear()
    src = source(token_registry, "org/model:v1", auth=docker_config(token_registry, "puller"))
    pull(src, root)
    assert_published(root, files)
    assert issuer.requests == [("puller", ["repository:org/model:pull"])]  # one token for the whole pull


@pytest.mark.slow
def test_an_expired_token_is_fetched_again_once_mid_pull(token_registry, tmp_path, root):
    files = model_files()
    token_registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files), user="puller")
    issuer = token_registry.issuer
    assert issuer is not None
    issuer.lifetime_s = 1.5  # the registry stops accepting each token 1.5 s after it is issued
    src = source(token_registry, "org/model:v1", auth=docker_config(token_registry, "puller"))
    listing = src.list_files()
    issued = issuer.issued
    time.sleep(2.5)
    issuer.lifetime_s = 300
    pull(src, root, listing=listing)
    assert_published(root, files)
    assert issuer.issued == issued + 1


@pytest.mark.slow
def test_a_token_that_cannot_be_renewed_is_an_auth_error_and_nothing_is_published(token_registry, tmp_path, root):
    files = model_files()
    token_registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files), user="puller")
    issuer = token_registry.issuer
    assert issuer is not None
    issuer.lifetime_s = 1.5
    src = source(token_registry, "org/model:v1", auth=docker_config(token_registry, "puller"))
    listing = src.list_files()
    time.sleep(2.5)
    issuer.refuse = True
    with pytest.raises(AuthError) as ei:
        pull(src, root, listing=listing)
    assert token_registry.users["puller"] not in str(ei.value)
    assert_nothing_published(root)


# -- transport: Range ignored, redirects ----------------------------------------------------------------------------


def test_a_registry_that_ignores_range_is_read_from_the_start(registry, tmp_path, root):
    files = model_files()
    registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files))
    with RegistryProxy(registry, "ignore-range") as proxy:
        src = source(proxy, "org/model:v1")
        big = next(f for f in src.list_files().files if f.path == "model.safetensors")
        assert read_all(src.open(big, 1234, 5678)) == files["model.safetensors"][1234:5678]
        pull(src, root)  # multipart (parts of 1 KiB): every part skips to its start
    assert_published(root, files)


def test_a_redirect_to_blob_storage_gets_no_registry_credentials(basic_registry, tmp_path, root):
    files = model_files()
    basic_registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files), user="puller")
    with RegistryProxy(basic_registry, "redirect") as proxy:
        src = RegistrySource(parse_uri(f"oci://{proxy.host}/org/model:v1"), retry=FAST,
                             auth={"auths": {proxy.host: docker_config(basic_registry, "puller")["auths"][
                                 f"http://{basic_registry.host}"]}})
        pull(src, root)
        assert proxy.blob_auth_seen and not any(proxy.blob_auth_seen)
    assert_published(root, files)


def test_a_redirect_loop_is_a_source_error(registry, tmp_path, root):
    registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, model_files()))
    with RegistryProxy(registry, "loop") as proxy, pytest.raises(SourceError, match="redirects"):
        pull(source(proxy, "org/model:v1"), root)
    assert_nothing_published(root)


# -- hostile registries ---------------------------------------------------------------------------------------------


def _hostile_manifest(reg: Registry, tmp_path: Path, ref: str, layers: list[dict[str, Any]]) -> None:
    config = tmp_path / "empty.json"
    config.write_bytes(b"{}")
    config_digest = reg.push_blob(ref.split(":")[0], config)
    reg.push_manifest(ref, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "artifactType": MODELPACK,
                            "config": {"mediaType": MODELPACK_CONFIG, "digest": config_digest, "size": 2},
                            "layers": layers}, tmp_path)


def _layer(digest: str, size: int, path: str) -> dict[str, Any]:
    return {"mediaType": RAW_WEIGHT, "digest": digest, "size": size,
            "annotations": {"org.cncf.model.filepath": path}}


def test_a_blob_whose_bytes_do_not_match_its_digest_is_refused(registry, tmp_path, root):
    files = model_files()
    digest = registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files))
    listing = source(registry, "org/model:v1").list_files()
    assert listing.revision == digest
    big = next(f for f in listing.files if f.path == "model.safetensors")
    registry.blob_path(big.locator).write_bytes(os.urandom(big.size))  # same size, other bytes
    with pytest.raises(VerificationError):
        pull(source(registry, "org/model:v1"), root)
    assert_nothing_published(root)


@pytest.mark.parametrize("claimed", [-1000, +1000])
def test_a_manifest_that_lies_about_a_layer_size_is_refused(registry, tmp_path, root, claimed):
    blob = tmp_path / "w.bin"
    blob.write_bytes(os.urandom(8000))
    digest = registry.push_blob("org/liar", blob)
    _hostile_manifest(registry, tmp_path, "org/liar:v1", [_layer(digest, 8000 + claimed, "w.bin")])
    with pytest.raises(VerificationError, match="the manifest says"):
        pull(source(registry, "org/liar:v1"), root)
    assert_nothing_published(root)


def test_a_petabyte_layer_is_refused_before_any_download(registry, tmp_path, root):
    blob = tmp_path / "w.bin"
    blob.write_bytes(b"tiny")
    digest = registry.push_blob("org/huge", blob)
    _hostile_manifest(registry, tmp_path, "org/huge:v1", [_layer(digest, 10**15, "w.bin")])
    with pytest.raises(MalformedListingError, match="1 TiB"):
        pull(source(registry, "org/huge:v1"), root)
    assert_nothing_published(root)


@pytest.mark.parametrize("name", ["../escape.bin", "/etc/passwd", "a/../../b", "sub/\nline"])
def test_a_path_annotation_that_escapes_the_model_folder_is_refused(registry, tmp_path, root, name):
    blob = tmp_path / "w.bin"
    blob.write_bytes(b"payload")
    digest = registry.push_blob("org/escape", blob)
    _hostile_manifest(registry, tmp_path, "org/escape:v1", [_layer(digest, 7, name)])
    with pytest.raises(UnsafePathError):
        pull(source(registry, "org/escape:v1"), root)
    assert_nothing_published(root)
    assert not (tmp_path / "escape.bin").exists() and not (root.parent / "b").exists()


# -- the CLI ------------------------------------------------------------------------------------------------------


def test_modelherd_pull_of_a_registry_artifact(registry, tmp_path, root):
    files = model_files()
    digest = registry.push_files("org/model:v1", tmp_path, write_files(tmp_path, files))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    done = subprocess.run([sys.executable, "-m", "modelherd.agent.cli", "pull", f"oci://{registry.host}/org/model:v1",
                           "--models-root", str(root), "--dest", str(root / "model"), "--no-progress"],
                          env=env, text=True, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_published(root, files)
    manifest = read_manifest(root / "model")
    assert manifest is not None and manifest.revision == digest
