"""A throwaway PKI for the demo, the example config and the tests.

It mirrors what SAP BTP hands out: a root CA, an intermediate, a client
certificate with the clientAuth usage, exported as one PEM with the key first
(``PRIVATE KEY``, leaf, intermediate, root), and the yearly renewal: the same
subject with a new key and serial from the same intermediate
(`DemoPKI.renew_client`). None of it is secret: every certificate is generated
on the spot for loopback use.

``python -m sidecar.demo.pki DIR`` writes the files the example config uses (see HELP).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.credentials.identity import PrivateKey


def new_key(kind: str = "ec") -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str = "mtls-sidecar test") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]  # fmt: skip
    )


@dataclass(frozen=True)
class Issued:
    """A certificate with its key and the chain above it (issuer first, root last)."""

    cert: x509.Certificate
    key: PrivateKey
    parents: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        """Leaf and every parent, leaf first."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.parents)
        )

    def key_pem(self, password: bytes | None = None, *, legacy: bool = False) -> bytes:
        """PKCS#8 (encrypted when ``password``), or the traditional OpenSSL format."""
        fmt = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if legacy
            else serialization.PrivateFormat.PKCS8
        )
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(serialization.Encoding.PEM, fmt, enc)

    def btp_bundle(self, password: bytes | None = None) -> bytes:
        """The SAP BTP export order: key, leaf, intermediate, root."""
        return self.key_pem(password) + self.chain_pem()


@dataclass(frozen=True)
class CA:
    """A certificate authority that can sign leaves and intermediates."""

    issued: Issued

    @property
    def cert(self) -> x509.Certificate:
        return self.issued.cert

    @classmethod
    def create(cls, name: str = "mtls-sidecar test root CA", key_kind: str = "ec") -> CA:
        key = new_key(key_kind)
        now = dt.datetime.now(dt.UTC)
        subject = _name(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),  # fmt: skip
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(Issued(cert, key))

    def cert_pem(self) -> bytes:
        return self.issued.cert_pem()

    def _sign(
        self,
        builder: x509.CertificateBuilder,
        key: PrivateKey,
        *,
        not_before: dt.datetime | None,
        not_after: dt.datetime | None,
    ) -> Issued:
        now = dt.datetime.now(dt.UTC)
        cert = (
            builder.issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(hours=1))
            .not_valid_after(not_after or now + dt.timedelta(days=365))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issued.key.public_key()),
                False,
            )
            .sign(self.issued.key, hashes.SHA256())
        )
        return Issued(cert, key, (self.cert, *self.issued.parents))

    def intermediate(self, name: str = "mtls-sidecar test intermediate CA") -> CA:
        key = new_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        )
        return CA(self._sign(builder, key, not_before=None, not_after=None))

    def server(self, *hosts: str, key_kind: str = "ec") -> Issued:
        """A TLS server certificate for ``hosts`` (DNS names or IP addresses)."""
        hosts = hosts or ("localhost", "127.0.0.1")
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(hosts[0]))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        )
        return self._sign(builder, new_key(key_kind), not_before=None, not_after=None)

    def client(
        self,
        cn: str = "sidecar-technical-user",
        *,
        key_kind: str = "ec",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        client_auth: bool = True,
        is_ca: bool = False,
        key: PrivateKey | None = None,
    ) -> Issued:
        """A client certificate, as SAP BTP generates for an X.509 mapping."""
        usages = (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [ExtendedKeyUsageOID.SERVER_AUTH]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, org="SAP Cloud Platform Clients"))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), False)
        )
        return self._sign(
            builder, key or new_key(key_kind), not_before=not_before, not_after=not_after
        )


@dataclass(frozen=True)
class RenewedClient:
    """The files of a renewed client certificate, beside the ones it renews."""

    bundle: Path  # key, leaf, intermediate, root: what the sidecar loads; mode 0600
    chain: Path  # leaf, intermediate, root: what goes to the X.509 mapping


@dataclass(frozen=True)
class DemoPKI:
    """The files of a ready-made PKI: server side and a BTP-style client bundle."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_bundle: Path
    client_chain: Path
    # Signs renewals; kept in memory only, never written: BTP keeps its CA keys too.
    issuer: CA = field(repr=False, compare=False)

    def files(self) -> tuple[Path, ...]:
        return (self.ca_file, self.server_cert, self.server_key, self.client_bundle,
                self.client_chain)  # fmt: skip

    def renew_client(self) -> RenewedClient:
        """What a yearly renewal in BTP brings: the client certificate's subject with a
        new key and serial, from the same intermediate, valid a year longer.

        Writes ``client-bundle-renewed.pem`` (0600) and ``client-chain-renewed.pem``
        beside the client bundle; the current files are left as they are.
        """
        current = x509.load_pem_x509_certificate(self.client_chain.read_bytes())
        (cn,) = current.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        renewed = self.issuer.client(
            str(cn.value), not_after=current.not_valid_after_utc + dt.timedelta(days=365)
        )
        files = RenewedClient(
            bundle=self.client_bundle.with_name("client-bundle-renewed.pem"),
            chain=self.client_chain.with_name("client-chain-renewed.pem"),
        )
        files.chain.write_bytes(renewed.chain_pem())
        write_private(files.bundle, renewed.btp_bundle())
        return files


def write_demo_pki(directory: Path, *, server_hosts: tuple[str, ...] = ()) -> DemoPKI:
    """Generate a root, an intermediate, a server and a client certificate into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    root = CA.create()
    inter = root.intermediate()
    server = root.server(*(server_hosts or ("localhost", "127.0.0.1", "::1")))
    client = inter.client()
    files = DemoPKI(
        ca_file=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_bundle=directory / "client-bundle.pem",
        client_chain=directory / "client-chain.pem",
        issuer=inter,
    )
    files.ca_file.write_bytes(root.cert_pem())
    files.server_cert.write_bytes(server.chain_pem())
    files.client_chain.write_bytes(client.chain_pem())
    write_private(files.server_key, server.key_pem())
    write_private(files.client_bundle, client.btp_bundle())
    return files


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner reads (0600), atomically: a sidecar watching ``path``
    sees the old file or the new one, never half of it."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(partial, 0o600)  # O_CREAT keeps the mode of a partial file left by a crash
    os.replace(partial, path)


HELP = """\
Write a throwaway test PKI into DIR (created if missing; files of these names
are overwritten), for the demo, config/sidecar.example.yaml and local tests:

  DIR/ca.pem             the root CA certificate: what tls.ca_file trusts
  DIR/server.pem         a server certificate for localhost, 127.0.0.1 and ::1,
                         issued by the root, with the root after it
  DIR/server.key         its private key, mode 0600
  DIR/client-bundle.pem  the client identity as SAP BTP exports it: private
                         key, client certificate, intermediate, root; mode 0600
  DIR/client-chain.pem   the client certificate, intermediate and root, no key

Every key is new, made on this machine, and only for tests on loopback: never
trust these files anywhere real. The path of each file written is printed.
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.demo.pki",
        usage="%(prog)s DIR   (--help: what it writes)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", type=Path, help="where to write the files")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, usage on stderr)
        return 0 if exc.code in (0, None) else 2
    files = write_demo_pki(args.dir)
    for f in files.files():
        print(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
