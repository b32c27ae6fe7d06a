"""Fixtures for the OCI Object Storage source: a loopback server and a throwaway user-principal config."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.ociserver import OCIObjectServer


@dataclass(frozen=True)
class OCIUserConfig:
    """A ``~/.oci/config``-style file whose key was generated for this test only."""

    path: Path
    profile: str
    key_pem: str = field(repr=False)  # the private key text: tests assert it never leaks
    fingerprint: str
    tenancy: str
    user: str
    region: str


@pytest.fixture
def oci_server() -> Iterator[OCIObjectServer]:
    """A started loopback Object Storage (page size 3, so small listings paginate)."""
    with OCIObjectServer(page_size=3) as srv:
        yield srv


@pytest.fixture
def oci_user_config(tmp_path: Path) -> OCIUserConfig:
    """Writes ``config`` + ``key.pem`` (fresh 2048-bit RSA) under tmp_path, for the real API-key signer."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()).decode()
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.md5(der, usedforsecurity=False).hexdigest()
    fingerprint = ":".join(digest[i:i + 2] for i in range(0, 32, 2))
    key_file = tmp_path / "oci_api_key.pem"
    key_file.write_text(pem)
    key_file.chmod(0o600)
    tenancy = "ocid1.tenancy.oc1..aaaaaaaatesttenancy"
    user = "ocid1.user.oc1..aaaaaaaatestuser"
    cfg = tmp_path / "oci_config"
    cfg.write_text(f"[DEFAULT]\nuser={user}\nfingerprint={fingerprint}\ntenancy={tenancy}\n"
                   f"region=us-ashburn-1\nkey_file={key_file}\n")
    cfg.chmod(0o600)
    return OCIUserConfig(path=cfg, profile="DEFAULT", key_pem=pem, fingerprint=fingerprint, tenancy=tenancy,
                         user=user, region="us-ashburn-1")
