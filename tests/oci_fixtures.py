"""Fixtures for the OCI Object Storage source: a loopback server and a throwaway user-principal config."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.ociserver import OCIObjectServer
from tests.support import write_oci_user_config


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
    tenancy = "ocid1.tenancy.oc1..aaaaaaaatesttenancy"
    user = "ocid1.user.oc1..aaaaaaaatestuser"
    cfg, pem, fingerprint = write_oci_user_config(tmp_path, user=user, tenancy=tenancy)
    return OCIUserConfig(path=cfg, profile="DEFAULT", key_pem=pem, fingerprint=fingerprint, tenancy=tenancy,
                         user=user, region="us-ashburn-1")
