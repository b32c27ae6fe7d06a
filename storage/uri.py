"""Model URIs: one parser for every scheme, so every error names the accepted forms.

``oci://`` names two different things, told apart by the first part after ``oci://`` alone, never by a guess:

* OCI Object Storage, every form OME accepts, exactly as before, and the same forms under the explicit alias
  ``ocios://`` (the name OME #797 gives them); both parse to ``scheme="oci"``::

      oci://n/NAMESPACE/b/BUCKET/o/PREFIX        ocios://n/NAMESPACE/b/BUCKET/o/PREFIX
      oci://NAMESPACE@REGION/BUCKET/PREFIX       ocios://NAMESPACE@REGION/BUCKET/PREFIX

  (the first part is ``n`` or holds an ``@``; a namespace never holds a dot or a port).
* An OCI registry artifact (a CNCF ModelPack or ORAS artifact, pinned by tag or digest), ``scheme="oci-registry"``,
  when the first part is a registry host: it holds a dot, a port, or is ``localhost`` (docker's own rule)::

      oci://registry.example.com/org/model:v1
      oci://ghcr.io/org/model@sha256:<64 hex>
      oci://localhost:5000/org/model:latest       oci://127.0.0.1:5000/org/model:v1
      oci://harbor.corp:8443/proj/model:v1@sha256:<64 hex>   (the digest wins; the tag is dropped)

  A tag or a digest is required (no implicit ``latest``); the repository is lower case as the distribution spec
  says; only ``sha256`` digests are accepted (content addressing is the checksum every blob is verified against).
* Anything else after ``oci://`` (``oci://myregistry/model:v1``, ``oci://ns/bucket/prefix``) is a
  :class:`BadURIError` saying what to write instead; so is a registry host after ``ocios://``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from .errors import BadURIError

ACCEPTED_FORMS = (
    "hf://ORG/MODEL[@REVISION] (or hf://MODEL[@REVISION]), "
    "oci://n/NAMESPACE/b/BUCKET/o/PREFIX, oci://NAMESPACE@REGION/BUCKET/PREFIX (or ocios://...), "
    "oci://REGISTRY.HOST[:PORT]/REPO:TAG (or @sha256:DIGEST), "
    "local:///ABSOLUTE/PATH, https://HOST[:PORT]/PATH/ (a folder holding a SHA256SUMS)"
)

_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# a branch, tag, ``refs/pr/N`` or commit sha; no spaces, control characters, '@' or '..' segments
_HF_REV = re.compile(r"^[A-Za-z0-9._+=~-]+(?:/[A-Za-z0-9._+=~-]+)*$")
_OCI_NS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_OCI_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OCI_REGION = re.compile(r"^[a-z0-9-]+$")
# the distribution reference grammar (distribution/reference): host[:port], path components, tag, digest
_REG_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                       r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_REG_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_REG_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_REG_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
REGISTRY_FORMS = "oci://REGISTRY.HOST[:PORT]/REPO:TAG or oci://REGISTRY.HOST[:PORT]/REPO@sha256:DIGEST"
OCIOS_FORMS = "oci://n/NAMESPACE/b/BUCKET/o/PREFIX (or ocios://n/NAMESPACE/b/BUCKET/o/PREFIX)"

Scheme = Literal["hf", "oci", "oci-registry", "local", "https", "http"]


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
    # oci-registry: ``revision`` is the digest when one is given, else the tag
    registry: str = ""
    repository: str = ""
    tag: str | None = None
    digest: str | None = None
    # local
    path: str = ""
    # http(s): the folder URL, canonical (scheme and host lowercase, default port dropped, ends in '/')
    url: str = ""

    @property
    def canonical(self) -> str:
        if self.scheme == "hf":
            return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        if self.scheme == "oci":
            return f"oci://n/{self.namespace}/b/{self.bucket}/o/{self.prefix}"
        if self.scheme == "oci-registry":
            return f"oci://{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")
        if self.scheme in ("https", "http"):
            return self.url
        return f"local://{self.path}"

    def default_relpath(self) -> PurePosixPath:
        """Where the model goes under the models root when no ``--dest`` is given."""
        if self.scheme == "hf":
            return PurePosixPath(self.repo_id)
        if self.scheme == "oci":
            prefix = self.prefix.strip("/")
            return PurePosixPath(prefix) if prefix else PurePosixPath(self.bucket)
        if self.scheme == "oci-registry":
            return PurePosixPath(self.repository)
        if self.scheme in ("https", "http"):
            return _http_relpath(self.url)
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
    if scheme in ("oci", "ocios"):
        first = rest.split("/", 1)[0]
        if first == "n" or "@" in first:
            return _parse_object_storage(raw, rest)
        if scheme == "oci" and _registry_host(first):
            return _parse_registry(raw, rest)
        raise _ambiguous_oci(raw, scheme, first)
    if scheme == "local":
        if not rest.startswith("/"):
            raise _bad(raw, "local:// needs an absolute path (local:///data/models/x)")
        if any(ord(c) < 32 for c in rest):
            raise _bad(raw, "control characters are not allowed in a path")
        return ModelURI(scheme="local", raw=raw, path=str(PurePosixPath(rest)))
    if scheme in ("https", "http"):
        return _parse_http(raw, "https" if scheme == "https" else "http")
    raise _bad(raw, f"unknown scheme {scheme!r}")


def _parse_object_storage(raw: str, rest: str) -> ModelURI:
    """``oci://`` or ``ocios://`` + ``n/NS/b/BUCKET/o/PREFIX`` or ``NS@REGION/BUCKET/PREFIX``."""
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


def _registry_host(first: str) -> bool:
    """The first part of an ``oci://`` URI names a registry: it holds a dot or a port, or is ``localhost``."""
    return "." in first or ":" in first or first.lower() == "localhost" or first.startswith("[")


def _ambiguous_oci(raw: str, scheme: str, first: str) -> BadURIError:
    if scheme == "ocios":
        return _bad(raw, f"ocios:// names OCI Object Storage only: write {OCIOS_FORMS}; for a registry artifact "
                         f"write {REGISTRY_FORMS}")
    if not first:
        return _bad(raw, f"empty; write {OCIOS_FORMS} for Object Storage or {REGISTRY_FORMS} for a registry")
    return _bad(raw, f"{first!r} is neither an Object Storage form nor a registry host (a registry host holds a dot, "
                     f"a port or is localhost): for Object Storage write {OCIOS_FORMS}; for a registry artifact "
                     f"write {REGISTRY_FORMS}, e.g. oci://{first}.example.com/... or oci://{first}:5000/...")


def _parse_registry(raw: str, rest: str) -> ModelURI:
    """``oci://HOST[:PORT]/REPO(:TAG|@sha256:DIGEST|:TAG@sha256:DIGEST)``: a registry artifact."""
    if any(ord(c) < 33 or ord(c) == 127 for c in rest):
        raise _bad(raw, "spaces and control characters are not allowed in a registry reference")
    host, _, path = rest.partition("/")
    if not _REG_HOST.fullmatch(host):
        raise _bad(raw, f"bad registry host {host!r}; expected {REGISTRY_FORMS}")
    name, at, digest = path.partition("@")
    if at and not _REG_DIGEST.fullmatch(digest):
        raise _bad(raw, f"bad digest {digest!r}: only sha256:<64 lower-case hex> is accepted")
    last = name.rsplit("/", 1)[-1]
    tag: str | None = None
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _REG_TAG.fullmatch(tag):
            raise _bad(raw, f"bad tag {tag!r}: letters, digits, '_', '.', '-', at most 128, not starting with '.' "
                            "or '-'")
    components = name.split("/")
    if not name or not all(_REG_COMPONENT.fullmatch(c) for c in components):
        raise _bad(raw, f"bad repository {name!r}: lower-case letters and digits separated by '.', '_', '__' or "
                        f"'-', parts joined by '/'; expected {REGISTRY_FORMS}")
    if len(host) + 1 + len(name) > 255:
        raise _bad(raw, "a registry reference's name is at most 255 characters")
    if not tag and not at:
        raise _bad(raw, f"name a tag or a digest (no implicit 'latest'): oci://{host}/{name}:TAG or "
                        f"oci://{host}/{name}@sha256:DIGEST")
    digest_or_none = digest if at else None
    return ModelURI(scheme="oci-registry", raw=raw, registry=host.lower(), repository=name,
                    tag=None if digest_or_none else tag, digest=digest_or_none, revision=digest_or_none or tag)


_HTTP_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*\.?$")
_HTTP_FORM = "https://HOST[:PORT]/PATH/"


def _http_segments(raw: str, path: str) -> list[str]:
    """The decoded segments of a folder URL's path; refuses what could not name a folder under the models root."""
    segments = [s for s in path.split("/") if s]
    for seg in segments:
        name = unquote(seg)
        if name in (".", "..") or seg in (".", ".."):
            raise _bad(raw, "the path may not contain '.' or '..' segments")
        if "/" in name or "\\" in name or not name.isprintable() or name != name.strip():
            raise _bad(raw, f"the path segment {seg!r} holds a slash, backslash, space or control character; "
                            "percent-encode spaces (%20) and do not encode '/'")
    return segments


def _parse_http(raw: str, scheme: Literal["https", "http"]) -> ModelURI:
    """``https://HOST[:PORT]/PATH/``: a folder on a web server (a ``SHA256SUMS`` there names its files)."""
    if any(ord(c) < 33 or ord(c) == 127 for c in raw):
        raise _bad(raw, "spaces and control characters are not allowed in a URL; percent-encode them")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise _bad(raw, f"not a valid URL ({exc})") from None
    if "@" in parts.netloc:  # the message must not quote them: it reaches Events and ConfigMaps
        shown = f"{parts.scheme}://***@{parts.netloc.rpartition('@')[2]}{parts.path}"
        raise _bad(shown, "credentials in the URL are not accepted; give a token through the source's settings")
    if parts.query or parts.fragment or raw.endswith(("?", "#")):
        raise _bad(raw, "a folder URL has no query ('?') or fragment ('#')")
    host = (parts.hostname or "").lower()
    if not host:
        raise _bad(raw, f"no host; expected {_HTTP_FORM}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(raw, f"bad IPv6 host {host!r}") from None
        netloc = f"[{host}]"
    elif _HTTP_HOST.fullmatch(host):
        netloc = host
    else:
        raise _bad(raw, f"bad host {host!r}")
    if port is not None and port != {"https": 443, "http": 80}[scheme]:
        netloc += f":{port}"
    if not parts.path.endswith("/"):
        raise _bad(raw, f"a model URL names a folder and ends with '/' ({_HTTP_FORM}, e.g. "
                        f"{scheme}://{netloc}{parts.path or ''}/); the folder must hold a SHA256SUMS")
    segments = _http_segments(raw, parts.path)
    path = "/" + "".join(s + "/" for s in segments)
    return ModelURI(scheme=scheme, raw=raw, url=f"{scheme}://{netloc}{path}")


def _http_relpath(url: str) -> PurePosixPath:
    """``HOST/PATH`` of a canonical folder URL (the port left out), decoded: its folder under the models root."""
    parts = urlsplit(url)
    return PurePosixPath(parts.hostname or "", *(unquote(s) for s in parts.path.split("/") if s))
