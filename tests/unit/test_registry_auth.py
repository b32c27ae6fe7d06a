"""Registry credentials (storage/dockerauth.py), WWW-Authenticate parsing and the token realm's plain-HTTP rule:
no network."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import urllib3
from modelherd.storage.dockerauth import (
    RegistryCredentials,
    auth_file_path,
    credentials_for,
    load_docker_config,
    registry_key,
)
from modelherd.storage.errors import AuthError, ConfigError
from modelherd.storage.sources.origins import HostPolicy
from modelherd.storage.sources.registry_auth import Authorizer, parse_challenge

SECRET = "pa:ss w0rd-Secret"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_auth_file_order_is_registry_auth_file_then_docker_config_then_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert auth_file_path({}, home) is None
    in_home = write(home / ".docker" / "config.json", {})
    assert auth_file_path({}, home) == in_home
    docker_dir = write(tmp_path / "dc" / "config.json", {})
    assert auth_file_path({"DOCKER_CONFIG": str(tmp_path / "dc")}, home) == docker_dir
    named = write(tmp_path / "auth.json", {})
    assert auth_file_path({"REGISTRY_AUTH_FILE": str(named), "DOCKER_CONFIG": str(tmp_path / "dc")}, home) == named


@pytest.mark.parametrize("env", [{"REGISTRY_AUTH_FILE": "/nonexistent/auth.json"}, {"DOCKER_CONFIG": "/nonexistent"}])
def test_a_named_auth_file_that_is_missing_is_a_config_error(env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        auth_file_path(env, tmp_path)


@pytest.mark.parametrize("key", ["h.io:5000", "https://h.io:5000", "http://h.io:5000/v1/", "H.IO:5000"])
def test_credentials_are_found_under_any_spelling_of_the_registry(key: str) -> None:
    creds = credentials_for({"auths": {key: {"auth": b64(f"alice:{SECRET}")}}}, "h.io:5000")
    assert creds == RegistryCredentials(username="alice", password=SECRET)
    assert credentials_for({"auths": {key: {"auth": b64("a:b")}}}, "h.io") is None  # another port: not ours
    assert credentials_for({"auths": {key: {"auth": b64("a:b")}}}, "evil.io:5000") is None


def test_docker_hub_spellings_are_one_registry() -> None:
    config = {"auths": {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}}
    assert credentials_for(config, "docker.io") == RegistryCredentials(username="u", password="p")
    assert registry_key("registry-1.docker.io") == "docker.io"


def test_username_password_identity_and_registry_tokens() -> None:
    config = {"auths": {"a.io": {"username": "u", "password": "p", "auth": b64("x:y")},
                        "b.io": {"identitytoken": "refresh-tok"},
                        "c.io": {"registrytoken": "bearer-tok"},
                        "d.io": {}}}
    assert credentials_for(config, "a.io") == RegistryCredentials(username="u", password="p")
    assert credentials_for(config, "b.io") == RegistryCredentials(identity_token="refresh-tok")
    assert credentials_for(config, "c.io") == RegistryCredentials(registry_token="bearer-tok")
    assert credentials_for(config, "d.io") is None
    assert credentials_for({}, "a.io") is None


@pytest.mark.parametrize("entry", [{"auth": "!!not base64!!" + SECRET}, {"auth": b64("no-colon-Secret-x")},
                                   {"password": 5}, {"password": SECRET + "\n"}, "not an object"])
def test_malformed_entries_are_config_errors_that_quote_no_secret(entry: object) -> None:
    with pytest.raises(ConfigError) as ei:
        credentials_for({"auths": {"h.io": entry}}, "h.io")
    assert SECRET not in str(ei.value) and "no-colon-Secret-x" not in str(ei.value)


def test_a_config_that_is_not_json_is_refused_without_quoting_it(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"auths": {"h.io": {"auth": "' + SECRET + '"')
    with pytest.raises(ConfigError) as ei:
        load_docker_config(bad)
    assert SECRET not in str(ei.value)
    with pytest.raises(ConfigError):
        load_docker_config(tmp_path / "missing.json")
    assert load_docker_config('{"auths": {}}') == {"auths": {}}
    assert load_docker_config(write(tmp_path / "ok.json", {"auths": {}})) == {"auths": {}}


def test_credentials_repr_and_secrets() -> None:
    creds = RegistryCredentials(username="alice", password=SECRET, identity_token="idtok-123")
    assert SECRET not in repr(creds) and "idtok-123" not in repr(creds)
    assert SECRET in creds.secrets and "idtok-123" in creds.secrets
    assert creds.basic_header() == f"Basic {b64('alice:' + SECRET)}"
    assert b64("alice:" + SECRET) in creds.secrets


def test_credential_helpers_are_not_run(caplog: pytest.LogCaptureFixture) -> None:
    assert credentials_for({"credHelpers": {"h.io": "ecr-login"}}, "h.io") is None
    assert "credential helper" in caplog.text


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        ('Bearer realm="https://auth.io/token",service="registry.io",scope="repository:a/b:pull"', "bearer",
         {"realm": "https://auth.io/token", "service": "registry.io", "scope": "repository:a/b:pull"}),
        ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
        ('bearer realm=https://x/t, service=s, error="insufficient_scope"', "bearer",
         {"realm": "https://x/t", "service": "s", "error": "insufficient_scope"}),
        ('Bearer realm="a\\"b"', "bearer", {"realm": 'a"b'}),
        ("", "", {}),
    ],
)
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    assert parse_challenge(header) == (scheme, params)


class NoPool(urllib3.PoolManager):
    """A pool that fails the test if anything is sent through it."""

    def urlopen(self, *args: object, **kw: object) -> urllib3.BaseHTTPResponse:  # type: ignore[override]
        raise AssertionError(f"a request was sent: {args[:2]}")


@pytest.mark.parametrize("realm", ["http://127.0.0.1:10255/token", "http://localhost:8080/t", "http://[::1]/t",
                                   "http://169.254.169.254/latest/meta-data/", "https://127.0.0.1:10250/token",
                                   "https://169.254.169.254/t"])
def test_a_plain_http_token_realm_on_the_nodes_loopback_is_refused_unless_listed(realm: str) -> None:
    """A registry a tenant controls names a token realm on the node's own services: no request, no credentials."""
    creds = RegistryCredentials(username="u", password=SECRET)
    auth = Authorizer(registry="reg.example.com", repository="org/m", credentials=creds, pool=NoPool(),
                      hosts=HostPolicy(loopback=False), user_agent="t")
    with pytest.raises(AuthError, match=r"own address|plain http") as e:
        auth.refresh(f'Bearer realm="{realm}",service="reg"', 0, "listing")
    assert SECRET not in str(e.value) and SECRET not in (e.value.hint or "")
