"""Tests of sidecar.intercept.certificate: the certificate that vouches for the upstream only.

Its shape (not a CA, serverAuth, exactly the upstream's names, ECDSA P-256,
at most 397 days), its files (key 0600, written atomically, reused), its
renewal (names changed, near expiry with the old one served until it
expires, expired), and the proof with real TLS clients — Python's ``ssl``
(OpenSSL), curl and Node.js — that trusting it vouches for nothing else:
another name fails, and a certificate signed with its key fails as having
no CA issuer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import sidecar.intercept.certificate as certificate_module
from sidecar.config import InterceptConfig, parse_upstream
from sidecar.errors import ConfigError
from sidecar.intercept.certificate import (
    RENEW_BEFORE,
    VALIDITY,
    InterceptCertificates,
    default_cert_dir,
    route_certificates,
)
from sidecar.intercept.names import upstream_names
from tests.conftest import PKI, missing_tool, route_config
from tests.support.tls_servers import TLSServer

UPSTREAM = parse_upstream("https://api10.cert.successfactors.com")
NAMES = upstream_names(UPSTREAM, ("extra.example.com",))
HOSTS = ("api10.cert.successfactors.com", "api10.successfactors.com", "extra.example.com")
START = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self, now: dt.datetime = START) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def store(directory: Path, clock: Clock | None = None, names=NAMES) -> InterceptCertificates:
    return InterceptCertificates(directory, "sf", names, now=clock or Clock())


# ------------------------------------------------------------------ its shape


def test_made_on_first_use_with_exactly_the_upstream_names(tmp_path: Path) -> None:
    certs = store(tmp_path / "state")
    assert not (tmp_path / "state").exists()
    current = certs.current()
    cert = current.cert
    assert current.names == HOSTS
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(HOSTS)
    assert san.get_values_for_type(x509.IPAddress) == []
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.issuer == cert.subject  # self-signed
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=397)
    assert cert.not_valid_before_utc <= START < cert.not_valid_after_utc
    assert current.fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper()


def test_an_ip_upstream_is_an_ip_address_name(tmp_path: Path) -> None:
    names = upstream_names(parse_upstream("https://127.0.0.1:8443"), ())
    cert = store(tmp_path, names=names).current().cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == []


# ------------------------------------------------------------------ its files


def test_key_file_is_private_and_the_certificate_public(tmp_path: Path) -> None:
    current = store(tmp_path).current()
    assert current.key_path == tmp_path / "sf.key" and current.cert_path == tmp_path / "sf.pem"
    assert stat.S_IMODE(current.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(current.cert_path.stat().st_mode) == 0o644
    key = serialization.load_pem_private_key(current.key_path.read_bytes(), password=None)
    assert key.public_key() == current.cert.public_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sf.key", "sf.pem"]  # no temp files


def test_reused_across_restarts_without_writing(tmp_path: Path) -> None:
    first = store(tmp_path).current()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    again = store(tmp_path, Clock(START + dt.timedelta(days=100))).current()
    assert again.fingerprint == first.fingerprint
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_changed_names_make_a_new_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = store(tmp_path).current()
    names = upstream_names(UPSTREAM, ())
    with caplog.at_level(logging.WARNING, logger="sidecar.intercept"):
        second = store(tmp_path, names=names).current()
    assert second.fingerprint != first.fingerprint
    assert second.names == HOSTS[:2]
    assert "upstream names changed" in caplog.text and "trust show" in caplog.text


def test_a_key_that_is_not_the_certificate_s_makes_a_new_pair(tmp_path: Path) -> None:
    first = store(tmp_path).current()
    other = ec.generate_private_key(ec.SECP256R1())
    first.key_path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    second = store(tmp_path).current()
    assert second.fingerprint != first.fingerprint
    key = serialization.load_pem_private_key(second.key_path.read_bytes(), password=None)
    assert key.public_key() == second.cert.public_key()


def test_the_key_is_never_logged_or_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    with caplog.at_level(logging.DEBUG):
        certs = store(tmp_path, clock)
        certs.current()
        clock.now = certs.current().not_after - dt.timedelta(days=1)
        published = certs.pem()
    for path in tmp_path.glob("*.key"):
        body = "".join(path.read_text().splitlines()[1:-1])
        for secret in (body[:40], body[-40:], "PRIVATE KEY"):
            assert secret not in caplog.text
            assert secret.encode() not in published


def test_unwritable_folder_without_a_certificate_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        store(blocker / "state").current()
    message = str(info.value)
    assert message.startswith("route.intercept.cert_dir: cannot write the interception")
    assert str(blocker / "state") in message
    assert "mount one holding sf.pem and sf.key" in message
    assert "intercept.cert_dir to a writable folder" in message


def test_read_only_folder_with_a_valid_certificate_serves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = store(tmp_path).current()

    def read_only(path: Path, data: bytes, mode: int) -> None:
        # As a read-only mount answers (a chmod does not stop root, who runs CI).
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(certificate_module, "_write_atomically", read_only)
    assert store(tmp_path).current().fingerprint == first.fingerprint


def test_default_folder_is_the_user_state_dir(tmp_path: Path) -> None:
    assert default_cert_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "mtls-sidecar"
    home_state = Path.home() / ".local" / "state" / "mtls-sidecar"
    assert default_cert_dir({}) == home_state
    assert default_cert_dir({"XDG_STATE_HOME": "relative/ignored"}) == home_state


def test_routes_share_one_store_per_folder_route_and_names(pki: PKI, tmp_path: Path) -> None:
    route = route_config(
        "https://api10.cert.successfactors.com",
        tmp_path / "b.pem",
        tmp_path / "ca.pem",
        intercept=InterceptConfig(enabled=True, cert_dir=tmp_path / "state"),
    )
    assert route_certificates(route, 0) is route_certificates(route, 0)
    moved = parse_upstream("https://api12.cert.successfactors.com")
    other = route_certificates(route, 0, moved)
    assert other is not route_certificates(route, 0)
    assert other.current().names == ("api12.cert.successfactors.com", "api12.successfactors.com")


def test_a_route_without_a_known_upstream_says_so(tmp_path: Path) -> None:
    route = route_config("https://h.example", tmp_path / "b.pem", tmp_path / "ca.pem")
    route = dataclasses.replace(route, upstream=None)
    with pytest.raises(ConfigError, match=r"routes\[2\]\.upstream: the interception certificate"):
        route_certificates(route, 2)


# ------------------------------------------------------------------ renewal


def test_near_expiry_a_successor_is_published_while_the_old_one_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    certs = store(tmp_path, clock)
    old = certs.current()
    assert certs.published() == (old,)
    clock.now = old.not_after - RENEW_BEFORE + dt.timedelta(seconds=1)
    with caplog.at_level(logging.WARNING, logger="sidecar.intercept"):
        served = certs.current()
        certs.current()
    assert served.fingerprint == old.fingerprint
    current, successor = certs.published()
    assert current.fingerprint == old.fingerprint
    assert successor.cert_path == tmp_path / "sf.next.pem"
    assert stat.S_IMODE(successor.key_path.stat().st_mode) == 0o600
    assert successor.not_after > old.not_after and successor.names == HOSTS
    assert certs.pem() == old.pem + successor.pem
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, not per request
    assert f"expires on {old.not_after.date()}" in warnings[0]
    assert successor.fingerprint in warnings[0] and "trust it now" in warnings[0]
    # a restart in between finds the same successor
    assert store(tmp_path, clock).published()[1].fingerprint == successor.fingerprint
    # once the old one expires, the successor is served, under the usual file names
    clock.now = old.not_after + dt.timedelta(seconds=1)
    promoted = certs.current()
    assert promoted.fingerprint == successor.fingerprint
    assert promoted.cert_path == tmp_path / "sf.pem" and not successor.cert_path.exists()
    assert certs.published() == (promoted,)
    assert store(tmp_path, clock).current().fingerprint == successor.fingerprint


def test_expired_without_successor_makes_a_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = store(tmp_path).current()
    later = Clock(old.not_after + dt.timedelta(days=1))
    with caplog.at_level(logging.WARNING, logger="sidecar.intercept"):
        new = store(tmp_path, later).current()
    assert new.fingerprint != old.fingerprint
    assert new.cert.not_valid_before_utc <= later.now < new.not_after
    assert f"expired on {old.not_after.date()}" in caplog.text
    assert VALIDITY <= dt.timedelta(days=397)


# ------------------------------------------------------- what trusting it allows


def _sign_leaf_with(certs: InterceptCertificates, host: str) -> tuple[bytes, bytes]:
    """A leaf for ``host`` signed with the interception key: (chain PEM, key PEM)."""
    current = certs.current()
    issuer_key = serialization.load_pem_private_key(current.key_path.read_bytes(), password=None)
    assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(current.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    chain = leaf.public_bytes(serialization.Encoding.PEM) + current.pem
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem


def _leaf_server(certs: InterceptCertificates, host: str, tmp_path: Path) -> TLSServer:
    chain, key = _sign_leaf_with(certs, host)
    (tmp_path / "leaf.pem").write_bytes(chain)
    (tmp_path / "leaf.key").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    return TLSServer(ctx)


def _python_get(port: int, name: str, cafile: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 200")


@pytest.fixture
def certs(tmp_path: Path) -> InterceptCertificates:
    return store(tmp_path / "state", Clock(dt.datetime.now(dt.UTC)))


def test_openssl_trusts_it_for_the_upstream_names_only(
    certs: InterceptCertificates, tmp_path: Path
) -> None:
    cafile = certs.current().cert_path
    with TLSServer(certs.server_context()) as server:
        for name in HOSTS:
            _python_get(server.port, name, cafile)
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            _python_get(server.port, "api10.cert.example.com", cafile)
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            _python_get(server.port, "evil.successfactors.com", cafile)


def test_openssl_refuses_a_certificate_signed_with_its_key(
    certs: InterceptCertificates, tmp_path: Path
) -> None:
    cafile = certs.current().cert_path
    with _leaf_server(certs, "www.example.com", tmp_path) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match="invalid CA certificate"):
            _python_get(server.port, "www.example.com", cafile)
    # even for one of the upstream's own names: it can sign nothing
    with _leaf_server(certs, HOSTS[0], tmp_path) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match="invalid CA certificate"):
            _python_get(server.port, HOSTS[0], cafile)


def _curl(port: int, name: str, cafile: Path) -> subprocess.CompletedProcess[str]:
    curl = shutil.which("curl")
    if curl is None:
        missing_tool("curl is not installed")
    return subprocess.run(
        [curl, "-sS", "--max-time", "10", "--cacert", str(cafile),
         "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_curl_trusts_it_for_the_upstream_names_only(
    certs: InterceptCertificates, tmp_path: Path
) -> None:
    cafile = certs.current().cert_path
    with TLSServer(certs.server_context()) as server:
        ok = _curl(server.port, HOSTS[0], cafile)
        assert ok.returncode == 0 and ok.stdout == "ok", ok.stderr
        other = _curl(server.port, "www.example.com", cafile)
        assert other.returncode == 60 and "www.example.com" in other.stderr
    with _leaf_server(certs, "www.example.com", tmp_path) as server:
        signed = _curl(server.port, "www.example.com", cafile)
        assert signed.returncode == 60, signed.stderr


_NODE_GET = """
const https = require("https");
const [port, name] = process.argv.slice(1);
https.get({host: "127.0.0.1", port, servername: name, headers: {host: name},
           checkServerIdentity: (h, c) => require("tls").checkServerIdentity(name, c)},
  (r) => { r.resume(); r.on("end", () => console.log("status " + r.statusCode)); })
  .on("error", (e) => { console.log("error " + (e.code || e.message)); });
"""


def _node(port: int, name: str, cafile: Path) -> str:
    node = shutil.which("node")
    if node is None:
        missing_tool("Node.js is not installed", ci_installs_it=False)
    env = {**os.environ, "NODE_EXTRA_CA_CERTS": str(cafile)}
    done = subprocess.run(
        [node, "-e", _NODE_GET, str(port), name],
        capture_output=True, text=True, timeout=30, check=True, env=env,
    )  # fmt: skip
    return done.stdout.strip()


def test_node_trusts_it_for_the_upstream_names_only(
    certs: InterceptCertificates, tmp_path: Path
) -> None:
    cafile = certs.current().cert_path
    with TLSServer(certs.server_context()) as server:
        assert _node(server.port, HOSTS[1], cafile) == "status 200"
        assert _node(server.port, "www.example.com", cafile) == "error ERR_TLS_CERT_ALTNAME_INVALID"
    with _leaf_server(certs, "www.example.com", tmp_path) as server:
        # OpenSSL 3 reports "invalid CA" (79), a code Node names UNSPECIFIED
        assert _node(server.port, "www.example.com", cafile) == "error UNSPECIFIED"
