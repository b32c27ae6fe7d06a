"""Small helpers shared by the loopback servers and tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from modelherd.testing.support import parse_range

if TYPE_CHECKING:
    from modelherd.storage.types import ByteStream

__all__ = ["nvml_available", "parse_range", "read_all", "resident_fraction", "write_oci_user_config"]


def nvml_available() -> bool:
    """A real NVIDIA driver answers through pynvml on this machine."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def read_all(stream: ByteStream, chunk: int = 64 * 1024) -> bytes:
    """Every byte of a source body, through its ``readinto``; the stream is closed afterwards."""
    out = bytearray()
    view = memoryview(bytearray(chunk))
    try:
        while n := stream.readinto(view):
            out += view[:n]
    finally:
        stream.close()
    return bytes(out)


def write_oci_user_config(folder: Path, *, user: str, tenancy: str, region: str = "us-ashburn-1",
                          key_name: str = "oci_api_key.pem", config_name: str = "oci_config") -> tuple[Path, str, str]:
    """An OCI ``config`` + fresh 2048-bit RSA key (both 0600) for the real API-key signer.

    Returns (config path, private key PEM, fingerprint); the loopback servers do not check signatures.
    """
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()).decode()
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.md5(der, usedforsecurity=False).hexdigest()
    fingerprint = ":".join(digest[i:i + 2] for i in range(0, 32, 2))
    key_file = folder / key_name
    key_file.write_text(pem)
    key_file.chmod(0o600)
    cfg = folder / config_name
    cfg.write_text(f"[DEFAULT]\nuser={user}\nfingerprint={fingerprint}\ntenancy={tenancy}\n"
                   f"region={region}\nkey_file={key_file}\n")
    cfg.chmod(0o600)
    return cfg, pem, fingerprint


def resident_fraction(path: Path) -> float:
    """Which share of ``path``'s pages sit in the page cache now (``mincore(2)`` on a read-only mapping)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed", str(path))
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", str(path))
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
