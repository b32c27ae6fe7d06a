"""Registry credentials from a docker config JSON (``~/.docker/config.json``, a ``kubernetes.io/dockerconfigjson``
Secret's ``.dockerconfigjson``), and where the CLI finds that file.

Invariants:
- pure: nothing here reads the environment; :func:`auth_file_path` is handed the environment mapping and the home
  folder (only ``agent/settings.py`` reads the environment for modelherd's knobs), and a config is parsed from a
  dict or a path the caller names;
- no message built here quotes a credential: errors name the file (or "the docker config"), the registry and the
  field, never a value; :class:`RegistryCredentials` has a ``repr`` that shows which kinds of secret it holds only;
- a registry is matched by its host[:port] alone, the way docker does (``https://host/v1/``, ``http://host`` and
  ``host`` are one key; ``docker.io`` is ``https://index.docker.io/v1/``): credentials are never handed to another
  host.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = ["RegistryCredentials", "auth_file_path", "credentials_for", "load_docker_config", "registry_key"]

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a docker config is a few KiB; a bigger file is not one
DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
_HINT = ("the docker config's 'auths' map holds, per registry, {\"auth\": base64(\"user:password\")} or "
         "{\"username\": ..., \"password\": ...} or {\"identitytoken\": ...}; run `docker login` or `oras login`")


@dataclass(frozen=True)
class RegistryCredentials:
    """What to present to one registry: a user and password (basic, or basic to its token endpoint), or an
    identity token (an OAuth2 refresh token for its token endpoint), or a registry token (sent as a bearer)."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        kinds = [k for k, v in (("password", self.password), ("identitytoken", self.identity_token),
                                ("registrytoken", self.registry_token)) if v]
        return f"RegistryCredentials(username={self.username!r}, {'+'.join(kinds) or 'nothing'})"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for :func:`~.credentials.redact`."""
        return tuple(s for s in (self.password, self.identity_token, self.registry_token,
                                 self._basic_value()) if s)

    def _basic_value(self) -> str:
        if not (self.username or self.password):
            return ""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def basic_header(self) -> str | None:
        """``Basic base64(user:password)``, or ``None`` without a user and password."""
        return f"Basic {self._basic_value()}" if self.username and self.password else None


def auth_file_path(environ: Mapping[str, str], home: Path) -> Path | None:
    """The docker config the CLI reads, first that exists: ``$REGISTRY_AUTH_FILE`` (podman, skopeo, oras),
    ``$DOCKER_CONFIG/config.json``, ``HOME/.docker/config.json``; ``None`` when none does (anonymous pulls).

    A ``REGISTRY_AUTH_FILE`` or ``DOCKER_CONFIG`` that names a missing file is a :class:`ConfigError`: the user
    asked for that file, silently pulling anonymously would hide the typo.
    """
    if named := environ.get("REGISTRY_AUTH_FILE"):
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(f"REGISTRY_AUTH_FILE names {path}, which is not a file",
                              hint="point REGISTRY_AUTH_FILE at a docker config JSON, or unset it")
        return path
    if folder := environ.get("DOCKER_CONFIG"):
        path = Path(folder).expanduser() / "config.json"
        if not path.is_file():
            raise ConfigError(f"DOCKER_CONFIG names {folder}, which holds no config.json",
                              hint="point DOCKER_CONFIG at the folder of a docker config.json, or unset it")
        return path
    path = home / ".docker" / "config.json"
    return path if path.is_file() else None


def load_docker_config(source: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    """A docker config as a mapping: ``source`` itself when it is one, else the JSON file at that path (or, for a
    ``str`` that starts with ``{``, the JSON text itself: a Secret's ``.dockerconfigjson`` value)."""
    if isinstance(source, Mapping):
        return source
    where = "the docker config"
    try:
        if isinstance(source, str) and source.lstrip().startswith("{"):
            text = source
        else:
            where = f"docker config {source}"
            with open(Path(source).expanduser(), "rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES} bytes", hint=_HINT)
            text = data.decode("utf-8")
        doc = json.loads(text)
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror or type(e).__name__}",
                          hint="check the path and its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # the parser's message may quote the text around the error: a credential
        raise ConfigError(f"{where} is not valid JSON", hint=_HINT) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} is not a JSON object", hint=_HINT)
    return doc


def registry_key(key: str) -> str:
    """An ``auths`` key as the lower-case ``host[:port]`` it stands for (``https://h:5000/v1/`` -> ``h:5000``);
    every Docker Hub spelling is ``docker.io``."""
    key = key.strip()
    host = urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    host = host.lower()
    return "docker.io" if host in DOCKER_HUB_KEYS else host


def credentials_for(config: Mapping[str, Any], registry: str) -> RegistryCredentials | None:
    """The credentials ``config`` holds for ``registry`` (``host[:port]``), or ``None`` (anonymous).

    Reads the ``auths`` map: ``auth`` (base64 ``user:password``; ``username``/``password`` fields win when both
    are set), ``identitytoken``, ``registrytoken``. Credential helpers (``credHelpers``, ``credsStore``) are not
    run: their credentials are not in the file, which is said in a warning (naming the registry only).
    """
    want = registry_key(registry)
    auths = config.get("auths", {})
    if not isinstance(auths, Mapping):
        raise ConfigError("the docker config's 'auths' is not an object", hint=_HINT)
    entry: Any = None
    for key, value in auths.items():
        if isinstance(key, str) and registry_key(key) == want:
            entry = value
            break
    if entry is None:
        helpers = config.get("credHelpers")
        if (isinstance(helpers, Mapping) and any(isinstance(k, str) and registry_key(k) == want for k in helpers)) \
                or config.get("credsStore"):
            log.warning("the docker config names a credential helper for %s; modelherd does not run credential "
                        "helpers, so it pulls anonymously (put the credentials in 'auths', e.g. with a "
                        "kubernetes.io/dockerconfigjson Secret)", want)
        return None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"the docker config's entry for {want} is not an object", hint=_HINT)
    username, password = _text(entry, "username", want), _text(entry, "password", want)
    if (auth := _text(entry, "auth", want)) and not (username and password):
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ConfigError(f"the docker config's 'auth' for {want} is not base64 of user:password",
                              hint=_HINT) from None
        user, sep, pw = decoded.partition(":")
        if not sep:
            raise ConfigError(f"the docker config's 'auth' for {want} has no ':' between user and password",
                              hint=_HINT)
        username, password = user, pw
    creds = RegistryCredentials(username=username, password=password,
                                identity_token=_text(entry, "identitytoken", want),
                                registry_token=_text(entry, "registrytoken", want))
    if not (creds.password or creds.identity_token or creds.registry_token):
        return None
    return creds


def _text(entry: Mapping[str, Any], key: str, registry: str) -> str:
    value = entry.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"the docker config's {key!r} for {registry} is not a string", hint=_HINT)
    if any(c in value for c in "\r\n\x00"):
        raise ConfigError(f"the docker config's {key!r} for {registry} holds a line break or NUL", hint=_HINT)
    return value
