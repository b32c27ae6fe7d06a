"""The one credential chain of a pull, for the node agent and the CLI: Hugging Face tokens, registry credentials
(docker configs) and bearer tokens of plain HTTP(S) folders.

:func:`hf_token` (huggingface_hub's ``get_token()`` style) asks a named chain of sources, first answer wins:

    1. the Secret named by ``spec.storage.key``, key ``spec.storage.parameters.secretKey`` (default ``token``), in
       the model's namespace (a ClusterBaseModel: the agent's);
    2. the CR's inline ``spec.storage.parameters.token``;
    3. the agent's own ``HF_TOKEN`` (``ambient``): for the CLI (no spec), or a model allowed the agent's
       credentials (:attr:`~modelherd.agent.basemodels.ModelSpec.ambient`); otherwise no token.

:func:`registry_auth` (``oci://REGISTRY/REPO:TAG``) answers a docker config:

    1. the ``kubernetes.io/dockerconfigjson`` Secret named by ``spec.storage.key`` (key ``.dockerconfigjson``, else
       a ``kubernetes.io/dockercfg`` Secret's ``.dockercfg``) in the model's namespace (a ClusterBaseModel: the
       agent's) — the same Secret as an imagePullSecret;
    2. the agent's own docker config file (``registry_auth_file``, ambient): for the CLI, or a model allowed the
       agent's credentials; otherwise none (anonymous). Each host of a docker config gets only its own entry.

:func:`http_token` (``https://HOST/PATH/``): the Secret's key (``parameters.secretKey``, default ``token``), else
the inline ``parameters.token``; the CLI's own ``MODELHERD_HTTP_TOKEN``, but never an agent's: the URL is the CR's
choice, so an ambient token would go to whatever host a CR names.

Invariants: every value is checked to be one printable line (:func:`~modelherd.storage.credentials.check_token`)
and registered for redaction before it is returned; no message quotes a value, only where it came from; a
failing source is a :class:`~modelherd.storage.errors.ConfigError` that says what to fix (never a silent fall
through to the next source). Credentials are read per pull and never stored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from ...storage.credentials import check_token
from ...storage.dockerauth import credentials_for, load_docker_config
from ...storage.errors import ConfigError
from ..basemodels import ModelSpec
from ..kube.secrets import SecretKeyMissingError, describe_key
from ..logredact import register_secret

DOCKERCONFIGJSON_KEY = ".dockerconfigjson"
DOCKERCFG_KEY = ".dockercfg"

ReadSecret = Callable[[str, str, str], str]
"""``(namespace, name, key) -> text``: one key of a Secret, decoded — agent/kube/secrets.py ``read_secret_key`` bound
to the agent's client. Every failure is a ``SecretError`` (a :class:`ConfigError` naming the Secret and key, with
a hint)."""


def hf_token(spec: ModelSpec | None, *, namespace: str, read_secret: ReadSecret | None,
             ambient: SecretStr | None) -> str | None:
    """The token for a pull of ``spec`` (``None``: the CLI's own pull), or ``None`` to go anonymous.
    ``namespace`` is the agent's (where a ClusterBaseModel's Secret lives)."""
    if spec is None:
        return None if ambient is None else _checked(ambient.get_secret_value(), "the Hugging Face token (HF_TOKEN)")
    if spec.secret_name:
        ns = spec.ref.namespace or namespace
        if read_secret is None:
            raise ConfigError(f"Secret {ns}/{spec.secret_name} (spec.storage.key) cannot be read without a "
                              "Kubernetes client", hint="run the pull in the node agent")
        value = read_secret(ns, spec.secret_name, spec.secret_key)
        return _checked(value, describe_key(ns, spec.secret_name, spec.secret_key))
    if spec.inline_token:
        return _checked(spec.inline_token, "spec.storage.parameters.token")
    if ambient is None or not spec.ambient:
        return None
    return check_token(ambient.get_secret_value(), what="the agent's HF_TOKEN")


def _checked(value: str, what: str) -> str:
    register_secret(value)
    return check_token(value, what=what)


def registry_auth(spec: ModelSpec | None, *, namespace: str, read_secret: ReadSecret | None,
                  ambient: Path | None) -> Mapping[str, Any] | None:
    """The docker config for a registry pull of ``spec`` (``None``: the CLI's own pull), or ``None`` to go
    anonymous. ``ambient`` is the agent's/CLI's own docker config file. Every credential in it is registered for
    redaction before it is returned."""
    if spec is not None and spec.secret_name:
        ns = spec.ref.namespace or namespace
        if read_secret is None:
            raise ConfigError(f"Secret {ns}/{spec.secret_name} (spec.storage.key) cannot be read without a "
                              "Kubernetes client", hint="run the pull in the node agent")
        try:
            text = read_secret(ns, spec.secret_name, DOCKERCONFIGJSON_KEY)
            register_secret(text)
            config = load_docker_config(text.strip() or "{}")
        except SecretKeyMissingError:
            text = read_secret(ns, spec.secret_name, DOCKERCFG_KEY)  # the legacy kind: the auths map itself
            register_secret(text)
            config = {"auths": load_docker_config(text.strip() or "{}")}
        except ConfigError as e:
            raise ConfigError(f"{describe_key(ns, spec.secret_name, DOCKERCONFIGJSON_KEY)}: {e.message}",
                              hint="make it a kubernetes.io/dockerconfigjson Secret (kubectl create secret "
                                   "docker-registry NAME --docker-server=HOST ...)") from None
        return _registered(config)
    if ambient is None or (spec is not None and not spec.ambient):
        return None
    return _registered(load_docker_config(ambient))


def _registered(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` after every credential of every registry in it went to the log filter."""
    auths = config.get("auths")
    for host in auths if isinstance(auths, Mapping) else ():
        if isinstance(host, str):
            creds = credentials_for(config, host)
            for value in creds.secrets if creds else ():
                register_secret(value)
    return config


def http_token(spec: ModelSpec | None, *, namespace: str, read_secret: ReadSecret | None,
               ambient: SecretStr | None) -> str | None:
    """The bearer token for an ``https://`` folder of ``spec`` (``None``: the CLI's pull, which may use
    ``ambient``), or ``None``. An agent never sends its own token to a URL a CR names."""
    if spec is None:
        return None if ambient is None else _checked(ambient.get_secret_value(),
                                                     "the HTTP token (MODELHERD_HTTP_TOKEN)")
    if spec.secret_name:
        ns = spec.ref.namespace or namespace
        if read_secret is None:
            raise ConfigError(f"Secret {ns}/{spec.secret_name} (spec.storage.key) cannot be read without a "
                              "Kubernetes client", hint="run the pull in the node agent")
        return _checked(read_secret(ns, spec.secret_name, spec.secret_key),
                        describe_key(ns, spec.secret_name, spec.secret_key))
    if spec.inline_token:
        return _checked(spec.inline_token, "spec.storage.parameters.token")
    return None
