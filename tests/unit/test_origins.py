"""storage/sources/origins.py: the origin of a URL, loopback by text, and who may be spoken to in plain HTTP."""

from __future__ import annotations

import pytest
from modelherd.storage.sources.origins import HostPolicy, host_port, is_loopback, is_node_local, origin


@pytest.mark.parametrize(
    ("url", "want"),
    [("https://Hub.Example.com/api", ("https", "hub.example.com", 443)),
     ("http://hub.example.com:80/x", ("http", "hub.example.com", 80)),
     ("https://[::1]:8443/", ("https", "::1", 8443)),
     ("https://user:pw@cdn.example.com/f", ("https", "cdn.example.com", 443)),
     ("https://hub.example.com:99999/", ("https", "hub.example.com", -1))],
)
def test_the_origin_of_a_url_fills_in_the_default_port(url: str, want: tuple[str, str, int]) -> None:
    assert origin(url) == want


def test_an_unreadable_port_is_never_the_same_origin_as_a_real_one() -> None:
    assert origin("https://a.example.com:x/") != origin("https://a.example.com/")
    assert host_port("a.example.com:http") == ("a.example.com", -1)


def test_loopback_is_judged_by_the_text_alone() -> None:
    for host in ("localhost", "LOCALHOST.", "x.localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("example.com", "10.0.0.1", "0.0.0.0", "::", "localhost.example.com", "128.0.0.1",
                 "evil.localhost.io", "169.254.169.254"):
        assert not is_loopback(host), host


@pytest.mark.parametrize(
    ("netloc", "listed", "allowed"),
    [("127.0.0.1:5000", (), True), ("localhost", (), True), ("[::1]:5000", (), True), ("127.8.9.1", (), True),
     ("reg.io", (), False), ("reg.io:5000", ("reg.io",), True), ("reg.io:5000", ("reg.io:5001",), False),
     ("reg.io:5000", ("http://reg.io:5000/",), True), ("evil.localhost.io", (), False), ("10.0.0.1", (), False),
     ("", ("",), False)],
)
def test_plain_http_goes_to_loopback_and_listed_hosts_when_the_caller_trusts_loopback(
        netloc: str, listed: tuple[str, ...], allowed: bool) -> None:
    assert HostPolicy.of(listed).allows("http", netloc) is allowed


@pytest.mark.parametrize(
    ("netloc", "listed", "allowed"),
    [("127.0.0.1:5000", (), False), ("localhost:8080", (), False), ("[::1]", (), False), ("x.localhost", (), False),
     ("127.0.0.1:5000", ("127.0.0.1:5000",), True), ("127.0.0.1:10255", ("127.0.0.1:5000",), False),
     ("127.0.0.1:10255", ("127.0.0.1",), True), ("169.254.169.254", (), False), ("0.0.0.0:8080", (), False),
     ("reg.io:5000", ("reg.io",), True)],
)
def test_a_caller_that_does_not_trust_loopback_speaks_plain_http_only_to_listed_hosts(
        netloc: str, listed: tuple[str, ...], allowed: bool) -> None:
    assert HostPolicy.of(listed, loopback=False).allows("http", netloc) is allowed


def test_node_local_hosts_are_loopback_link_local_and_unspecified() -> None:
    for host in ("127.0.0.1", "localhost", "169.254.169.254", "[fe80::1]", "0.0.0.0", "::", "[::1]"):
        assert is_node_local(host), host
    for host in ("10.0.0.1", "192.168.1.1", "registry.example.com", "2001:db8::1"):
        assert not is_node_local(host), host


@pytest.mark.parametrize("netloc", ["127.0.0.1:10250", "localhost", "169.254.169.254", "[::1]:443", "0.0.0.0:8080"])
def test_without_trust_no_node_local_host_is_reached_even_over_https(netloc: str) -> None:
    policy = HostPolicy(loopback=False)
    assert not policy.allows("https", netloc)
    assert "this node's own address" in (policy.refusal("https", netloc) or "")
    assert HostPolicy.of([netloc], loopback=False).allows("https", netloc), "unless the operator lists it"


def test_https_goes_to_any_other_host_and_the_cli_trusts_loopback() -> None:
    for policy in (HostPolicy(), HostPolicy(loopback=False)):
        assert policy.allows("https", "registry.example.com")
        assert policy.allows("https", "10.1.2.3:5000")
        assert not policy.allows("https", "")
    assert HostPolicy().allows("https", "127.0.0.1:10250")
    assert not HostPolicy().allows("http", "169.254.169.254"), "link-local is not loopback: never plain unlisted"


def test_the_refusal_hint_says_who_may_list_a_host() -> None:
    assert "operator" in HostPolicy(loopback=False).hint()
    assert "https://" in HostPolicy().hint()
