"""The one Hugging Face token chain, for the node agent and the CLI (huggingface_hub's ``get_token()`` style).

:func:`hf_token` asks a named chain of sources, first answer wins:

    1. the Secret named by ``spec.storage.key``, key ``spec.storage.parameters.secretKey`` (default ``token``), in
       the model's namespace (a ClusterBaseModel: the agent's);
    2. the CR's inline ``spec.storage.parameters.token``;
    3. the agent's own ``HF_TOKEN`` (``ambient``): for the CLI (no spec), or a model allowed the agent's
       credentials (:attr:`~modelherd.agent.basemodels.ModelSpec.ambient`); otherwise no token.

Invariants: every value is checked to be one printable line (:func:`~modelherd.storage.credentials.check_token`)
and registered for redaction before it is returned; no message quotes a value, only where it came from; a
failing source is a :class:`~modelherd.storage.errors.ConfigError` that says what to fix (never a silent fall
through to the next source). Credentials are read per pull and never stored.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import SecretStr

from ...storage.credentials import check_token
from ...storage.errors import ConfigError
from ..basemodels import ModelSpec
from ..kube.secrets import describe_key
from ..logredact import register_secret

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
