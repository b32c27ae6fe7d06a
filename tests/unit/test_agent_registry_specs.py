"""BaseModels of OCI registry artifacts and plain HTTP(S) folders, and the credential chain that serves them:
the model's own ``dockerconfigjson`` Secret, the agent's own docker config only where ambient credentials are
allowed, an HTTP bearer token only from the model's own Secret or spec (never an agent's)."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from modelherd.agent import logredact
from modelherd.agent.basemodels import SpecPolicy, model_spec
from modelherd.agent.kube.secrets import SecretKeyMissingError
from modelherd.agent.lifecycle.credentials import http_token, registry_auth
from modelherd.agent.settings import Settings
from modelherd.storage.dockerauth import credentials_for
from modelherd.storage.errors import ConfigError
from pydantic import SecretStr

PASSWORD = "registry-Pa55word-xyz"
BASIC = base64.b64encode(f"bot:{PASSWORD}".encode()).decode()
CONFIG = {"auths": {"harbor.corp": {"auth": BASIC}, "https://mirror.corp:8443/v1/": {"username": "m",
                                                                                      "password": "mirror-Pa55word"}}}
DIGEST = "sha256:" + "ab" * 32


def cr(uri: str, *, kind: str = "BaseModel", **storage: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "m", "uid": "u"}
    if kind == "BaseModel":
        meta["namespace"] = "team"
    return {"kind": kind, "metadata": meta, "spec": {"storage": {"storageUri": uri, **storage}}}


@pytest.mark.parametrize(("uri", "scheme", "rel"), [
    ("oci://harbor.corp/org/llama:v1", "oci-registry", "org/llama"),
    (f"oci://localhost:5000/org/llama@{DIGEST}", "oci-registry", "org/llama"),
    ("oci://n/ns/b/bucket/o/org/llama", "oci", "org/llama"),
    ("ocios://n/ns/b/bucket/o/org/llama", "oci", "org/llama"),
    ("https://models.corp/org/llama/", "https", "models.corp/org/llama"),
    ("http://127.0.0.1:8000/org/llama/", "http", "127.0.0.1/org/llama"),
])
def test_registry_and_http_uris_are_accepted_with_a_default_path(tmp_path: Path, uri: str, scheme: str,
                                                                   rel: str) -> None:
    spec = model_spec(cr(uri), tmp_path)
    assert spec.problem == "" and spec.uri is not None and spec.uri.scheme == scheme
    assert spec.dest == tmp_path.resolve() / rel


@pytest.mark.parametrize("uri", ["oci://myregistry/model:v1", "oci://harbor.corp/Org/Model:v1",
                                 "oci://harbor.corp/org/model", "https://models.corp/no-trailing-slash",
                                 "https://user:pw@models.corp/x/"])
def test_ambiguous_or_malformed_registry_and_http_uris_are_the_models_problem(tmp_path: Path, uri: str) -> None:
    spec = model_spec(cr(uri), tmp_path)
    assert spec.problem and spec.dest is None
    assert "user:pw" not in spec.problem, "credentials in a URL are never quoted (the problem reaches Events)"


def test_ambient_is_for_cluster_models_and_opted_in_namespaces_only(tmp_path: Path) -> None:
    uri = "oci://harbor.corp/org/m:v1"
    assert model_spec(cr(uri, kind="ClusterBaseModel"), tmp_path).ambient
    assert not model_spec(cr(uri), tmp_path).ambient
    assert model_spec(cr(uri), tmp_path, SpecPolicy(ambient_namespaces=frozenset({"team"}))).ambient


class Secrets:
    def __init__(self, data: dict[tuple[str, str], dict[str, str]]) -> None:
        self.data, self.reads = data, []  # type: ignore[var-annotated]

    def __call__(self, namespace: str, name: str, key: str) -> str:
        self.reads.append((namespace, name, key))
        try:
            return self.data[(namespace, name)][key]
        except KeyError:
            raise SecretKeyMissingError(f"Secret {namespace}/{name} has no key {key!r}") from None


@pytest.fixture
def ambient(tmp_path: Path) -> Path:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(CONFIG))
    return path


def test_a_models_dockerconfigjson_secret_in_its_own_namespace_wins(tmp_path: Path, ambient: Path) -> None:
    mine = {"auths": {"harbor.corp": {"username": "team-bot", "password": "team-Pa55word-1"}}}
    read = Secrets({("team", "regcred"): {".dockerconfigjson": json.dumps(mine)}})
    spec = model_spec(cr("oci://harbor.corp/org/m:v1", key="regcred"), tmp_path)
    config = registry_auth(spec, namespace="agents", read_secret=read, ambient=ambient)
    assert config is not None
    creds = credentials_for(config, "harbor.corp")
    assert creds is not None and creds.username == "team-bot"
    assert read.reads == [("team", "regcred", ".dockerconfigjson")]


def test_a_cluster_models_secret_is_read_in_the_agents_namespace_and_dockercfg_is_accepted(tmp_path: Path) -> None:
    legacy = {"harbor.corp": {"auth": BASIC}}
    read = Secrets({("agents", "old"): {".dockercfg": json.dumps(legacy)}})
    spec = model_spec(cr("oci://harbor.corp/org/m:v1", kind="ClusterBaseModel", key="old"), tmp_path)
    config = registry_auth(spec, namespace="agents", read_secret=read, ambient=None)
    assert config is not None
    creds = credentials_for(config, "harbor.corp")
    assert creds is not None and creds.password == PASSWORD
    assert read.reads == [("agents", "old", ".dockerconfigjson"), ("agents", "old", ".dockercfg")]


def test_the_agents_own_docker_config_serves_only_ambient_models(tmp_path: Path, ambient: Path) -> None:
    uri = "oci://harbor.corp/org/m:v1"
    tenant = model_spec(cr(uri), tmp_path)
    assert registry_auth(tenant, namespace="agents", read_secret=Secrets({}), ambient=ambient) is None
    platform = model_spec(cr(uri, kind="ClusterBaseModel"), tmp_path)
    config = registry_auth(platform, namespace="agents", read_secret=Secrets({}), ambient=ambient)
    assert config is not None and credentials_for(config, "harbor.corp") is not None
    assert registry_auth(None, namespace="x", read_secret=None, ambient=ambient) == CONFIG  # the CLI
    assert registry_auth(None, namespace="x", read_secret=None, ambient=None) is None


def test_a_malformed_secret_is_a_config_error_that_quotes_no_credential(tmp_path: Path) -> None:
    broken = '{"auths": {"harbor.corp": {"auth": "' + PASSWORD + '"'  # not JSON
    read = Secrets({("team", "regcred"): {".dockerconfigjson": broken}})
    spec = model_spec(cr("oci://harbor.corp/org/m:v1", key="regcred"), tmp_path)
    with pytest.raises(ConfigError) as info:
        registry_auth(spec, namespace="agents", read_secret=read, ambient=None)
    assert "team/regcred" in info.value.message and PASSWORD not in info.value.message + (info.value.hint or "")


def test_every_registry_credential_is_redacted_from_logs(tmp_path: Path, ambient: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    platform = model_spec(cr("oci://harbor.corp/org/m:v1", kind="ClusterBaseModel"), tmp_path)
    registry_auth(platform, namespace="agents", read_secret=None, ambient=ambient)
    handler = logging.StreamHandler()
    logredact.install([handler])
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "leak %s %s %s", (PASSWORD, BASIC, "mirror-Pa55word"),
                               None)
    for f in handler.filters:
        f.filter(record)
    text = record.getMessage()
    assert PASSWORD not in text and BASIC not in text and "mirror-Pa55word" not in text


def test_http_token_comes_from_the_models_secret_or_spec_never_the_agent(tmp_path: Path) -> None:
    read = Secrets({("team", "web"): {"token": "web-Token-0123456789"}})
    uri = "https://models.corp/org/m/"
    with_secret = model_spec(cr(uri, key="web"), tmp_path)
    assert http_token(with_secret, namespace="a", read_secret=read, ambient=None) == "web-Token-0123456789"
    inline = model_spec(cr(uri, parameters={"token": "inline-Token-0123"}), tmp_path)
    assert http_token(inline, namespace="a", read_secret=read, ambient=None) == "inline-Token-0123"
    cluster = model_spec(cr(uri, kind="ClusterBaseModel"), tmp_path)
    assert http_token(cluster, namespace="a", read_secret=read, ambient=SecretStr("agent-Token-0123")) is None
    assert http_token(None, namespace="a", read_secret=None, ambient=SecretStr("cli-Token-01234")) == \
        "cli-Token-01234"


def test_settings_read_registry_and_http_knobs_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                    ambient: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(ambient))
    monkeypatch.setenv("MODELHERD_INSECURE_REGISTRIES", "registry.lab:5000, other.lab")
    monkeypatch.setenv("MODELHERD_REGISTRY_MIRRORS", '{"docker.io": "harbor.corp/hub"}')
    monkeypatch.setenv("MODELHERD_HTTP_INSECURE_HOSTS", '["models.lab"]')
    t = Settings().transfer
    assert t.registry_auth_file == ambient
    assert t.insecure_registries == ("registry.lab:5000", "other.lab")
    assert dict(t.registry_mirrors) == {"docker.io": "harbor.corp/hub"}
    assert t.http_insecure_hosts == ("models.lab",)
    assert Settings(registry_mirrors=["a.io=m.io", "b.io=n.io/p"]).registry_mirrors == {"a.io": "m.io",
                                                                                          "b.io": "n.io/p"}
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))
    # a named config that is missing is kept as named (a registry pull then says so); other commands still work
    assert Settings().transfer.registry_auth_file == tmp_path / "empty" / "config.json"
    monkeypatch.delenv("DOCKER_CONFIG")
    assert Settings().transfer.registry_auth_file is None
