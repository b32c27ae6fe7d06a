"""Streaming GETs to the API server (list pages, watches) over the agent's one :class:`KubeClient` pool.

:func:`request` reads a whole answer and decodes it; a watch must be read while it arrives and be cut from another
thread. :func:`open_stream` sends one such GET and hands back the open response; :func:`lines` and
:func:`watch_events` read it as newline-delimited JSON (the API server's watch encoding). The informers and the
Lease watch both stream through here.

Invariants:
- One :func:`open_stream` is one request: it goes to the client's pool with ``retries=False`` (urllib3's default
  ``Retry(3)`` would hide attempts from the caller's count and backoff), bounded by a connect and a read timeout.
  The path is checked like every other (:func:`~.request.check_path`).
- A non-200 answer never reaches the caller as a response: its Status body (at most 64 KiB) is read, the connection
  released, and :class:`ApiError` raised with the status, the server's message and ``Retry-After``. A connection
  failure is ``ApiError`` status 0 whose ``reason`` is the exception's type name (never a URL or a token).
- The caller owns a returned response: it reads it, then releases it (fully read) or closes it (cut short).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import urllib3

from .client import transport
from .request import JSON, REQUESTS, ApiError, action_of, check_path

__all__ = ["lines", "open_stream", "watch_events"]

_MAX_ERROR_BODY = 64 * 1024


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("Retry-After") if headers is not None else None
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def _error_of(resp: urllib3.BaseHTTPResponse, path: str) -> ApiError:
    """Read the Status body of a non-200 answer, release the connection, and describe it."""
    status = int(resp.status)
    body: dict[str, Any] = {}
    try:
        decoded = json.loads(resp.read(_MAX_ERROR_BODY) or b"{}")
        body = decoded if isinstance(decoded, dict) else {}
    except (ValueError, urllib3.exceptions.HTTPError, OSError):
        pass
    finally:
        resp.close()
    return ApiError(status, str(resp.reason or ""), body, action=action_of("GET", path),
                    retry_after=_retry_after(resp.headers))


def open_stream(api: Any, path: str, query: Sequence[tuple[str, str]], *, connect_timeout_s: float,
                read_timeout_s: float) -> urllib3.BaseHTTPResponse:
    """One GET of ``path`` whose 200 answer is returned unread (``preload_content=False``); else :class:`ApiError`.

    ``api`` is the agent's :class:`~.client.KubeClient` (or a ``kubernetes`` ApiClient, adapted to one).
    """
    check_path(path)
    client = transport(api)
    # The transport adds the bearer token (re-read when it rotates); its pool carries the TLS settings.
    url, headers = client.prepare(path, query, {"Accept": JSON})
    REQUESTS.add("GET", path, query)
    try:
        resp: urllib3.BaseHTTPResponse = client.pool.request(
            "GET", url, headers=headers, preload_content=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s))
    except (urllib3.exceptions.HTTPError, OSError) as e:  # refused, reset, TLS, timeouts
        raise ApiError(0, type(e).__name__, action=action_of("GET", path)) from None
    if resp.status != 200:
        raise _error_of(resp, path)
    return resp


def lines(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The non-empty newline-delimited lines of a streamed response, as they arrive.

    A broken stream raises what urllib3 raised (``HTTPError``, ``OSError``, ``ValueError``) — a response closed by
    another thread mid-read too, as a ``ProtocolError`` (http.client itself fails there with ``AttributeError``);
    the caller decides whether that is a failure or its own stop cutting the response.
    """
    buf = b""
    chunks = resp.stream(amt=None, decode_content=True)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            break
        except AttributeError:  # http.client reading a response another thread closed (its fp is gone)
            raise urllib3.exceptions.ProtocolError("the watch response was closed while it was read") from None
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def watch_events(resp: urllib3.BaseHTTPResponse) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(type, object)`` of each watch event of ``resp``; ``ValueError`` for a line that is not one."""
    for line in lines(resp):
        try:
            event = json.loads(line)
            etype, obj = event["type"], event["object"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("a watch line is not a JSON event") from None
        if not isinstance(etype, str) or not isinstance(obj, dict):
            raise ValueError("a watch event's object is not a JSON object")
        yield etype, obj
