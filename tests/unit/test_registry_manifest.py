"""Manifests and indexes read as model files (storage/sources/registry_manifest.py): ModelPack and ORAS layers,
tar layers as archives to extract, sizes bounded, paths contained, an index resolved to its artifact."""

from __future__ import annotations

import json
from typing import Any

import pytest
from modelherd.storage.errors import MalformedListingError, SourceError, UnsafePathError
from modelherd.storage.sources.registry_manifest import (
    MAX_BLOB_SIZE,
    MODELPACK_ARTIFACT,
    UnsupportedArtifactError,
    files_of,
    parse_document,
    pick_from_index,
)
from modelherd.storage.types import Unpack

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
H = [f"{i:064x}" for i in range(1, 10)]


def layer(i: int, media_type: str = "application/vnd.oci.image.layer.v1.tar", size: int = 10,
          **annotations: str) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": f"sha256:{H[i]}", "size": size}
    if annotations:
        d["annotations"] = {k.replace("_", "."): v for k, v in annotations.items()}
    return d


def manifest(layers: list[dict[str, Any]], *, artifact_type: str | None = None,
             config_type: str = "application/vnd.oci.empty.v1+json") -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": config_type, "digest": f"sha256:{H[0]}", "size": 2},
                           "layers": layers}
    if artifact_type:
        doc["artifactType"] = artifact_type
    return json.dumps(doc).encode()


def files(raw: bytes) -> list[tuple[str, int, str, str]]:
    return [(f.path, f.size, f.checksums["sha256"], f.locator)
            for f in files_of(parse_document(raw, "", "t"), "t")]


TITLE = "org_opencontainers_image_title"
FILEPATH = "org_cncf_model_filepath"


def test_oras_file_artifact_one_file_per_layer_named_by_title() -> None:
    raw = manifest([layer(1, **{TITLE: "b/tok.json"}), layer(2, size=0, **{TITLE: "a.bin"})],
                   artifact_type="application/vnd.unknown.artifact.v1")
    assert files(raw) == [("a.bin", 0, H[2], f"sha256:{H[2]}"), ("b/tok.json", 10, H[1], f"sha256:{H[1]}")]


def test_modelpack_prefers_the_filepath_annotation() -> None:
    raw = manifest([layer(1, "application/vnd.cncf.model.weight.v1.raw", **{FILEPATH: "w/x.safetensors",
                                                                            TITLE: "x.safetensors"}),
                    layer(2, "application/vnd.cncf.model.doc.v1.raw", **{TITLE: "README.md"})],
                   artifact_type=MODELPACK_ARTIFACT)
    assert [f[0] for f in files(raw)] == ["README.md", "w/x.safetensors"]


@pytest.mark.parametrize(
    ("raw", "unpack"),
    [
        (manifest([layer(1, "application/vnd.cncf.model.weight.v1.tar", **{FILEPATH: "w"})],
                  artifact_type=MODELPACK_ARTIFACT), Unpack(0)),
        (manifest([layer(1, "application/vnd.cncf.model.weight.v1.tar+zstd", **{FILEPATH: "w"})],
                  artifact_type=MODELPACK_ARTIFACT), Unpack(0)),
        (manifest([layer(1, "application/vnd.oci.image.layer.v1.tar+gzip",
                         **{TITLE: "dir", "io_deis_oras_content_unpack": "true"})]), Unpack(0)),
        (manifest([layer(1, "application/vnd.oci.image.layer.v1.tar+gzip")],
                  config_type="application/vnd.oci.image.config.v1+json"), Unpack(0, "models", True)),  # modelcar
        (manifest([layer(1, "application/vnd.docker.image.rootfs.diff.tar.gzip")],
                  config_type="application/vnd.docker.container.image.v1+json"), Unpack(0, "models", True)),
    ],
)
def test_tar_layers_are_archives_to_extract(raw: bytes, unpack: Unpack) -> None:
    (got,) = files_of(parse_document(raw, "", "t"), "t")
    assert got.unpack == unpack and got.locator == f"sha256:{H[1]}" and got.checksums == {"sha256": H[1]}


def test_compressed_raw_layers_are_not_supported_yet() -> None:
    with pytest.raises(UnsupportedArtifactError, match="not supported yet"):
        files(manifest([layer(1, "application/vnd.cncf.model.weight.v1.raw+gzip", **{FILEPATH: "w"})],
                       artifact_type=MODELPACK_ARTIFACT))


def test_a_modelcar_layer_that_is_not_a_tar_is_refused() -> None:
    with pytest.raises(UnsupportedArtifactError, match="not a tar"):
        files(manifest([layer(1, "application/octet-stream")], config_type="application/vnd.oci.image.config.v1+json"))


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "a\\b", "x\ny", ""])
def test_names_that_leave_the_model_folder_are_refused(name: str) -> None:
    with pytest.raises((UnsafePathError, SourceError)):
        files(manifest([layer(1, **{TITLE: name})]))


@pytest.mark.parametrize("size", [10**15, MAX_BLOB_SIZE + 1, 2**63])
def test_huge_sizes_are_malformed(size: int) -> None:
    with pytest.raises(MalformedListingError):
        files(manifest([layer(1, size=size, **{TITLE: "x"})]))


@pytest.mark.parametrize("bad", [{"size": -1}, {"size": "10"}, {"size": True}, {"size": 1.5},
                                 {"digest": "sha512:" + "a" * 128}, {"digest": "sha256:XYZ"}, {"digest": None},
                                 {"mediaType": None}, {"annotations": {"a": 1}}])
def test_malformed_descriptors_are_source_errors(bad: dict[str, Any]) -> None:
    entry = {**layer(1, **{TITLE: "x"}), **bad}
    with pytest.raises(SourceError):
        files(manifest([entry]))


@pytest.mark.parametrize("raw", [b"not json", b"[]", json.dumps({"schemaVersion": 1}).encode(),
                                 json.dumps({"schemaVersion": 2, "mediaType": "text/html"}).encode(),
                                 b"[" * 10_000, manifest([])])
def test_documents_that_are_not_manifests_are_refused(raw: bytes) -> None:
    with pytest.raises(SourceError):
        files(raw)


def test_content_type_is_used_when_the_body_names_no_media_type() -> None:
    doc = json.loads(manifest([layer(1, **{TITLE: "x"})]))
    del doc["mediaType"]
    parsed = parse_document(json.dumps(doc).encode(), f"{OCI_MANIFEST}; charset=utf-8", "t")
    assert parsed.media_type == OCI_MANIFEST and not parsed.is_index


def index(entries: list[dict[str, Any]]) -> Any:
    return parse_document(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode(),
                          "", "t")


def entry(i: int, **kw: Any) -> dict[str, Any]:
    return {"mediaType": OCI_MANIFEST, "digest": f"sha256:{H[i]}", "size": 100, **kw}


def test_an_index_resolves_to_its_artifact_never_a_platform() -> None:
    linux = {"platform": {"os": "linux", "architecture": "amd64"}}
    assert pick_from_index(index([entry(1, **linux), entry(2, artifactType=MODELPACK_ARTIFACT)]), "t") == \
        (f"sha256:{H[2]}", 100)
    assert pick_from_index(index([entry(1, **linux), entry(2, artifactType="application/x-model")]), "t")[0] == \
        f"sha256:{H[2]}"
    assert pick_from_index(index([entry(3)]), "t")[0] == f"sha256:{H[3]}"
    with pytest.raises(UnsupportedArtifactError, match="platform"):
        pick_from_index(index([entry(1, **linux), entry(2, platform={"os": "linux", "architecture": "arm64"})]), "t")
    with pytest.raises(UnsupportedArtifactError, match="by digest"):
        pick_from_index(index([entry(1, artifactType=MODELPACK_ARTIFACT), entry(2, artifactType=MODELPACK_ARTIFACT)]),
                        "t")
    with pytest.raises(UnsupportedArtifactError):
        pick_from_index(index([entry(1, mediaType=OCI_INDEX)]), "t")
