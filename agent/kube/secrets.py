"""Read one key of a Secret: the one place the agent reads Secrets (a model's ``spec.storage.key``).

Invariants:
- One GET of exactly the Secret named (``namespace``/``name`` are checked path segments: a name such as
  ``../../kube-system/secrets/x`` is refused before any request).
- The decoded value never appears in an error, a log line or an exception chain; every failure is a
  :class:`SecretError` (a ``ConfigError``) whose message says which Secret and key and whose hint says what to do.
"""

from __future__ import annotations

import base64

from ...storage.errors import ConfigError
from .request import ApiError, UnsafeApiPathError, api_path, request

__all__ = [
    "SecretError",
    "SecretForbiddenError",
    "SecretKeyMissingError",
    "SecretNameError",
    "SecretNotFoundError",
    "SecretNotTextError",
    "describe_key",
    "read_secret_key",
]


class SecretError(ConfigError):
    """The Secret or its key could not be read (the message names which; the hint says what to fix)."""


class SecretNameError(SecretError):
    """The name is not a Secret name (an unsafe path segment)."""


class SecretNotFoundError(SecretError):
    """The API server answered 404."""


class SecretForbiddenError(SecretError):
    """The API server answered 403: the agent's ServiceAccount may not get Secrets there."""


class SecretKeyMissingError(SecretError):
    """The Secret has no such data key."""


class SecretNotTextError(SecretError):
    """The key's value is not base64 of UTF-8 text."""


def _where(namespace: str, name: str) -> str:
    return f"Secret {namespace}/{name}"


def describe_key(namespace: str, name: str, key: str) -> str:
    """How messages name the value: ``Secret ns/name (spec.storage.key) key 'token'`` (never the value)."""
    return f"{_where(namespace, name)} (spec.storage.key) key {key!r}"


def read_secret_key(api: object, namespace: str, name: str, key: str) -> str:
    """The decoded text of ``data[key]`` of the Secret ``namespace/name`` (named by a model's ``spec.storage.key``)."""
    where = _where(namespace, name)
    try:
        secret = request(api, "GET", api_path("api", "v1", "namespaces", namespace, "secrets", name))
    except UnsafeApiPathError:
        raise SecretNameError(f"{where} (spec.storage.key) is not a Secret name", hint="fix spec.storage.key") \
            from None
    except ApiError as e:
        if e.status == 404:
            raise SecretNotFoundError(f"{where} (spec.storage.key) does not exist",
                                      hint="create it in the model's namespace, or fix spec.storage.key") from None
        if e.status == 403:
            raise SecretForbiddenError(f"reading {where} is forbidden",
                                       hint="grant the agent get on secrets in the model's namespace "
                                            "(chart: rbac.secretNamespaces)") from None
        raise SecretError(f"reading {where} failed: {e.status}") from None
    data = secret.get("data") if isinstance(secret, dict) else None
    raw = data.get(key) if isinstance(data, dict) else None
    if not isinstance(raw, str):
        raise SecretKeyMissingError(f"{where} has no key {key!r}",
                                    hint="set spec.storage.parameters.secretKey, or add the key to the Secret")
    try:
        return base64.b64decode(raw, validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise SecretNotTextError(f"{describe_key(namespace, name, key)} is not text",
                                 hint="store the token itself in the Secret") from None
