"""O_DIRECT writes on real files: exact bytes whatever the alignment, aligned pieces bypass the page cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from modelherd.storage.directio import ALIGN, FileWriter, _address, aligned_buffer

from tests.support import resident_fraction

MiB = 1024 * 1024


def test_aligned_buffers_start_on_a_page_and_large_ones_on_a_huge_page() -> None:
    small, large = aligned_buffer(10_000), aligned_buffer(4 * MiB)
    assert len(small) == 12_288 and _address(small) % ALIGN == 0
    assert len(large) == 4 * MiB and _address(large) % (2 * MiB) == 0
    large[-1:] = b"x"  # writable to its last byte
    assert bytes(large[-1:]) == b"x"


def _pieces(tmp_path: Path, direct: bool) -> tuple[bytes, FileWriter, Path]:
    """Write a 1 MiB + 777 byte file as a mix of aligned and unaligned pieces, out of order."""
    data = os.urandom(MiB + 777)
    buf = aligned_buffer(MiB + ALIGN)
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(data))
    writer = FileWriter(fd, path, direct=direct)
    try:
        for start, end in [(512 * 1024, len(data)), (0, 256 * 1024), (256 * 1024, 256 * 1024 + 100),
                           (256 * 1024 + 100, 512 * 1024)]:
            view = buf[: end - start]
            view[:] = data[start:end]
            writer.write(view, start)
    finally:
        writer.close()
        os.close(fd)
    return data, writer, path


def test_mixed_aligned_and_unaligned_pieces_land_byte_exact_with_only_aligned_ones_direct(tmp_path: Path) -> None:
    data, writer, path = _pieces(tmp_path, direct=True)
    assert path.read_bytes() == data
    if not writer.direct and writer.direct_bytes == 0:
        pytest.skip("this filesystem refuses O_DIRECT")
    # direct: [0, 256K) and the aligned head [512K, 1M) of the last piece; its 777-byte tail and the pieces
    # starting or ending off a page boundary are buffered
    assert writer.direct_bytes == 512 * 1024 + 256 * 1024


def test_without_direct_every_piece_is_written_buffered(tmp_path: Path) -> None:
    data, writer, path = _pieces(tmp_path, direct=False)
    assert path.read_bytes() == data
    assert writer.direct_bytes == 0 and not writer.direct


def test_direct_pieces_do_not_stay_in_the_page_cache(tmp_path: Path) -> None:
    buf = aligned_buffer(4 * MiB)
    buf[:] = os.urandom(4 * MiB)
    results = {}
    for direct in (True, False):
        path = tmp_path / f"direct-{direct}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        with FileWriter(fd, path, direct=direct) as writer:
            for i in range(4):
                writer.write(buf, i * 4 * MiB)
        os.fsync(fd)
        os.close(fd)
        if direct and writer.direct_bytes == 0:
            pytest.skip("this filesystem refuses O_DIRECT")
        results[direct] = resident_fraction(path)
    assert results[True] < 0.1, results
    assert results[False] > 0.9, results
