"""Reading client-certificate bundles, checking them, and handing them to OpenSSL.

Every certificate and key is generated here or in conftest.py; the key only
touches disk in the files the tests write on purpose (under tmp_path).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import datetime as dt
import itertools
import os
import random
import socket
import ssl
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from sidecar.credentials.identity import (
    Bundle,
    ClientIdentity,
    client_ssl_context,
    read_bundle,
    read_bundle_bytes,
    read_password,
)
from sidecar.demo.pki import Issued, new_key
from sidecar.errors import CredentialError, PasswordError
from tests.conftest import PKI

PASSWORD = b"s3cret pass"
NOW = dt.datetime.now(dt.UTC)


# ------------------------------------------------------------------------ helpers


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def says(exc: BaseException, *parts: str) -> None:
    """The message (with its hint) contains every part."""
    text = str(exc)
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"


def p12(issued: Issued, password: bytes | None, *, legacy: bool = False) -> bytes:
    enc: serialization.KeySerializationEncryption
    if legacy:
        assert password is not None
        enc = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(50000)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())
            .build(password)
        )
    elif password:
        enc = serialization.BestAvailableEncryption(password)
    else:
        enc = serialization.NoEncryption()
    return pkcs12.serialize_key_and_certificates(
        b"client", issued.key, issued.cert, list(issued.parents), enc
    )


def assert_full_chain(bundle: Bundle, pki: PKI, issued: Issued | None = None) -> None:
    issued = issued or pki.client
    assert bundle.chain == (issued.cert, pki.intermediate.cert, pki.root.cert)
    assert bundle.leaf == issued.cert
    assert bundle.key is not None
    assert bundle.key_matches is True
    assert bundle.extra == ()


@pytest.fixture(scope="module")
def rsa_client(pki: PKI) -> Issued:
    return pki.intermediate.client("rsa-user", key_kind="rsa")


@pytest.fixture(scope="module")
def expired(pki: PKI) -> Issued:
    return pki.intermediate.client(
        "expired-user", not_before=NOW - dt.timedelta(days=60), not_after=NOW - dt.timedelta(days=1)
    )


@pytest.fixture(scope="module")
def not_yet_valid(pki: PKI) -> Issued:
    return pki.intermediate.client(
        "future-user", not_before=NOW + dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=60)
    )


# ------------------------------------------------------------------------ formats


def test_btp_bundle_is_read_leaf_first_with_matching_key(pki, bundle_file):
    bundle = read_bundle(pem=bundle_file)
    assert_full_chain(bundle, pki)
    assert bundle.source == str(bundle_file)
    assert bundle.warnings == ()


@pytest.mark.parametrize(
    "order", list(itertools.permutations(["key", "leaf", "intermediate", "root"]))
)
def test_any_order_is_reordered_leaf_first(pki, order):
    parts = {
        "key": pki.client.key_pem(),
        "leaf": pki.client.cert_pem(),
        "intermediate": pki.intermediate.cert_pem(),
        "root": pki.root.cert_pem(),
    }
    bundle = read_bundle_bytes(b"".join(parts[p] for p in order), source="bundle.pem")
    assert_full_chain(bundle, pki)
    assert bundle.warnings == ()


def test_certificates_without_key_are_ordered_leaf_first(pki):
    bundle = read_bundle_bytes(
        pem(pki.root.cert, pki.client.cert, pki.intermediate.cert), source="chain.pem"
    )
    assert bundle.chain == (pki.client.cert, pki.intermediate.cert, pki.root.cert)
    assert bundle.key is None
    assert bundle.key_matches is None


def test_windows_line_endings_and_text_around_blocks(pki):
    # `openssl pkcs12 -nodes` writes "Bag Attributes" lines; Windows editors write CRLF.
    data = b"Bag Attributes\n    friendlyName: client\nsubject=/CN=x\n" + pki.client.btp_bundle()
    data = b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")
    bundle = read_bundle_bytes(data, source="win.pem")
    assert_full_chain(bundle, pki)


@pytest.mark.parametrize("wrapped", [False, True], ids=["one-line", "76-columns"])
def test_base64_wrapped_pem(pki, tmp_path, wrapped):
    encode = base64.encodebytes if wrapped else base64.b64encode
    data = encode(pki.client.btp_bundle())
    assert (b"\n" in data.strip()) is wrapped
    path = write(tmp_path / "bundle.b64", data)
    bundle = read_bundle(pem=path)
    assert_full_chain(bundle, pki)
    assert "base64-wrapped PEM" in bundle.source
    assert str(path) in bundle.source


def test_base64_pkcs12_as_the_destination_service_returns_it(pki):
    data = base64.b64encode(p12(pki.client, PASSWORD))
    bundle = read_bundle_bytes(data, source="destination", password=PASSWORD)
    assert_full_chain(bundle, pki)


def test_separate_key_file(pki, tmp_path):
    cert = write(tmp_path / "chain.pem", pki.client.chain_pem(), 0o644)  # certificates: public
    key = write(tmp_path / "client.key", pki.client.key_pem())
    bundle = read_bundle(pem=cert, key=key)
    assert_full_chain(bundle, pki)
    assert bundle.warnings == ()


def test_separate_encrypted_legacy_key_file(pki, rsa_client, tmp_path):
    cert = write(tmp_path / "chain.pem", rsa_client.chain_pem())
    key = write(tmp_path / "client.key", rsa_client.key_pem(PASSWORD, legacy=True))
    bundle = read_bundle(pem=cert, key=key, password=PASSWORD)
    assert_full_chain(bundle, pki, rsa_client)


def test_pkcs8_encrypted_key(pki, tmp_path):
    data = pki.client.btp_bundle(PASSWORD)
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    bundle = read_bundle(pem=write(tmp_path / "enc.pem", data), password=PASSWORD)
    assert_full_chain(bundle, pki)


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_legacy_openssl_encrypted_key(pki, rsa_client, tmp_path, kind):
    issued = rsa_client if kind == "rsa" else pki.client
    key_pem = issued.key_pem(PASSWORD, legacy=True)
    assert f"-----BEGIN {kind.upper()} PRIVATE KEY-----".encode() in key_pem
    assert b"Proc-Type: 4,ENCRYPTED" in key_pem
    path = write(tmp_path / "legacy.pem", key_pem + issued.chain_pem())
    bundle = read_bundle(pem=path, password=PASSWORD)
    assert_full_chain(bundle, pki, issued)


def test_unencrypted_key_ignores_a_configured_password(pki, bundle_file):
    assert_full_chain(read_bundle(pem=bundle_file, password=PASSWORD), pki)


@pytest.mark.parametrize("suffix", [".p12", ".pfx"])
@pytest.mark.parametrize("password", [PASSWORD, None], ids=["password", "no-password"])
def test_pkcs12(pki, tmp_path, suffix, password):
    path = write(tmp_path / f"client{suffix}", p12(pki.client, password))
    bundle = read_bundle(pkcs12_path=path, password=password)
    assert_full_chain(bundle, pki)
    assert bundle.source == str(path)
    assert bundle.warnings == ()


def test_legacy_3des_pkcs12(pki, tmp_path):
    path = write(tmp_path / "legacy.pfx", p12(pki.client, b"pw", legacy=True))
    bundle = read_bundle(pkcs12_path=path, password=b"pw")
    assert_full_chain(bundle, pki)


def test_pkcs12_given_as_pem_is_still_recognised(pki, tmp_path):
    path = write(tmp_path / "client.bin", p12(pki.client, PASSWORD))
    assert_full_chain(read_bundle(pem=path, password=PASSWORD), pki)


def test_password_from_environment(pki, tmp_path, monkeypatch):
    monkeypatch.setenv("SIDECAR_TEST_KEY_PASSWORD", PASSWORD.decode())
    password = read_password(password_env="SIDECAR_TEST_KEY_PASSWORD")
    assert password == PASSWORD
    assert read_password(password_env="PW", env={"PW": "from-mapping"}) == b"from-mapping"
    path = write(tmp_path / "enc.pem", pki.client.btp_bundle(PASSWORD))
    assert_full_chain(read_bundle(pem=path, password=password), pki)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"s3cret pass\n", b"s3cret pass"),
        (b"s3cret pass\r\n", b"s3cret pass"),
        (b"s3cret pass", b"s3cret pass"),
        (b" spaced \n", b" spaced "),  # only the line end is not part of it
    ],
    ids=["lf", "crlf", "no-newline", "spaces-kept"],
)
def test_password_from_file(tmp_path, content, expected):
    path = write(tmp_path / "password", content)
    assert read_password(password_file=path) == expected


def test_no_password_configured():
    assert read_password(env={}) is None


def test_password_from_file_opens_encrypted_pkcs12(pki, tmp_path):
    pw = read_password(password_file=write(tmp_path / "pw", PASSWORD + b"\n"))
    path = write(tmp_path / "client.p12", p12(pki.client, PASSWORD))
    assert_full_chain(read_bundle(pkcs12_path=path, password=pw), pki)


def test_single_der_certificate_is_readable_but_has_no_key(pki, tmp_path):
    path = write(tmp_path / "client.cer", pki.client.cert.public_bytes(serialization.Encoding.DER))
    bundle = read_bundle(pem=path)
    assert bundle.chain == (pki.client.cert,)
    assert bundle.key is None
    assert bundle.key_matches is None
    assert "DER certificate" in bundle.source
    with pytest.raises(CredentialError, match="holds no private key") as exc:
        bundle.identity()
    says(exc.value, str(path), "credentials.key")


def test_der_certificate_with_separate_key(pki, tmp_path):
    path = write(tmp_path / "client.der", pki.client.cert.public_bytes(serialization.Encoding.DER))
    key = write(tmp_path / "client.key", pki.client.key_pem())
    bundle = read_bundle(pem=path, key=key)
    assert bundle.key_matches is True
    assert bundle.identity().leaf == pki.client.cert


def test_base64_wrapped_separate_key_file(pki, tmp_path):
    cert = write(tmp_path / "chain.pem", pki.client.chain_pem())
    key = write(tmp_path / "client.key.b64", base64.encodebytes(pki.client.key_pem()))
    assert_full_chain(read_bundle(pem=cert, key=key), pki)


# --------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("form", ["pkcs8", "legacy-ec", "legacy-rsa"])
def test_wrong_password_for_encrypted_key(pki, rsa_client, tmp_path, form):
    issued = rsa_client if form == "legacy-rsa" else pki.client
    key_pem = issued.key_pem(PASSWORD, legacy=form != "pkcs8")
    path = write(tmp_path / "enc.pem", key_pem + issued.chain_pem())
    with pytest.raises(PasswordError, match="wrong password") as exc:
        read_bundle(pem=path, password=b"not the password")
    says(exc.value, str(path), "check the password variable or file")


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "3des"])
def test_wrong_password_for_pkcs12(pki, tmp_path, legacy):
    path = write(tmp_path / "client.p12", p12(pki.client, PASSWORD, legacy=legacy))
    with pytest.raises(PasswordError, match="wrong password for the PKCS#12 file") as exc:
        read_bundle(pkcs12_path=path, password=b"not the password")
    says(exc.value, str(path), "check the password variable or file")


@pytest.mark.parametrize("form", ["pkcs8", "legacy-ec", "separate-key"])
def test_missing_password_for_encrypted_key(pki, tmp_path, form):
    key_pem = pki.client.key_pem(PASSWORD, legacy=form == "legacy-ec")
    key_file = None
    if form == "separate-key":
        cert = write(tmp_path / "chain.pem", pki.client.chain_pem())
        path = key_file = write(tmp_path / "client.key", key_pem)
    else:
        path = cert = write(tmp_path / "enc.pem", key_pem + pki.client.chain_pem())
    with pytest.raises(PasswordError, match="encrypted and no password was given") as exc:
        read_bundle(pem=cert, key=key_file)
    says(exc.value, str(path), "password_env", "password_file")


def test_missing_password_for_pkcs12(pki, tmp_path):
    path = write(tmp_path / "client.pfx", p12(pki.client, PASSWORD))
    with pytest.raises(PasswordError, match="needs a password") as exc:
        read_bundle(pkcs12_path=path)
    says(exc.value, str(path), "password_env", "password_file")


def test_password_env_not_set():
    with pytest.raises(PasswordError, match="NO_SUCH_PASSWORD_VAR is not set") as exc:
        read_password(
            password_env="NO_SUCH_PASSWORD_VAR",
            env={},
            env_label="routes[0].credentials.password_env",
        )
    says(exc.value, "routes[0].credentials.password_env", "export NO_SUCH_PASSWORD_VAR=")


def test_password_file_missing(tmp_path):
    path = tmp_path / "no-such-password"
    with pytest.raises(PasswordError, match="password file not found") as exc:
        read_password(password_file=path)
    says(exc.value, str(path), "hint:", "password_file")


def test_password_file_is_a_directory(tmp_path):
    with pytest.raises(PasswordError, match="cannot read password file") as exc:
        read_password(password_file=tmp_path)
    says(exc.value, str(tmp_path), "hint:", "password_file")


def test_mismatched_key_in_bundle(pki, tmp_path):
    path = write(tmp_path / "mixed.pem", pki.server.key_pem() + pki.client.chain_pem())
    bundle = read_bundle(pem=path)  # reading works: `cert inspect` shows the mismatch
    assert bundle.key_matches is False
    assert bundle.chain == (pki.client.cert, pki.intermediate.cert, pki.root.cert)
    with pytest.raises(CredentialError, match="does not match the certificate") as exc:
        bundle.identity()
    assert exc.type is CredentialError
    says(exc.value, str(path), "CN=sidecar-technical-user", "from the same BTP certificate")


def test_mismatched_separate_key_file(pki, tmp_path):
    cert = write(tmp_path / "chain.pem", pki.client.chain_pem())
    key = write(tmp_path / "other.key", new_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    bundle = read_bundle(pem=cert, key=key)
    assert bundle.key_matches is False
    with pytest.raises(CredentialError, match="does not match") as exc:
        bundle.identity()
    says(exc.value, str(cert), "same BTP certificate")


def test_expired_leaf(expired, tmp_path):
    path = write(tmp_path / "expired.pem", expired.btp_bundle())
    bundle = read_bundle(pem=path)  # still readable, for `cert inspect`
    assert bundle.key_matches is True
    with pytest.raises(CredentialError, match="expired on") as exc:
        bundle.identity()
    assert exc.type is CredentialError
    says(exc.value, str(path), "CN=expired-user", "generate a new certificate in SAP BTP")


def test_not_yet_valid_leaf(not_yet_valid, tmp_path):
    path = write(tmp_path / "future.pem", not_yet_valid.btp_bundle())
    bundle = read_bundle(pem=path)
    with pytest.raises(CredentialError, match="is not valid before") as exc:
        bundle.identity()
    says(exc.value, str(path), "CN=future-user", "check the system clock")


def test_validity_boundaries(pki, bundle_file):
    bundle = read_bundle(pem=bundle_file)
    leaf = pki.client.cert
    assert bundle.identity(now=leaf.not_valid_before_utc).leaf == leaf
    assert bundle.identity(now=leaf.not_valid_after_utc - dt.timedelta(seconds=1))
    with pytest.raises(CredentialError, match="expired"):
        bundle.identity(now=leaf.not_valid_after_utc)
    with pytest.raises(CredentialError, match="not valid before"):
        bundle.identity(now=leaf.not_valid_before_utc - dt.timedelta(seconds=1))


def _truncated_in_root(p: PKI) -> bytes:
    return p.client.btp_bundle()[:-100]


def _truncated_in_key(p: PKI) -> bytes:
    key = p.client.key_pem()
    return key[: len(key) // 2] + p.client.chain_pem()


def _damaged_certificate(p: PKI) -> bytes:
    body = base64.encodebytes(b"\x30\x82\x01\x00" + bytes(200))
    return (
        p.client.key_pem()
        + b"-----BEGIN CERTIFICATE-----\n"
        + body
        + b"-----END CERTIFICATE-----\n"
    )


BAD_FILES: list[tuple[str, Any, type[Exception], tuple[str, ...]]] = [
    ("truncated-in-root", _truncated_in_root, CredentialError,
     ("truncated PEM", "download or copy the file again")),
    ("truncated-in-key", _truncated_in_key, CredentialError,
     ("truncated PEM", "download or copy the file again")),
    ("empty", lambda p: b"", CredentialError, ("the file is empty", "download the bundle again")),
    ("whitespace", lambda p: b" \n\t\r\n  \n", CredentialError,
     ("the file is empty", "download the bundle again")),
    ("key-only", lambda p: p.client.key_pem(), CredentialError,
     ("holds a private key but no certificate", "credentials.key")),
    ("text-garbage", lambda p: b"this is not a certificate, it is a shopping list\n",
     CredentialError, ("not a certificate bundle", "not another download")),
    ("binary-garbage", lambda p: b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(300),
     CredentialError, ("not a certificate bundle", "not another download")),
    ("der-garbage", lambda p: b"\x30\x82\x01\x2c" + random.Random(2).randbytes(300),
     CredentialError, ("neither PKCS#12 nor a certificate", "picked the certificate file")),
    ("jks", lambda p: b"\xfe\xed\xfe\xed" + random.Random(3).randbytes(200), CredentialError,
     ("Java JKS keystore", "keytool -importkeystore", "-deststoretype PKCS12")),
    ("jceks", lambda p: b"\xce\xce\xce\xce" + random.Random(4).randbytes(200), CredentialError,
     ("Java JCEKS keystore", "keytool -importkeystore")),
    ("two-keys", lambda p: p.client.key_pem() + p.server.key_pem() + p.client.chain_pem(),
     CredentialError, ("holds 2 private keys", "keep only the key")),
    ("damaged-certificate", _damaged_certificate, CredentialError,
     ("a certificate block is damaged", "hint:")),
    ("certificate-request", lambda p: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
     b"-----END CERTIFICATE REQUEST-----\n", CredentialError, ("holds no certificate", "hint:")),
]  # fmt: skip


@pytest.mark.parametrize(("make", "error", "phrases"), [b[1:] for b in BAD_FILES],
                         ids=[b[0] for b in BAD_FILES])  # fmt: skip
def test_bad_file(pki, tmp_path, make, error, phrases):
    path = write(tmp_path / "bundle.pem", make(pki))
    with pytest.raises(CredentialError) as exc:
        read_bundle(pem=path)
    assert exc.type is error
    says(exc.value, str(path), *phrases)


def test_der_garbage_given_as_pkcs12(tmp_path):
    path = write(tmp_path / "client.p12", b"\x30\x82\x01\x2c" + random.Random(2).randbytes(300))
    with pytest.raises(PasswordError, match="needs a password, or it is damaged") as exc:
        read_bundle(pkcs12_path=path)
    says(exc.value, str(path), "password_env")


def test_directory_given_as_file(tmp_path):
    with pytest.raises(CredentialError, match="is a directory") as exc:
        read_bundle(pem=tmp_path)
    assert exc.type is CredentialError
    says(exc.value, str(tmp_path), "give the certificate file inside it")


@pytest.mark.parametrize("which", ["pem", "key", "pkcs12"])
def test_missing_file(pki, tmp_path, which):
    missing = tmp_path / "nowhere" / "client.pem"
    cert = write(tmp_path / "chain.pem", pki.client.chain_pem())
    kwargs: dict[str, Path] = {
        "pem": {"pem": missing},
        "key": {"pem": cert, "key": missing},
        "pkcs12": {"pkcs12_path": missing},
    }[which]
    with pytest.raises(CredentialError, match="file not found") as exc:
        read_bundle(**kwargs)  # type: ignore[arg-type]
    assert exc.type is CredentialError
    says(exc.value, str(missing), "check the path")


def test_no_file_given():
    with pytest.raises(CredentialError, match="no certificate file given"):
        read_bundle()


def test_key_both_in_bundle_and_separate(pki, bundle_file, tmp_path):
    key = write(tmp_path / "client.key", pki.client.key_pem())
    with pytest.raises(CredentialError, match="already holds a private key") as exc:
        read_bundle(pem=bundle_file, key=key)
    says(exc.value, str(bundle_file), str(key), "drop credentials.key")


def test_separate_key_file_without_key(pki, tmp_path):
    cert = write(tmp_path / "chain.pem", pki.client.chain_pem())
    key = write(tmp_path / "client.key", pki.client.chain_pem())
    with pytest.raises(CredentialError, match="holds no private key") as exc:
        read_bundle(pem=cert, key=key)
    says(exc.value, str(key), "credentials.key must be a PEM private key")


# ----------------------------------------------------------------------- warnings


def only(warnings: tuple[str, ...], phrase: str) -> str:
    matching = [w for w in warnings if phrase in w]
    assert len(matching) == 1, warnings
    return matching[0]


def test_clean_btp_bundle_has_no_warnings(bundle_file):
    bundle = read_bundle(pem=bundle_file)
    assert bundle.warnings == ()
    assert bundle.identity().warnings == ()


def test_missing_intermediate_warns(pki, tmp_path):
    path = write(tmp_path / "leaf.pem", pki.client.key_pem() + pki.client.cert_pem())
    bundle = read_bundle(pem=path)
    warning = only(bundle.warnings, "only the leaf is present")
    says(Exception(warning), str(path), "CN=mtls-sidecar test intermediate CA", "add it")
    assert len(bundle.warnings) == 1
    assert warning in bundle.identity().warnings  # a warning, not an error


def test_certificate_outside_the_chain_warns(pki, tmp_path):
    data = pki.client.btp_bundle() + pki.other_ca.cert_pem()
    bundle = read_bundle_bytes(data, source="extra.pem")
    assert bundle.chain == (pki.client.cert, pki.intermediate.cert, pki.root.cert)
    assert bundle.extra == (pki.other_ca.cert,)
    says(Exception(only(bundle.warnings, "not part of the leaf's chain")), "CN=some other CA")


def test_leaf_without_client_auth_warns(pki):
    issued = pki.intermediate.client("server-ish", client_auth=False)
    bundle = read_bundle_bytes(issued.btp_bundle(), source="noeku.pem")
    warning = only(bundle.warnings, "lacks the clientAuth extended key usage")
    says(Exception(warning), "noeku.pem", "CN=server-ish", "issue a client certificate")
    assert len(bundle.warnings) == 1
    assert bundle.identity().warnings == bundle.warnings


def test_ca_certificate_as_leaf_warns(pki):
    issued = pki.intermediate.client("ca-as-leaf", is_ca=True)
    bundle = read_bundle_bytes(issued.btp_bundle(), source="ca.pem")
    assert bundle.leaf == issued.cert  # the key decides which one is the leaf
    warning = only(bundle.warnings, "is a CA certificate")
    says(Exception(warning), "CN=ca-as-leaf", "use the client certificate BTP generated")


@pytest.mark.parametrize("layout", ["bundle", "separate-key", "pkcs12"])
def test_key_file_readable_by_others_warns(pki, tmp_path, layout):
    if layout == "bundle":
        key_path = write(tmp_path / "bundle.pem", pki.client.btp_bundle(), 0o644)
        bundle = read_bundle(pem=key_path)
    elif layout == "separate-key":
        cert = write(tmp_path / "chain.pem", pki.client.chain_pem(), 0o600)
        key_path = write(tmp_path / "client.key", pki.client.key_pem(), 0o644)
        bundle = read_bundle(pem=cert, key=key_path)
    else:
        key_path = write(tmp_path / "client.p12", p12(pki.client, PASSWORD), 0o640)
        bundle = read_bundle(pkcs12_path=key_path, password=PASSWORD)
    warning = only(bundle.warnings, "readable by group or others")
    mode = f"{stat.S_IMODE(key_path.stat().st_mode):04o}"
    says(Exception(warning), f"mode {mode}", f"chmod 600 {key_path}")
    assert len(bundle.warnings) == 1
    assert warning in bundle.identity().warnings


def test_public_certificate_file_may_be_world_readable(pki, tmp_path):
    cert = write(tmp_path / "chain.pem", pki.client.chain_pem(), 0o644)
    key = write(tmp_path / "client.key", pki.client.key_pem(), 0o600)
    assert read_bundle(pem=cert, key=key).warnings == ()
    der = write(tmp_path / "c.der", pki.client.cert.public_bytes(serialization.Encoding.DER), 0o644)
    assert not any("chmod" in w for w in read_bundle(pem=der).warnings)


def test_certificate_expiring_soon_warns(pki):
    issued = pki.intermediate.client("soon", not_after=NOW + dt.timedelta(days=10, hours=12))
    bundle = read_bundle_bytes(issued.btp_bundle(), source="soon.pem")
    assert bundle.warnings == ()  # expiry is judged when the identity is made, at `now`
    identity = bundle.identity(now=NOW)
    warning = only(identity.warnings, "expires in")
    says(Exception(warning), "soon.pem", "expires in 10 days", "renew it in SAP BTP")
    assert bundle.identity(now=NOW, warn_before=5 * 86400).warnings == ()
    assert bundle.identity(now=NOW, warn_before=11 * 86400).warnings == (warning,)


# ------------------------------------------------------------------ the identity


def test_identity_and_presented_chain(pki, bundle_file):
    identity = read_bundle(pem=bundle_file).identity()
    assert isinstance(identity, ClientIdentity)
    assert identity.chain == (pki.client.cert, pki.intermediate.cert, pki.root.cert)
    assert identity.presented_chain == (pki.client.cert, pki.intermediate.cert)
    assert identity.source == str(bundle_file)
    assert "PRIVATE" not in repr(identity)
    assert "CN=sidecar-technical-user" in repr(identity)


def test_presented_chain_without_root_is_unchanged(pki):
    identity = read_bundle_bytes(
        pki.client.key_pem() + pki.client.chain_pem()[: -len(pki.root.cert_pem())],
        source="noroot.pem",
    ).identity()
    assert identity.chain == (pki.client.cert, pki.intermediate.cert)
    assert identity.presented_chain == identity.chain


def test_presented_chain_keeps_a_lone_self_signed_certificate(pki):
    root = pki.root.issued
    identity = read_bundle_bytes(root.key_pem() + root.cert_pem(), source="self.pem").identity()
    assert identity.presented_chain == (root.cert,)


# -------------------------------------------------------------------- SSL context


def test_client_context_settings(bundle_file, ca_file):
    ctx = client_ssl_context(read_bundle(pem=bundle_file).identity(), ca_file=ca_file)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.post_handshake_auth is True
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True


def test_client_context_without_identity(ca_file):
    ctx = client_ssl_context(None, ca_file=ca_file)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_ca_file_missing(tmp_path):
    missing = tmp_path / "no-ca.pem"
    with pytest.raises(CredentialError, match="CA file not found") as exc:
        client_ssl_context(None, ca_file=missing)
    assert exc.type is CredentialError
    says(exc.value, str(missing), "tls.ca_file", "hint:")


def test_ca_file_not_pem(tmp_path):
    bad = write(tmp_path / "ca.pem", b"not a certificate\n")
    with pytest.raises(CredentialError, match="not a PEM CA certificate file") as exc:
        client_ssl_context(None, ca_file=bad)
    says(exc.value, str(bad), "tls.ca_file")


@contextlib.contextmanager
def tls_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, dict[str, Any]]]:
    """One TLS connection on a loopback port; ``seen`` gets the peer or the error."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            seen["error"] = exc
            return
        conn.settimeout(5)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"hello")
        except OSError as exc:  # ssl.SSLError included
            seen["error"] = exc
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        thread.join(10)
        listener.close()
    assert not thread.is_alive()


def talk(ctx: ssl.SSLContext, port: int) -> bytes:
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            while len(data) < 5 and (chunk := tls.recv(5 - len(data))):
                data += chunk
    return data


def subject_cn(peer: dict[str, Any], field: str = "subject") -> str:
    return dict(rdn[0] for rdn in peer[field])["commonName"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_real_handshake_presents_the_client_chain(pki, bundle_file, ca_file, version):
    server_ctx = pki.server_context(require_client_cert=True)
    server_ctx.maximum_version = version
    ctx = client_ssl_context(read_bundle(pem=bundle_file).identity(), ca_file=ca_file)
    with tls_server(server_ctx) as (port, seen):
        assert talk(ctx, port) == b"hello"
    assert "error" not in seen, seen
    assert subject_cn(seen["peer"]) == "sidecar-technical-user"
    assert subject_cn(seen["peer"], "issuer") == "mtls-sidecar test intermediate CA"


@pytest.mark.parametrize("case", ["leaf-without-intermediate", "no-client-certificate"])
def test_real_handshake_refused(pki, ca_file, case):
    """The failing cases beside the passing one: the server needs the intermediate."""
    identity = None
    if case == "leaf-without-intermediate":
        full = read_bundle_bytes(pki.client.btp_bundle(), source="b.pem").identity()
        identity = ClientIdentity(chain=full.chain[:1], key=full.key, source="b.pem")
    ctx = client_ssl_context(identity, ca_file=ca_file)
    with tls_server(pki.server_context(require_client_cert=True)) as (port, seen):
        with contextlib.suppress(OSError):  # TLS 1.3 reports the refusal on the first read
            talk(ctx, port)
    assert "peer" not in seen
    assert isinstance(seen["error"], ssl.SSLError), seen


def test_wrong_ca_file_refuses_the_server(pki, bundle_file, tmp_path):
    other = write(tmp_path / "other-ca.pem", pki.other_ca.cert_pem())
    ctx = client_ssl_context(read_bundle(pem=bundle_file).identity(), ca_file=other)
    with tls_server(pki.server_context(require_client_cert=True)) as (port, _seen):
        with pytest.raises(ssl.SSLCertVerificationError):
            talk(ctx, port)


def _files(*dirs: Path) -> set[Path]:
    return {p for d in dirs for p in d.rglob("*")}


@pytest.fixture
def spy_load_cert_chain(monkeypatch):
    """Record what client_ssl_context hands to OpenSSL, while it is there."""
    real_load = ssl.SSLContext.load_cert_chain
    real_open = builtins.open
    seen: dict[str, Any] = {}

    def load(
        self: ssl.SSLContext, certfile: Any, keyfile: Any = None, password: Any = None
    ) -> None:
        seen["path"] = str(certfile)
        seen["keyfile"] = keyfile
        seen["mode"] = stat.S_IMODE(os.stat(certfile).st_mode)
        seen["dir_mode"] = stat.S_IMODE(os.stat(os.path.dirname(certfile)).st_mode)
        seen["link"] = os.readlink(certfile) if str(certfile).startswith("/proc/") else None
        with real_open(certfile, "rb") as f:
            seen["content"] = f.read()
        real_load(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load)
    return seen


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs os.memfd_create")
def test_key_never_reaches_the_disk(
    pki, bundle_file, ca_file, tmp_path, monkeypatch, spy_load_cert_chain
):
    identity = read_bundle(pem=bundle_file).identity()
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    calls: list[str] = []

    def recording(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"{name}{args[:1]}")
            return real(*args, **kwargs)

        return wrapper

    for module, name in [(builtins, "open"), (os, "open"), (tempfile, "mkstemp"),
                         (tempfile, "NamedTemporaryFile"), (tempfile, "mkdtemp")]:  # fmt: skip
        monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    before = _files(tmp, cwd, tmp_path)

    ctx = client_ssl_context(identity, ca_file=ca_file)
    monkeypatch.undo()  # restore open() & co. before anything else runs

    assert calls == []
    assert _files(tmp, cwd, tmp_path) == before
    seen = spy_load_cert_chain
    assert seen["path"].startswith("/proc/self/fd/")
    assert seen["link"].startswith("/memfd:mtls-sidecar")  # anonymous memory, no file system
    assert seen["keyfile"] is None
    content = seen["content"]
    assert b"-----BEGIN PRIVATE KEY-----" in content
    assert pki.client.cert_pem() in content
    assert pki.intermediate.cert_pem() in content
    assert pki.root.cert_pem() not in content  # the root is not presented
    with pytest.raises(OSError):
        os.fstat(int(seen["path"].rsplit("/", 1)[1]))  # the memory file is closed
    # ... and the context still works.
    with tls_server(pki.server_context(require_client_cert=True)) as (port, server_seen):
        assert talk(ctx, port) == b"hello"
    assert subject_cn(server_seen["peer"]) == "sidecar-technical-user"


def test_fallback_temporary_file_is_private_and_removed(
    pki, bundle_file, ca_file, tmp_path, monkeypatch, spy_load_cert_chain
):
    identity = read_bundle(pem=bundle_file).identity()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    before = _files(tmp_path)

    ctx = client_ssl_context(identity, ca_file=ca_file)

    seen = spy_load_cert_chain
    path = Path(seen["path"])
    assert path.parent.parent == tmp  # in a directory of its own ...
    assert seen["dir_mode"] == 0o700  # ... that no other user can even list
    assert seen["mode"] == 0o600  # while OpenSSL read it
    assert b"PRIVATE KEY" in seen["content"]
    assert not path.exists() and not path.parent.exists()  # removed at once
    assert _files(tmp_path) == before
    with tls_server(pki.server_context(require_client_cert=True)) as (port, server_seen):
        assert talk(ctx, port) == b"hello"
    assert subject_cn(server_seen["peer"]) == "sidecar-technical-user"


def test_fallback_temporary_file_is_removed_when_loading_fails(bundle_file, tmp_path, monkeypatch):
    identity = read_bundle(pem=bundle_file).identity()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    used: list[str] = []

    def failing_load(self: ssl.SSLContext, certfile: Any, *args: Any) -> None:
        used.append(str(certfile))
        raise ssl.SSLError("simulated failure")

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", failing_load)
    with pytest.raises(ssl.SSLError, match="simulated failure"):
        client_ssl_context(identity)
    assert used and not Path(used[0]).exists() and not Path(used[0]).parent.exists()
    assert list(tmp.iterdir()) == []
