"""``SHA256SUMS`` as ``sha256sum`` writes it, and the ``https://HOST/PATH/`` folder URL: what is accepted, and a
clear typed error for everything else."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path, PurePosixPath

import pytest
from modelherd.storage.errors import BadURIError, MalformedListingError, UnsafePathError
from modelherd.storage.sources.http import MAX_FILES, MAX_SUMS_BYTES, parse_sha256sums
from modelherd.storage.uri import parse_uri

A = hashlib.sha256(b"a").hexdigest()
B = hashlib.sha256(b"b").hexdigest()


def test_real_sha256sum_output_in_text_binary_and_tag_forms(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    files = {"a b.json": b"a", "sub/w.safetensors": b"b", "back\\slash": b"c", "new\nline": b"d"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for flags in ([], ["-b"], ["--tag"]):
        out = subprocess.run(["sha256sum", *flags, "a b.json", "./sub/w.safetensors"], cwd=tmp_path,
                             check=True, capture_output=True).stdout
        assert parse_sha256sums(out) == [("a b.json", A), ("sub/w.safetensors", B)], flags
    # names sha256sum escapes (a leading backslash on the line) are unescaped, then refused as unsafe names
    for name in ("back\\slash", "new\nline"):
        out = subprocess.run(["sha256sum", name], cwd=tmp_path, check=True, capture_output=True).stdout
        assert out.startswith(b"\\")
        with pytest.raises(UnsafePathError, match="line 1"):
            parse_sha256sums(out)


def test_blank_lines_crlf_uppercase_hex_and_its_own_line_are_accepted() -> None:
    text = f"\r\n{A.upper()}  config.json\r\n\n{B} *SHA256SUMS\n{B}  ./x/y.bin\n"
    assert parse_sha256sums(text.encode()) == [("config.json", A), ("x/y.bin", B)]


@pytest.mark.parametrize("line, match", [
    (f"{A} config.json", "not sha256sum output"),           # one space only
    (f"{A[:-1]}  config.json", "not sha256sum output"),     # 63 digits
    (f"{A}g  config.json", "not sha256sum output"),
    (f"{A}  ", "not sha256sum output"),                      # no name
    ("# a comment", "not sha256sum output"),
    (f"MD5 (x) = {A}", "not sha256sum output"),
    (f"\\{A}  a\\tb", "not sha256sum output"),                # an escape sha256sum never writes
])
def test_a_malformed_line_names_its_number(line: str, match: str) -> None:
    with pytest.raises(MalformedListingError, match=f"line 2 is {match}") as err:
        parse_sha256sums(f"{A}  ok.json\n{line}\n".encode(), where="https://h/m/SHA256SUMS")
    assert "https://h/m/SHA256SUMS" in str(err.value) and err.value.hint


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a/./b", "a\\b", "x\x1b[2J"])
def test_a_name_outside_the_folder_is_unsafe(name: str) -> None:
    with pytest.raises(UnsafePathError, match="line 1") as err:
        parse_sha256sums(f"{A}  {name}\n".encode())
    assert "relative paths" in str(err.value)


def test_duplicates_and_a_name_that_is_both_file_and_folder_are_refused() -> None:
    with pytest.raises(MalformedListingError, match="twice"):
        parse_sha256sums(f"{A}  a.bin\n{A}  ./a.bin\n".encode())
    with pytest.raises(MalformedListingError, match="both as a file and as a folder"):
        parse_sha256sums(f"{A}  a\n{B}  a/b.bin\n".encode())
    with pytest.raises(MalformedListingError, match="both as a file and as a folder"):
        parse_sha256sums(f"{B}  a/b.bin\n{A}  a\n".encode())


def test_empty_oversized_foreign_or_selfish_files_are_refused() -> None:
    for data in (b"", b"\n\n  \n"):
        with pytest.raises(MalformedListingError, match="is empty"):
            parse_sha256sums(data)
    with pytest.raises(MalformedListingError, match="names no file"):
        parse_sha256sums(f"{A}  SHA256SUMS\n".encode())
    with pytest.raises(MalformedListingError, match="more than"):
        parse_sha256sums(b"x" * (MAX_SUMS_BYTES + 1))
    with pytest.raises(MalformedListingError, match="not UTF-8"):
        parse_sha256sums(f"{A}  caf".encode() + b"\xe9\n")
    many = "".join(f"{A}  f{i}\n" for i in range(MAX_FILES + 1)).encode()
    with pytest.raises(MalformedListingError, match=f"more than {MAX_FILES} files"):
        parse_sha256sums(many)


# -- the folder URL -------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, canonical, relpath", [
    ("https://Models.Example.COM/team/llama/", "https://models.example.com/team/llama/",
     "models.example.com/team/llama"),
    ("https://h:443/m/", "https://h/m/", "h/m"),
    ("https://h:8443/m/", "https://h:8443/m/", "h/m"),
    ("http://127.0.0.1:8080/a%20b/c/", "http://127.0.0.1:8080/a%20b/c/", "127.0.0.1/a b/c"),
    ("HTTP://[::1]:80/m//x/", "http://[::1]/m/x/", "::1/m/x"),
    ("https://h/", "https://h/", "h"),
])
def test_folder_urls(raw: str, canonical: str, relpath: str) -> None:
    uri = parse_uri(raw)
    assert uri.scheme == canonical.partition(":")[0]
    assert uri.canonical == canonical and uri.default_relpath() == PurePosixPath(relpath)
    assert parse_uri(uri.canonical) == parse_uri(canonical)


@pytest.mark.parametrize("raw, match", [
    ("https://h/models/x", "ends with '/'"),
    ("https://h", "ends with '/'"),
    ("https://user:pw@h/m/", "credentials"),
    ("https://h/m/?sig=1", "no query"),
    ("https://h/m/#frag", "no query"),
    ("https://h/../m/", "'..'"),
    ("https://h/%2E%2E/m/", "'..'"),
    ("https://h/a%2Fb/", "slash"),
    ("https://h/a b/", "spaces"),
    ("https:///m/", "no host"),
    ("https://bad_host/m/", "bad host"),
    ("https://h:99999/m/", "not a valid URL"),
])
def test_bad_folder_urls(raw: str, match: str) -> None:
    with pytest.raises(BadURIError, match=match):
        parse_uri(raw)
