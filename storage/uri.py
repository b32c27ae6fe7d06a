"""Model URIs: one parser for every scheme, so every error names the accepted forms."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from .errors import BadURIError

ACCEPTED_FORMS = (
    "hf://ORG/MODEL[@REVISION] (or hf://MODEL[@REVISION]), "
    "oci://n/NAMESPACE/b/BUCKET/o/PREFIX, oci://NAMESPACE@REGION/BUCKET/PREFIX, "
    "local:///ABSOLUTE/PATH"
)

_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# a branch, tag, ``refs/pr/N`` or commit sha; no spaces, control characters, '@' or '..' segments
_HF_REV = re.compile(r"^[A-Za-z0-9._+=~-]+(?:/[A-Za-z0-9._+=~-]+)*$")
_OCI_NS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_OCI_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OCI_REGION = re.compile(r"^[a-z0-9-]+$")

Scheme = Literal["hf", "oci", "local"]


@dataclass(frozen=True)
class ModelURI:
    """A parsed model URI. ``raw`` is what the user wrote; ``canonical`` is normalised."""

    scheme: Scheme
    raw: str
    # hf
    repo_id: str = ""
    revision: str | None = None
    # oci
    namespace: str = ""
    bucket: str = ""
    prefix: str = ""
    region: str | None = None
    # local
    path: str = ""

    @property
    def canonical(self) -> str:
        if self.scheme == "hf":
            return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        if self.scheme == "oci":
            return f"oci://n/{self.namespace}/b/{self.bucket}/o/{self.prefix}"
        return f"local://{self.path}"

    def default_relpath(self) -> PurePosixPath:
        """Where the model goes under the models root when no ``--dest`` is given."""
        if self.scheme == "hf":
            return PurePosixPath(self.repo_id)
        if self.scheme == "oci":
            prefix = self.prefix.strip("/")
            return PurePosixPath(prefix) if prefix else PurePosixPath(self.bucket)
        raise BadURIError("a local:// model is verified in place and has no destination under the models root")


def _bad(raw: str, why: str) -> BadURIError:
    return BadURIError(f"invalid model URI {raw!r}: {why}", hint=f"accepted forms: {ACCEPTED_FORMS}")


def _safe_prefix(raw: str, prefix: str) -> str:
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise _bad(raw, "the prefix may not contain '.' or '..' segments")
    return "/".join(parts) + ("/" if parts and prefix.endswith("/") else "")


def parse_uri(raw: str) -> ModelURI:
    """Parse ``raw`` or raise :class:`BadURIError` naming the accepted forms."""
    if not isinstance(raw, str) or not raw.strip():
        raise _bad(str(raw), "empty")
    raw = raw.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise _bad(raw, "missing scheme")
    scheme = scheme.lower()
    if scheme == "hf":
        repo, _, rev = rest.partition("@")
        repo = repo.strip("/")
        parts = repo.split("/")
        if not repo or len(parts) > 2 or not all(_HF_PART.fullmatch(p) for p in parts):
            raise _bad(raw, "expected hf://ORG/MODEL with letters, digits, '.', '_' or '-'")
        if any(p in (".", "..") or ".." in p for p in parts):
            raise _bad(raw, "'..' is not allowed in a repository id")
        if "@" in raw and not rev:
            raise _bad(raw, "empty revision after '@'")
        if rev and (not _HF_REV.fullmatch(rev) or any(p in (".", "..") for p in rev.split("/"))):
            raise _bad(raw, f"bad revision {rev!r}: use a branch, tag or commit sha")
        return ModelURI(scheme="hf", raw=raw, repo_id=repo, revision=rev or None)
    if scheme == "oci":
        if rest.startswith("n/"):
            m = re.match(r"^n/([^/]+)/b/([^/]+)(?:/o(?:/(.*))?)?$", rest)
            if not m:
                raise _bad(raw, "expected oci://n/NAMESPACE/b/BUCKET/o/PREFIX")
            ns, bucket, prefix, region = m.group(1), m.group(2), m.group(3) or "", None
        else:
            m = re.match(r"^([^/@]+)@([^/]+)/([^/]+)(?:/(.*))?$", rest)
            if not m:
                raise _bad(raw, "expected oci://n/NAMESPACE/b/BUCKET/o/PREFIX or oci://NAMESPACE@REGION/BUCKET/PREFIX")
            ns, region, bucket, prefix = m.group(1), m.group(2), m.group(3), m.group(4) or ""
            if not _OCI_REGION.fullmatch(region):
                raise _bad(raw, f"bad region {region!r}")
        if not _OCI_NS.fullmatch(ns):
            raise _bad(raw, f"bad namespace {ns!r}")
        if not _OCI_BUCKET.fullmatch(bucket):
            raise _bad(raw, f"bad bucket {bucket!r}")
        return ModelURI(
            scheme="oci", raw=raw, namespace=ns, bucket=bucket, prefix=_safe_prefix(raw, prefix), region=region
        )
    if scheme == "local":
        if not rest.startswith("/"):
            raise _bad(raw, "local:// needs an absolute path (local:///data/models/x)")
        if any(ord(c) < 32 for c in rest):
            raise _bad(raw, "control characters are not allowed in a path")
        return ModelURI(scheme="local", raw=raw, path=str(PurePosixPath(rest)))
    raise _bad(raw, f"unknown scheme {scheme!r}")
