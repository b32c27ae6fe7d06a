"""A watch response closed by another thread while it is read ends as a broken stream, never an AttributeError
escaping a watcher thread (http.client drops its ``fp`` on close and then fails with one)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from modelherd.agent.kube.leases import LeaseStream
from modelherd.agent.kube.watch import lines
from modelherd.coordination import LeaseApiError


class _ClosedMidRead:
    """A streamed response that yields one event, then fails the way http.client does once closed."""

    def __init__(self) -> None:
        self.closed = False

    def stream(self, amt: Any = None, decode_content: bool = True) -> Iterator[bytes]:
        yield b'{"type": "MODIFIED", "object": {"metadata": {"name": "x"}}}\n'
        raise AttributeError("'NoneType' object has no attribute 'read'")

    def shutdown(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def test_a_response_closed_mid_read_is_a_protocol_error_not_an_attribute_error() -> None:
    it = lines(_ClosedMidRead())  # type: ignore[arg-type]
    assert next(it).startswith(b'{"type": "MODIFIED"')
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(it)


def test_a_lease_watch_cut_by_close_ends_quietly_and_a_broken_one_is_a_lease_api_error() -> None:
    cut = LeaseStream(_ClosedMidRead())  # type: ignore[arg-type]
    events = iter(cut)
    assert next(events)[0] == "MODIFIED"
    cut.close()
    assert list(events) == []
    broken = iter(LeaseStream(_ClosedMidRead()))  # type: ignore[arg-type]
    next(broken)
    with pytest.raises(LeaseApiError) as err:
        next(broken)
    assert err.value.status == 0
