"""``storage/uri.py`` (every accepted form, every rejection) and ``storage/paths.py`` (containment)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from modelherd.storage.errors import BadURIError, ConfigError, UnsafePathError
from modelherd.storage.paths import STAGING_DIRNAME, contained, ensure_inside_root, safe_relpath, staging_root
from modelherd.storage.uri import ACCEPTED_FORMS, ModelURI, parse_uri

# -- uri: accepted forms ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "repo_id", "revision", "canonical"),
    [
        ("hf://meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", None, "hf://meta-llama/Llama-3.1-8B"),
        ("hf://gpt2", "gpt2", None, "hf://gpt2"),
        ("hf://org/model@main", "org/model", "main", "hf://org/model@main"),
        ("hf://org/model@v1.0", "org/model", "v1.0", "hf://org/model@v1.0"),
        ("hf://org/model@refs/pr/12", "org/model", "refs/pr/12", "hf://org/model@refs/pr/12"),
        ("hf://org/m@" + "a" * 40, "org/m", "a" * 40, "hf://org/m@" + "a" * 40),
        ("  HF://org/model_v2.5  ", "org/model_v2.5", None, "hf://org/model_v2.5"),
        ("hf://org/model/", "org/model", None, "hf://org/model"),
    ],
)
def test_hf_forms_parse_to_repo_and_revision(raw: str, repo_id: str, revision: str | None, canonical: str) -> None:
    uri = parse_uri(raw)
    assert (uri.scheme, uri.repo_id, uri.revision, uri.canonical) == ("hf", repo_id, revision, canonical)
    assert uri.raw == raw.strip()
    assert uri.default_relpath() == PurePosixPath(repo_id)


@pytest.mark.parametrize(
    ("raw", "ns", "bucket", "prefix", "region", "relpath"),
    [
        ("oci://n/myns/b/models/o/llama/8b/", "myns", "models", "llama/8b/", None, "llama/8b"),
        ("oci://n/myns/b/models/o/llama", "myns", "models", "llama", None, "llama"),
        ("oci://n/myns/b/models/o//a//b/", "myns", "models", "a/b/", None, "a/b"),
        ("oci://n/myns/b/models", "myns", "models", "", None, "models"),
        ("oci://n/myns/b/models/o", "myns", "models", "", None, "models"),
        ("oci://myns@us-ashburn-1/models/llama/8b", "myns", "models", "llama/8b", "us-ashburn-1", "llama/8b"),
        ("oci://myns@eu-frankfurt-1/models", "myns", "models", "", "eu-frankfurt-1", "models"),
    ],
)
def test_oci_forms_parse_to_namespace_bucket_prefix(raw: str, ns: str, bucket: str, prefix: str,
                                                    region: str | None, relpath: str) -> None:
    uri = parse_uri(raw)
    assert (uri.scheme, uri.namespace, uri.bucket, uri.prefix, uri.region) == ("oci", ns, bucket, prefix, region)
    assert uri.canonical == f"oci://n/{ns}/b/{bucket}/o/{prefix}"
    assert uri.default_relpath() == PurePosixPath(relpath)
    # the canonical form parses back to the same object location
    again = parse_uri(uri.canonical)
    assert (again.namespace, again.bucket, again.prefix) == (ns, bucket, prefix)


def test_local_form_keeps_the_absolute_path_and_has_no_destination() -> None:
    uri = parse_uri("local:///data/models/llama/")
    assert (uri.scheme, uri.path, uri.canonical) == ("local", "/data/models/llama", "local:///data/models/llama")
    with pytest.raises(BadURIError):
        uri.default_relpath()


def test_model_uri_is_immutable_and_hashable() -> None:
    uri = parse_uri("hf://org/model@main")
    assert {uri: 1}[parse_uri("hf://org/model@main")] == 1
    with pytest.raises(AttributeError):
        uri.repo_id = "x"  # type: ignore[misc]
    assert isinstance(uri, ModelURI)


# -- uri: rejections -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "", "   ", "org/model", "huggingface.co/org/model", "s3://bucket/key", "http://host/x",
        "hf://", "hf://a/b/c", "hf://org/../model", "hf://org/mo..del", "hf://../x", "hf://org/-model",
        "hf://org/mo del", "hf://org/model@", "hf://org/model@a b", "hf://org/model@../../etc",
        "hf://org/model@refs/../x", "hf://org/model@x@y", "hf://org\n/model", "hf://org/model@main\nx",
        "oci://", "oci://n/ns", "oci://n/ns/b/", "oci://n/ns/x/bucket/o/p", "oci://n/n s/b/bucket",
        "oci://n/ns/b/bu\n/o/x", "oci://n/ns/b/bucket/o/a/../b", "oci://n/ns/b/bucket/o/./a",
        "oci://ns@US_EAST/bucket/p", "oci://ns@region", "oci://@us-ashburn-1/bucket",
        "local://relative/path", "local://", "local:///a/\x00b",
    ],
)
def test_rejections_are_bad_uri_errors_naming_the_accepted_forms(raw: str) -> None:
    with pytest.raises(BadURIError) as ei:
        parse_uri(raw)
    err = ei.value
    assert isinstance(err, ConfigError) and err.exit_code == 2
    assert err.hint is not None and ACCEPTED_FORMS in err.hint
    assert ACCEPTED_FORMS in str(err)
    assert "invalid model URI" in err.message


def test_non_string_input_is_a_bad_uri_error() -> None:
    with pytest.raises(BadURIError):
        parse_uri(None)  # type: ignore[arg-type]


# -- paths: safe_relpath ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "want"),
    [("a", "a"), ("a/b/c.safetensors", "a/b/c.safetensors"), ("a//b/", "a/b"), ("..a/b..", "..a/b.."),
     (".hidden/x", ".hidden/x"), ("a/...", "a/..."),
     # ':' is an ordinary POSIX character, not a drive letter: these are relative names on Linux
     ("a:b.txt", "a:b.txt"), ("C:evil", "C:evil"), ("c:/windows", "c:/windows"), ("ünï/cödé 😀", "ünï/cödé 😀")],
)
def test_safe_relpath_normalises_relative_names(name: str, want: str) -> None:
    assert safe_relpath(name) == want


@pytest.mark.parametrize(
    "name",
    ["", "..", "../evil", "a/../../evil", "a/..", "./a", "a/./b", ".", "/abs", "//abs", "/",
     "a\\..\\evil", "dir\\file", "a\x00b",
     # control characters: a name must not forge a line of output or drive the terminal
     "a\nb", "x.safetensors\r", "\x1b[31mred", "tab\tname", "del\x7f", "c1\x85nel", "c1\x9b31m"],
)
def test_safe_relpath_refuses_names_that_could_leave_the_folder(name: str) -> None:
    with pytest.raises(UnsafePathError) as ei:
        safe_relpath(name, what="tree path")
    assert "tree path" in ei.value.message and ei.value.hint
    assert ei.value.exit_code == 4


# -- paths: contained / ensure_inside_root ---------------------------------------------------


def test_contained_joins_inside_the_base(tmp_path: Path) -> None:
    base = tmp_path / "model"
    base.mkdir()
    assert contained(base, "sub/file.bin") == base / "sub" / "file.bin"
    (base / "inner").mkdir()
    os.symlink(base / "inner", base / "link-in")
    assert contained(base, "link-in/x") == base / "link-in" / "x"


def test_contained_refuses_a_symlink_escaping_the_base(tmp_path: Path) -> None:
    base = tmp_path / "model"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, base / "escape")
    os.symlink("/etc/passwd", base / "passwd")
    with pytest.raises(UnsafePathError, match="outside"):
        contained(base, "escape/weights.bin")
    with pytest.raises(UnsafePathError):
        contained(base, "passwd")
    with pytest.raises(UnsafePathError):
        contained(base, "../model-sibling")


def test_contained_follows_a_symlinked_base(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    assert contained(tmp_path / "alias", "a/b") == tmp_path / "alias" / "a" / "b"


def test_ensure_inside_root_accepts_only_strict_descendants(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    assert ensure_inside_root(root, root / "org" / "model") == (root / "org" / "model").resolve()
    for bad in (root, tmp_path, tmp_path / "models-other" / "x", root / ".." / "elsewhere"):
        with pytest.raises(UnsafePathError) as ei:
            ensure_inside_root(root, bad)
        assert ei.value.hint and "--models-root" in ei.value.hint
    os.symlink(tmp_path, root / "up")
    with pytest.raises(UnsafePathError):
        ensure_inside_root(root, root / "up" / "x")


def test_staging_root_is_inside_the_models_root(tmp_path: Path) -> None:
    assert staging_root(tmp_path) == tmp_path / STAGING_DIRNAME
