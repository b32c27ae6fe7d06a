"""The registry-reference form of ``oci://`` and the ``ocios://`` alias (storage/uri.py): every Object Storage form
stays as it was, a registry host makes a registry artifact, anything in between is an error saying what to write."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from modelherd.storage.errors import BadURIError
from modelherd.storage.uri import ACCEPTED_FORMS, parse_uri

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("raw", "registry", "repository", "tag", "digest", "canonical"),
    [
        ("oci://registry.example.com/org/model:v1", "registry.example.com", "org/model", "v1", None,
         "oci://registry.example.com/org/model:v1"),
        ("oci://localhost:5000/m:latest", "localhost:5000", "m", "latest", None, "oci://localhost:5000/m:latest"),
        ("oci://localhost/m:1.0", "localhost", "m", "1.0", None, "oci://localhost/m:1.0"),
        ("oci://127.0.0.1:5000/a/b/c:x_y-z", "127.0.0.1:5000", "a/b/c", "x_y-z", None,
         "oci://127.0.0.1:5000/a/b/c:x_y-z"),
        (f"oci://GHCR.io/org/m@{D}", "ghcr.io", "org/m", None, D, f"oci://ghcr.io/org/m@{D}"),
        (f"oci://h.io:8443/org/m:v1@{D}", "h.io:8443", "org/m", None, D, f"oci://h.io:8443/org/m@{D}"),
        ("oci://[::1]:5000/m:v1", "[::1]:5000", "m", "v1", None, "oci://[::1]:5000/m:v1"),
        ("oci://h.io/my_org/my-model.v2__x:v1", "h.io", "my_org/my-model.v2__x", "v1", None,
         "oci://h.io/my_org/my-model.v2__x:v1"),
    ],
)
def test_registry_references(raw: str, registry: str, repository: str, tag: str | None, digest: str | None,
                             canonical: str) -> None:
    uri = parse_uri(raw)
    assert (uri.scheme, uri.registry, uri.repository, uri.tag, uri.digest) == \
        ("oci-registry", registry, repository, tag, digest)
    assert uri.canonical == canonical and uri.revision == (digest or tag)
    assert uri.default_relpath() == PurePosixPath(repository)
    assert parse_uri(uri.canonical) == parse_uri(canonical)


@pytest.mark.parametrize(
    ("alias", "plain"),
    [("ocios://n/ns/b/bucket/o/llama/8b/", "oci://n/ns/b/bucket/o/llama/8b/"),
     ("ocios://ns@us-ashburn-1/bucket/llama", "oci://ns@us-ashburn-1/bucket/llama"),
     ("OCIOS://n/ns/b/bucket", "oci://n/ns/b/bucket")],
)
def test_ocios_is_the_object_storage_alias(alias: str, plain: str) -> None:
    a, p = parse_uri(alias), parse_uri(plain)
    assert a.scheme == p.scheme == "oci"
    assert (a.namespace, a.bucket, a.prefix, a.region, a.canonical) == (p.namespace, p.bucket, p.prefix, p.region,
                                                                        p.canonical)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("oci://myregistry/org/model:v1", "neither an Object Storage form nor a registry host"),
        ("oci://ns/bucket/prefix", "oci://ns.example.com/"),
        ("ocios://registry.example.com/org/model:v1", "ocios:// names OCI Object Storage only"),
        ("ocios://localhost:5000/m:v1", "ocios:// names OCI Object Storage only"),
        ("oci://h.io/org/model", "name a tag or a digest"),
        ("oci://h.io/Org/Model:v1", "bad repository"),
        ("oci://h.io/org/model:-v1", "bad tag"),
        ("oci://h.io/org/model:" + "x" * 129, "bad tag"),
        ("oci://h.io/org/model@sha512:" + "a" * 128, "only sha256"),
        ("oci://h.io/org/model@sha256:" + "A" * 64, "only sha256"),
        ("oci://h.io/org/model@", "only sha256"),
        ("oci://h.io//model:v1", "bad repository"),
        ("oci://h.io/org/../model:v1", "bad repository"),
        ("oci://h.io/org/model:v1 ", "invalid model URI"),
        ("oci://h.io/org/mo del:v1", "spaces"),
        ("oci://h_o.io/m:v1", "bad registry host"),
        ("oci://h.io:99999999/m:v1", "bad registry host"),
        ("oci://h.io/" + "a/" * 130 + "m:v1", "255"),
        ("oci:///m:v1", "empty"),
    ],
)
def test_ambiguous_or_malformed_references_say_what_to_write(raw: str, says: str) -> None:
    if raw.endswith(" "):  # surrounding whitespace is stripped, as for every scheme
        assert parse_uri(raw).canonical == raw.strip()
        return
    with pytest.raises(BadURIError) as ei:
        parse_uri(raw)
    assert says in str(ei.value)
    assert ei.value.hint is not None and ACCEPTED_FORMS in ei.value.hint


def test_object_storage_forms_never_become_registry_references() -> None:
    for raw in ("oci://n/ns/b/bucket/o/a.b:c", "oci://ns@us-ashburn-1/bucket/x.y:5000/z"):
        assert parse_uri(raw).scheme == "oci"
