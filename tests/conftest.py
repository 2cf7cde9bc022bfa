"""Shared fixtures: a throwaway PKI made once per test session.

Every certificate and key is generated here with `cryptography`; the
repository holds no key material.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.pki import CA, Issued


@dataclass(frozen=True)
class PKI:
    root: CA
    intermediate: CA
    server: Issued  # for localhost, 127.0.0.1 and ::1, issued by root
    client: Issued  # clientAuth leaf issued by the intermediate (BTP-like chain)
    other_ca: CA  # a CA that neither side trusts

    def server_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        """A server context trusting the root (which signed the intermediate)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_chain(ctx, self.server)
        ctx.load_verify_locations(cadata=self.root.cert_pem().decode())
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return ctx


def load_chain(ctx: ssl.SSLContext, issued: Issued, directory: Path | None = None) -> None:
    """Load a test certificate and key into a server context (test keys may touch disk)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cert = Path(d) / "cert.pem"
        key = Path(d) / "key.pem"
        cert.write_bytes(issued.chain_pem())
        key.write_bytes(issued.key_pem())
        ctx.load_cert_chain(cert, key)


@pytest.fixture(scope="session")
def pki() -> PKI:
    root = CA.create()
    inter = root.intermediate()
    return PKI(
        root=root,
        intermediate=inter,
        server=root.server("localhost", "127.0.0.1", "::1"),
        client=inter.client(),
        other_ca=CA.create("some other CA"),
    )


@pytest.fixture
def ca_file(pki: PKI, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(pki.root.cert_pem())
    return path


@pytest.fixture
def bundle_file(pki: PKI, tmp_path: Path) -> Path:
    """The BTP export: key, leaf, intermediate, root, mode 0600."""
    path = tmp_path / "client-bundle.pem"
    path.write_bytes(pki.client.btp_bundle())
    path.chmod(0o600)
    return path
