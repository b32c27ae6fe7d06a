"""Reading HTTP bodies straight into the engine's buffer.

urllib3's ``HTTPResponse.readinto`` reads a fresh ``bytes`` object and copies it into the caller's buffer, one
allocation and one extra copy per chunk. :func:`readinto_direct` reads through the ``http.client`` response
underneath instead, into the caller's buffer, whenever that yields exactly the same bytes: the body is not
being decoded by urllib3 (sources ask for raw bodies) and urllib3 has buffered nothing of it yet.
"""

from __future__ import annotations

from typing import Any


def raw_fp(resp: Any) -> Any:
    """The ``http.client`` response under a urllib3 response while it still has bytes to give, else ``None``."""
    fp = getattr(resp, "_fp", None)
    return fp if fp is not None and getattr(fp, "fp", None) is not None else None


def readinto_direct(resp: Any, buf: memoryview) -> int:
    """Fill ``buf`` from the body of urllib3 response ``resp``; 0 at its end. Same bytes as ``resp.readinto``."""
    fp = raw_fp(resp)
    if fp is not None and hasattr(fp, "readinto") and not getattr(resp, "_decoded_buffer", None) \
            and not getattr(resp, "_decoder", None):
        return int(fp.readinto(buf))
    return int(resp.readinto(buf))


def fully_read(resp: Any) -> bool:
    """``resp``'s body was read to its end (through either path), so its connection can be kept alive."""
    return getattr(resp, "length_remaining", None) == 0 or (getattr(resp, "_fp", None) is not None
                                                            and raw_fp(resp) is None)
