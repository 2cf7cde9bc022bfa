"""Tests of sidecar.intercept.trust: the per-client lines and the system store plus ours."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from sidecar.errors import UsageError
from sidecar.intercept import trust
from sidecar.intercept.trust import client_lines, system_store, trust_bundle


def test_one_line_per_client_naming_the_file_and_the_proxy() -> None:
    lines = client_lines(Path("/s/sf.pem"), "http://127.0.0.1:8080", "api.example.com", "sf")
    assert [line.split(":")[0] for line in lines] == [
        "curl", "Python requests", "Python httpx", "Node.js", "Java", "Postman",
        "Linux store", "macOS store", "Windows store",
    ]  # fmt: skip
    text = "\n".join(lines)
    for needle in (
        "curl -x http://127.0.0.1:8080 --cacert /s/sf.pem https://api.example.com/",
        "CURL_CA_BUNDLE=/s/sf.pem",
        "REQUESTS_CA_BUNDLE=BUNDLE",
        "SSL_CERT_FILE=BUNDLE",
        "NODE_EXTRA_CA_CERTS=/s/sf.pem",
        "keytool -importcert -noprompt -alias mtls-sidecar-sf -file /s/sf.pem",
        "-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort=8080",
        "CA certificates: /s/sf.pem",
        "update-ca-certificates",
        "security add-trusted-cert",
        "certutil -user -addstore Root /s/sf.pem",
    ):
        assert needle in text


def test_the_system_store_is_the_file_ssl_uses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    where, pem = system_store()
    assert Path(where).is_file() and pem == Path(where).read_bytes()
    assert b"-----BEGIN CERTIFICATE-----" in pem
    mine = tmp_path / "store.pem"
    mine.write_bytes(pem[:2000])
    monkeypatch.setenv("SSL_CERT_FILE", str(mine))
    assert system_store() == (str(mine), pem[:2000])


def test_no_store_anywhere_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.pem")
    nowhere = ssl.DefaultVerifyPaths(missing, str(tmp_path), "X", missing, "Y", str(tmp_path))
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: nowhere)
    monkeypatch.setattr(trust, "KNOWN_STORE_FILES", ())
    monkeypatch.setattr(ssl.SSLContext, "get_ca_certs", lambda self, binary_form=False: [])
    with pytest.raises(UsageError, match="no system trust store found") as info:
        system_store()
    assert "SSL_CERT_FILE" in str(info.value)


def test_the_bundle_is_the_store_then_ours() -> None:
    assert trust_bundle(b"STORE\n\n", b"OURS\n") == b"STORE\nOURS\n"
