"""OCI manifests and image indexes as a registry serves them, read as the files of a model: pure, no I/O.

Invariants:
- every document is untrusted: parsed with :func:`~..untrusted.load_json` (size, nesting and integer length
  bounded), every field type-checked; anything else is a :class:`~..errors.SourceError` saying what is wrong;
- a raw layer is one file: its path (``org.cncf.model.filepath``, else ``org.opencontainers.image.title``) went
  through :func:`~..paths.safe_relpath`, its size is an integer in ``[0, MAX_BLOB_SIZE]``, its checksum is the
  layer's ``sha256`` digest (the only one accepted) and its locator is that digest;
- a tar layer (every layer of a modelcar image, a ModelPack ``.tar*`` layer, an ORAS folder) is an archive entry
  (:class:`~..types.Unpack`, in the manifest's layer order; its path ``<order>-<hex>`` only names the blob in
  staging): a modelcar image's layers are applied with whiteouts and only their ``model_folder`` (``models``) is
  taken, the others are extracted whole (:mod:`~..tarlayer`); never stored as an archive;
- an image index yields the one artifact manifest it holds (by ``artifactType``), never a platform guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MalformedListingError, SourceError
from ..paths import safe_relpath
from ..types import RemoteFile, Unpack
from ..untrusted import UntrustedInputError, load_json, show

__all__ = [
    "ACCEPT",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "MAX_BLOB_SIZE",
    "MAX_MANIFEST_BYTES",
    "MODELPACK_ARTIFACT",
    "UnsupportedArtifactError",
    "files_of",
    "parse_document",
    "pick_from_index",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
IMAGE_CONFIGS = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_ORAS_UNPACK = "io.deis.oras.content.unpack"

#: the distribution spec's own suggestion for a manifest's size limit
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: one layer of a model is one file or one archive: 1 TiB is far above any real one; a larger size is a lie
MAX_BLOB_SIZE = 2**40

_SHA256 = re.compile(r"^sha256:([0-9a-f]{64})$")
_TAR = re.compile(r"(?:^|[./+])tar(?:$|[.+])")


class UnsupportedArtifactError(SourceError):
    """A well-formed artifact of a kind modelherd cannot store yet (tar layers, compressed raw layers, a
    multi-platform image index, a non-sha256 digest)."""


@dataclass(frozen=True)
class Document:
    """A parsed manifest or index: its media type (the body's own, else the response's) and its JSON object."""

    media_type: str
    body: Mapping[str, Any]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def parse_document(raw: bytes, content_type: str, what: str) -> Document:
    """The manifest or index in ``raw``; ``content_type`` (the response's) is used when the body names none."""
    try:
        doc = load_json(raw, max_bytes=MAX_MANIFEST_BYTES)
    except UntrustedInputError as e:
        raise SourceError(f"{what}: the manifest {e}", hint="the registry does not serve an OCI manifest") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{what}: the manifest is not a JSON object", hint="the registry is malformed")
    media_type = doc.get("mediaType")
    if media_type is None:
        media_type = content_type.split(";", 1)[0].strip()
    if not isinstance(media_type, str) or media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
        raise UnsupportedArtifactError(f"{what}: media type {show(media_type)} is not an OCI image manifest or index",
                                       hint="pull an OCI artifact (ModelPack, ORAS) or an OCI/Docker v2 manifest")
    if doc.get("schemaVersion") != 2:
        raise SourceError(f"{what}: schemaVersion {show(doc.get('schemaVersion'))}, expected 2",
                          hint="the registry serves a legacy (schema 1) manifest; push the artifact again")
    return Document(media_type=media_type, body=doc)


def sha256_hex(digest: object, what: str) -> str:
    """The hex of a ``sha256:<64 hex>`` digest; other algorithms are :class:`UnsupportedArtifactError`."""
    if not isinstance(digest, str):
        raise SourceError(f"{what}: a descriptor has no digest", hint="the manifest is malformed")
    m = _SHA256.match(digest)
    if not m:
        raise UnsupportedArtifactError(f"{what}: digest {show(digest)} is not sha256:<64 hex>",
                                       hint="only sha256 content addressing is supported")
    return m.group(1)


def _size(desc: Mapping[str, Any], what: str) -> int:
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SourceError(f"{what}: descriptor {show(desc.get('digest'))} has no valid size",
                          hint="the manifest is malformed")
    if size > MAX_BLOB_SIZE:
        raise MalformedListingError(f"{what}: layer {show(desc.get('digest'))} claims {size} bytes, more than any "
                                    f"real model file ({MAX_BLOB_SIZE} bytes = 1 TiB)",
                                    hint="the manifest is malformed or hostile; nothing was downloaded")
    return size


def _annotations(desc: Mapping[str, Any], what: str) -> Mapping[str, str]:
    ann = desc.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise SourceError(f"{what}: descriptor {show(desc.get('digest'))} has malformed annotations",
                          hint="the manifest is malformed")
    return ann


def _descriptors(body: Mapping[str, Any], key: str, what: str) -> list[Mapping[str, Any]]:
    items = body.get(key)
    if not isinstance(items, list) or not all(isinstance(d, dict) for d in items):
        raise SourceError(f"{what}: the manifest has no list of {key!r}", hint="the manifest is malformed")
    return items


def pick_from_index(doc: Document, what: str) -> tuple[str, int]:
    """``(digest, size)`` of the artifact manifest an index holds: the one ModelPack manifest, else the one entry
    with an ``artifactType`` and no platform, else the index's only entry. Platform images are refused."""
    entries = _descriptors(doc.body, "manifests", what)
    modelpack = [e for e in entries if e.get("artifactType") == MODELPACK_ARTIFACT]
    artifacts = [e for e in entries if isinstance(e.get("artifactType"), str) and e.get("artifactType")
                 and "platform" not in e]
    for chosen in (modelpack, artifacts, entries if len(entries) == 1 else []):
        if len(chosen) == 1:
            entry = chosen[0]
            if entry.get("mediaType") in INDEX_TYPES:
                raise UnsupportedArtifactError(f"{what}: an image index inside an image index",
                                               hint="name the artifact manifest by digest")
            digest = entry.get("digest")
            sha256_hex(digest, what)
            return str(digest), _size(entry, what)
        if len(chosen) > 1:
            raise UnsupportedArtifactError(f"{what}: the image index holds {len(chosen)} artifact manifests",
                                           hint="name the one to pull by digest: oci://HOST/REPO@sha256:DIGEST")
    platforms = sorted({show(e.get("platform")) for e in entries})[:4]
    raise UnsupportedArtifactError(f"{what}: the image index holds {len(entries)} platform images "
                                   f"({', '.join(platforms)}) and no model artifact",
                                   hint="name the artifact or the one image to pull by digest")


def _is_tar(media_type: str) -> bool:
    return bool(_TAR.search(media_type.lower()))


def files_of(doc: Document, what: str, model_folder: str = "models") -> list[RemoteFile]:
    """The files of a ModelPack or ORAS manifest, or of a modelcar image, sorted by path: one per raw layer, one
    archive entry per tar layer (see the module's invariants); a compressed raw layer or an image layer that is
    not a tar is an :class:`UnsupportedArtifactError`."""
    body = doc.body
    config = body.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    artifact_type = body.get("artifactType")
    modelpack = artifact_type == MODELPACK_ARTIFACT or config_type == MODELPACK_CONFIG
    image = config_type in IMAGE_CONFIGS and not artifact_type
    files: list[RemoteFile] = []
    for order, layer in enumerate(_descriptors(body, "layers", what)):
        media_type = layer.get("mediaType")
        if image and media_type is None:
            media_type = "application/vnd.oci.image.layer.v1.tar"
        if not isinstance(media_type, str):
            raise SourceError(f"{what}: layer {show(layer.get('digest'))} has no media type",
                              hint="the manifest is malformed")
        hexdigest = sha256_hex(layer.get("digest"), what)
        size = _size(layer, what)
        ann = _annotations(layer, what)
        name = (ann.get(ANNOTATION_FILEPATH) or ann.get(ANNOTATION_TITLE)) if modelpack else ann.get(ANNOTATION_TITLE)
        layer_what = f"{what}: layer sha256:{hexdigest[:12]} ({media_type})"
        if modelpack:
            tar = _is_tar(media_type)
            if not tar and re.search(r"[+.](gzip|zstd)$", media_type):
                raise UnsupportedArtifactError(f"{layer_what} is compressed; compressed raw layers are not "
                                               "supported yet", hint="push the weights as .raw layers")
        else:
            tar = ann.get(ANNOTATION_ORAS_UNPACK, "").lower() == "true" or (
                ANNOTATION_TITLE not in ann and _is_tar(media_type))
        if image and not tar:
            raise UnsupportedArtifactError(f"{layer_what} is an image layer that is not a tar",
                                           hint="a modelcar image's layers are tar, tar+gzip or tar+zstd")
        if tar:
            unpack = Unpack(order=order, root=model_folder if image else "", whiteouts=image)
            files.append(RemoteFile(path=f"{order:04d}-{hexdigest}", size=size, checksums={"sha256": hexdigest},
                                    locator=f"sha256:{hexdigest}", unpack=unpack))
            continue
        if not name:
            raise SourceError(f"{layer_what} names no file ({ANNOTATION_FILEPATH} or {ANNOTATION_TITLE})",
                              hint="push the files with `oras push` or `modctl`, which name every layer")
        path = safe_relpath(name, what="layer file name")
        files.append(RemoteFile(path=path, size=size, checksums={"sha256": hexdigest}, locator=f"sha256:{hexdigest}"))
    if not files:
        raise SourceError(f"{what}: the manifest has no layers", hint="the artifact holds no file")
    files.sort(key=lambda f: f.path)
    return files
