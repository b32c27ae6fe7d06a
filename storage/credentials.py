"""Credentials are checked and redacted here.

Invariant: no message modelherd builds about a credential quotes any part of it. :func:`check_token` lets
through only a value that can travel in an HTTP header as it is (one line of printable ASCII, no spaces, at
most :data:`MAX_TOKEN_LENGTH` characters) and refuses anything else with a :class:`~.errors.ConfigError` that
names where the value came from and its length, never the value; :func:`redact` removes every form in which a
secret can reach a message (raw, ``repr()``- and JSON-escaped, percent-encoded, and each line of a multi-line
secret that is long enough to identify it) from text that may hold one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

from .errors import ConfigError

MAX_TOKEN_LENGTH = 4096
MIN_LINE_LENGTH = 8  # a line of a multi-line secret this long is redacted on its own (a fragment of a PEM block)
REDACTED = "***"

_TOKEN_HINT = ("put only the token there: one line like hf_..., without spaces or line breaks; a private key, "
               "a certificate or a whole file is not a token")


def _unsafe_kinds(value: str) -> list[str]:
    """The kinds of character that make ``value`` unusable in an HTTP header, in words (none: ``[]``)."""
    bad = {c for c in value if not "\x21" <= c <= "\x7e"}
    kinds = {"a line break": any(c in "\r\n" for c in bad), "a space": " " in bad,
             "a control character": any((c < "\x20" and c not in "\r\n") or "\x7f" <= c <= "\x9f" for c in bad),
             "a non-ASCII character": any(c > "\x9f" for c in bad)}
    return [kind for kind, found in kinds.items() if found]


def check_token(value: str, *, what: str) -> str:
    """``value`` without surrounding whitespace, or :class:`ConfigError` when it cannot be a bearer token.

    Refused: empty (after stripping), longer than :data:`MAX_TOKEN_LENGTH` characters, or holding a character
    outside 0x21-0x7E (a line break, space, control or non-ASCII character). The message names ``what`` (where the
    value came from, e.g. ``"Secret team-a/hf (spec.storage.key) key 'token'"``) and the length; it never
    holds any part of the value.
    """
    token = value.strip()
    if not token:
        raise ConfigError(f"{what} is empty", hint=_TOKEN_HINT)
    if len(token) > MAX_TOKEN_LENGTH:
        raise ConfigError(f"{what} is not a token: {len(token)} characters, more than {MAX_TOKEN_LENGTH}",
                          hint=_TOKEN_HINT)
    kinds = _unsafe_kinds(token)
    if kinds:
        raise ConfigError(f"{what} is not a token: its {len(token)} characters include {' and '.join(kinds)}",
                          hint=_TOKEN_HINT)
    return token


def _escaped_forms(piece: str) -> set[str]:
    """``piece`` as ``repr()`` (str, and bytes of its UTF-8: both quoting styles), JSON and percent-encoding
    write it inside a longer text."""
    data = piece.encode("utf-8", "surrogatepass")
    escaped = {
        piece,
        repr(piece)[1:-1],
        repr(piece + "'\"")[1:-4],  # quoted with ', so a ' inside is escaped
        repr(data)[2:-1],
        repr(data + b"'\"")[2:-4],
    }
    forms = set(escaped)
    for form in escaped:
        forms.add(json.dumps(form)[1:-1])
        forms.add(json.dumps(form, ensure_ascii=False)[1:-1])
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate: no URL can hold it
        forms.update((quote(piece, safe=""), quote(piece), quote_plus(piece)))
    return forms


@functools.lru_cache(maxsize=64)
def _pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex matching every form of every secret, longest first (a line never splits a whole secret)."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        pieces = {secret, secret.strip()}
        lines = secret.splitlines()
        if len(lines) > 1:
            pieces.update(line.strip() for line in lines if len(line.strip()) >= MIN_LINE_LENGTH)
        for piece in pieces:
            if piece:
                forms.update(_escaped_forms(piece))
    forms.discard("")
    if not forms:
        return None
    return re.compile("|".join(re.escape(f) for f in sorted(forms, key=lambda f: (-len(f), f))))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every form of each secret replaced by :data:`REDACTED`.

    Forms: raw (so ``"Bearer <secret>"`` too), ``repr()``-escaped (str and bytes, ``\\n`` as backslash-n),
    JSON-escaped, percent-encoded (``quote``/``quote_plus``), and each line of a multi-line secret that is at least
    :data:`MIN_LINE_LENGTH` characters long. Empty secrets are ignored.
    """
    pattern = _pattern(tuple(sorted({s for s in secrets if s})))
    return pattern.sub(REDACTED, text) if pattern is not None else text
