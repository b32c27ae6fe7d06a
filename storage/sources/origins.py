"""Where a request may go: the origin of a URL, which hosts are this machine, who may be spoken to and how.

One rule for every source that takes a URL or a host from its user (``https://`` folders, OCI registries, a
registry's token realm, every redirect hop of either):

Invariants:
- an origin is ``(scheme, host, port)``: the host lower case without brackets, the scheme's default port filled in,
  an unreadable port ``-1`` (never equal to a real origin): what "send the token only to the same origin" compares;
- plain HTTP goes only to a host the operator listed (``host`` covers every port of it, ``host:port`` that port
  only), or to a loopback host when the caller trusts this machine's own services (:attr:`HostPolicy.loopback`: the
  CLI, run by whoever owns the machine);
- the node agent serving CRs trusts no node-local host: a tenant's URI, or a redirect or token realm sent by a server
  a tenant controls, reaches the node's loopback, link-local (cloud metadata) or unspecified address in no scheme
  unless the operator listed it;
- a host is judged by its text alone (``localhost``, ``*.localhost``, IP literals); nothing here resolves a name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["LOOPBACK_TRUSTED", "HostPolicy", "host_port", "is_loopback", "is_node_local", "origin"]

DEFAULT_PORTS = {"http": 80, "https": 443}


def host_port(netloc: str) -> tuple[str, int | None]:
    """``(host, port)`` of ``[userinfo@]host[:port]`` (``[v6]:port`` too): the host lower case without brackets or a
    trailing dot; the port ``None`` when absent, ``-1`` when unreadable."""
    parts = urlsplit(f"//{netloc.strip()}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    return (parts.hostname or "").lower().rstrip("."), port


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``url``, the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host, port = host_port(parts.netloc)
    return scheme, host, port if port is not None else DEFAULT_PORTS.get(scheme, -1)


def is_loopback(host: str) -> bool:
    """``host`` (a name or an IP literal, IPv6 with or without brackets) names this machine: ``localhost``,
    ``*.localhost``, 127.0.0.0/8, ``::1``."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_node_local(host: str) -> bool:
    """``host`` names this machine or its link: loopback, link-local (169.254.0.0/16 — cloud metadata services —
    and fe80::/10) or unspecified (``0.0.0.0`` and ``::`` connect to this machine)."""
    if is_loopback(host):
        return True
    try:
        ip = ipaddress.ip_address(host.strip().strip("[]").lower().rstrip("."))
    except ValueError:
        return False
    return ip.is_link_local or ip.is_unspecified


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts a source may speak to, and in which scheme: ``listed`` ``host`` / ``host:port`` entries (a scheme
    prefix and a trailing slash are ignored) may be spoken to in plain HTTP; HTTPS goes anywhere else, except that
    when ``loopback`` is false a node-local host (:func:`is_node_local`) is reached only if listed; when
    ``loopback`` is true loopback hosts may also be spoken to in plain HTTP unlisted."""

    listed: tuple[str, ...] = ()
    loopback: bool = True

    @classmethod
    def of(cls, listed: Iterable[str], *, loopback: bool = True) -> HostPolicy:
        entries = (e.strip().removeprefix("http://").removeprefix("https://").rstrip("/") for e in listed)
        return cls(tuple(e for e in entries if e), loopback)

    def is_listed(self, netloc: str) -> bool:
        host, port = host_port(netloc)
        for entry in self.listed:
            h, p = host_port(entry)
            if host and h == host and (p is None or p == port):
                return True
        return False

    def refusal(self, scheme: str, netloc: str) -> str | None:
        """Why ``scheme://netloc`` may not be spoken to (``None``: it may)."""
        host, _ = host_port(netloc)
        if not host:
            return "a URL without a host"
        if self.is_listed(netloc):
            return None
        if not self.loopback and is_node_local(host):
            return f"{host} is this node's own address (loopback, link-local or unspecified) and not listed"
        if scheme == "https":
            return None
        if self.loopback and is_loopback(host):
            return None
        which = "neither loopback nor listed" if self.loopback else "not listed"
        return f"plain http:// to {host}, which is {which} as an insecure (plain HTTP) host"

    def allows(self, scheme: str, netloc: str) -> bool:
        return self.refusal(scheme, netloc) is None

    def hint(self) -> str:
        """What to do about a refused host."""
        if self.loopback:
            return "use https://, or list the host as an insecure (plain HTTP) host if this network is trusted"
        return ("use https://, or have the operator list the host (host or host:port) as an insecure (plain HTTP) "
                "host; a model's URI never reaches the node's own services (loopback, link-local) unless listed")


LOOPBACK_TRUSTED = HostPolicy()
"""Plain HTTP to this machine's loopback, HTTPS anywhere: the policy of a source built without one (the CLI's)."""
