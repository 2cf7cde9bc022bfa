"""The SAP BTP Destination Service: bindings, tokens, lookups, keystores, and secrecy.

The services are the fakes in tests/support/fake_btp.py, on loopback: plain http (the
contract allows it for loopback hosts) and https with a client certificate
for the X.509 token endpoint.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from sidecar.config import DestinationRef
from sidecar.credentials.destination import (
    Binding,
    Destination,
    DestinationClient,
    DestinationUnavailable,
    describe,
    discover_binding,
)
from sidecar.errors import CredentialError, DestinationError, PasswordError
from tests.conftest import PKI
from tests.support.fake_btp import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeBTP,
    Served,
    destination_json,
    serve,
)

NAME = "sap_hcmcloud_core_odata"
COMPANY = "ACME1234"


@pytest.fixture
async def btp(pki: PKI) -> AsyncIterator[Served]:
    served = await serve(FakeBTP(), tls=pki.server_context(require_client_cert=True))
    yield served
    await served.runner.cleanup()


def secret_credentials(base: str) -> dict[str, Any]:
    """A destination service key with a binding secret, as the BTP cockpit shows it."""
    return {
        "clientid": CLIENT_ID,
        "clientsecret": CLIENT_SECRET,
        "credential-type": "binding-secret",
        "identityzone": "acme-dev",
        "tenantid": "6aa64c2f-38c1-49a9-b2e8-cf9fea769b7f",
        "tenantmode": "dedicated",
        "uaadomain": "authentication.eu10.hana.ondemand.com",
        "uri": base,
        "url": base,
        "verificationkey": "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
        "xsappname": "clone1234!b5678|destination-xsappname!b404",
    }


def x509_credentials(served: Served, pki: PKI) -> dict[str, Any]:
    creds = secret_credentials(served.url)
    del creds["clientsecret"]
    creds.update(
        {
            "credential-type": "x509",
            "certificate": pki.client.chain_pem().decode(),
            "key": pki.client.key_pem().decode(),
            "certurl": served.cert_url,
        }
    )
    return creds


def write_key(tmp_path: Path, creds: dict[str, Any], name: str = "key.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(creds, indent=2))
    return path


def secret_binding(served: Served) -> Binding:
    return Binding(
        uri=served.url,
        url=served.url,
        client_id=CLIENT_ID,
        credential_type="binding-secret",
        source="test binding",
        client_secret=CLIENT_SECRET,
    )


def p12_bytes(pki: PKI, password: bytes) -> bytes:
    return pkcs12.serialize_key_and_certificates(
        b"client",
        pki.client.key,
        pki.client.cert,
        list(pki.client.parents),
        serialization.BestAvailableEncryption(password),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------- binding discovery


def test_service_key_gives_a_secret_binding(tmp_path: Path) -> None:
    path = write_key(tmp_path, secret_credentials("https://destination.example.test/"))
    binding = discover_binding(DestinationRef(NAME, service_key=path), {})
    assert binding.uri == "https://destination.example.test"
    assert binding.client_id == CLIENT_ID
    assert binding.client_secret == CLIENT_SECRET
    assert not binding.uses_x509
    assert binding.token_endpoint == "https://destination.example.test/oauth/token"
    assert str(path) in binding.source
    assert CLIENT_SECRET not in repr(binding)


def test_service_key_wrapped_in_credentials_and_cf_cli_header(tmp_path: Path) -> None:
    creds = secret_credentials("https://destination.example.test")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"credentials": creds, "name": "k"}))
    assert discover_binding(DestinationRef(NAME, service_key=wrapped), {}).client_id == CLIENT_ID
    cli = tmp_path / "cli.txt"
    cli.write_text("Getting key k for service instance d as admin...\n\n" + json.dumps(creds))
    assert discover_binding(DestinationRef(NAME, service_key=cli), {}).client_id == CLIENT_ID


def test_service_key_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "uri": "https://x.test",\n  "url": \n}')
    with pytest.raises(DestinationError, match=r"broken\.json: not valid JSON.*line 4"):
        discover_binding(DestinationRef(NAME, service_key=broken), {})
    creds = secret_credentials("https://destination.example.test")
    del creds["clientsecret"]
    missing = write_key(tmp_path, creds, "missing.json")
    with pytest.raises(DestinationError, match=r'missing\.json: key "clientsecret" is missing'):
        discover_binding(DestinationRef(NAME, service_key=missing), {})
    with pytest.raises(DestinationError, match=r"nothere\.json: service key file not found"):
        discover_binding(DestinationRef(NAME, service_key=tmp_path / "nothere.json"), {})
    odd = write_key(tmp_path, secret_credentials("https://x.test") | {"credential-type": "magic"})
    with pytest.raises(DestinationError, match="unsupported credential type 'magic'"):
        discover_binding(DestinationRef(NAME, service_key=odd), {})


def test_x509_service_key(tmp_path: Path) -> None:
    creds = secret_credentials("https://destination.example.test")
    del creds["clientsecret"]
    creds |= {
        "credential-type": "x509",
        "certificate": "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n",
        "key": "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n",
        "url": "https://acme.authentication.eu10.hana.ondemand.com",
    }
    binding = discover_binding(DestinationRef(NAME, service_key=write_key(tmp_path, creds)), {})
    assert binding.uses_x509
    # Without certurl, XSUAA's mTLS host is the `cert` twin of url.
    assert binding.token_endpoint == (
        "https://acme.authentication.cert.eu10.hana.ondemand.com/oauth/token"
    )
    assert binding.certificate is not None and "\\n" not in binding.certificate
    assert "PRIVATE KEY" not in repr(binding) and "BEGIN CERTIFICATE" not in repr(binding)
    attested = {k: v for k, v in creds.items() if k not in ("certificate", "key")}
    attested["credential-type"] = "x509_attested"
    path = write_key(tmp_path, attested, "attested.json")
    with pytest.raises(DestinationError, match="x509_attested without the certificate and key"):
        discover_binding(DestinationRef(NAME, service_key=path), {})


def vcap(*entries: dict[str, Any]) -> str:
    return json.dumps(
        {
            "xsuaa": [{"label": "xsuaa", "name": "uaa", "credentials": {"clientid": "other"}}],
            "destination": list(entries),
        }
    )


def test_vcap_services_first_or_named() -> None:
    a = secret_credentials("https://a.example.test")
    b = secret_credentials("https://b.example.test")
    env = {
        "VCAP_SERVICES": vcap(
            {"label": "destination", "name": "dest-a", "plan": "lite", "credentials": a},
            {"label": "destination", "name": "dest-b", "plan": "lite", "credentials": b},
        )
    }
    ref = DestinationRef(NAME)
    first = discover_binding(ref, env)
    assert first.uri == "https://a.example.test" and "dest-a" in first.source
    assert discover_binding(ref, env, instance="dest-b").uri == "https://b.example.test"
    with pytest.raises(DestinationError, match=r"no destination service named 'x'.*'dest-a'"):
        discover_binding(ref, env, instance="x")
    bad = {"VCAP_SERVICES": vcap({"label": "destination", "name": "d", "credentials": {}})}
    with pytest.raises(DestinationError, match=r"destination\[0\]\.credentials\.uri is missing"):
        discover_binding(ref, bad)


def test_service_key_wins_over_vcap_and_vcap_over_binding_root(tmp_path: Path) -> None:
    key = write_key(tmp_path, secret_credentials("https://key.example.test"))
    root = tmp_path / "bindings"
    write_binding_dir(root / "dest", secret_credentials("https://root.example.test"))
    env = {
        "VCAP_SERVICES": vcap(
            {
                "label": "destination",
                "name": "d",
                "credentials": secret_credentials("https://v.test"),
            }
        ),
        "SERVICE_BINDING_ROOT": str(root),
    }
    assert discover_binding(DestinationRef(NAME, service_key=key), env).uri.startswith(
        "https://key"
    )
    assert discover_binding(DestinationRef(NAME), env).uri == "https://v.test"
    del env["VCAP_SERVICES"]
    assert discover_binding(DestinationRef(NAME), env).uri == "https://root.example.test"


def write_binding_dir(directory: Path, creds: dict[str, Any], *, kind: str = "destination") -> None:
    directory.mkdir(parents=True)
    (directory / "type").write_text(kind)
    (directory / "provider").write_text("sap")
    for key, value in creds.items():
        (directory / key).write_text(value)


def test_service_binding_root_without_metadata(tmp_path: Path) -> None:
    root = tmp_path / "bindings"
    write_binding_dir(root / "a-database", {"uri": "postgres://db"}, kind="postgresql")
    write_binding_dir(root / "my-dest", secret_credentials("https://dest.example.test"))
    (root / "my-dest" / "..data").mkdir()  # what a Kubernetes secret volume also holds
    (root / "my-dest" / "clientid").write_text(CLIENT_ID + "\n")  # written with echo
    binding = discover_binding(DestinationRef(NAME), {"SERVICE_BINDING_ROOT": str(root)})
    assert binding.uri == "https://dest.example.test"
    assert binding.client_id == CLIENT_ID
    assert binding.client_secret == CLIENT_SECRET
    assert "my-dest" in binding.source
    with pytest.raises(
        DestinationError, match=r"no destination binding named 'x' \(found: my-dest"
    ):
        discover_binding(DestinationRef(NAME), {"SERVICE_BINDING_ROOT": str(root)}, instance="x")


def test_service_binding_root_with_metadata(tmp_path: Path) -> None:
    root = tmp_path / "bindings"
    creds = secret_credentials("https://dest.example.test")
    directory = root / "dest-binding"
    write_binding_dir(directory, {k: creds[k] for k in ("uri", "url", "clientid")})
    # The SAP BTP service operator's layout: the rest is one "container" key of JSON.
    rest = {k: v for k, v in creds.items() if k not in ("uri", "url", "clientid")}
    (directory / "credentials").write_text(json.dumps(rest))
    (directory / "tags").write_text('["destination", "conn"]')
    (directory / "unrelated").write_text("{ not json")  # not listed: ignored
    metadata: dict[str, list[dict[str, Any]]] = {
        "credentialProperties": [
            {"name": "uri", "format": "text"},
            {"name": "url", "format": "text"},
            {"name": "clientid", "format": "text"},
            {"name": "credentials", "format": "json", "container": True},
        ],
        "metaDataProperties": [
            {"name": "type", "format": "text"},
            {"name": "tags", "format": "json"},
        ],
    }
    (directory / ".metadata").write_text(json.dumps(metadata))
    binding = discover_binding(DestinationRef(NAME), {"SERVICE_BINDING_ROOT": str(root)})
    assert (binding.uri, binding.client_secret) == ("https://dest.example.test", CLIENT_SECRET)
    metadata["credentialProperties"].append({"name": "missing", "format": "text"})
    (directory / ".metadata").write_text(json.dumps(metadata))
    with pytest.raises(DestinationError, match=r"dest-binding/missing: file not found"):
        discover_binding(DestinationRef(NAME), {"SERVICE_BINDING_ROOT": str(root)})


def test_no_binding_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DestinationError) as info:
        discover_binding(DestinationRef(NAME), {})
    message = str(info.value)
    assert "service_key is not set" in message
    assert "VCAP_SERVICES is not set" in message
    assert "SERVICE_BINDING_ROOT is not set" in message
    assert info.value.hint and "--service-key" in info.value.hint
    env = {"VCAP_SERVICES": vcap(), "SERVICE_BINDING_ROOT": str(tmp_path)}
    with pytest.raises(DestinationError, match="no service with label 'destination'.*no directory"):
        discover_binding(DestinationRef(NAME), env)


@pytest.mark.parametrize(
    "url", ["http://localhost:8080", "http://127.0.0.1:1", "http://127.3.0.1", "http://[::1]:9"]
)
def test_plain_http_is_accepted_for_loopback(tmp_path: Path, url: str) -> None:
    path = write_key(tmp_path, secret_credentials(url))
    assert discover_binding(DestinationRef(NAME, service_key=path), {}).uri == url


@pytest.mark.parametrize(
    "url", ["http://destination.example.test", "http://10.0.0.1", "http://localhost.evil.test"]
)
def test_https_is_required_for_other_hosts(tmp_path: Path, url: str) -> None:
    creds = secret_credentials("https://ok.example.test") | {"uri": url}
    path = write_key(tmp_path, creds)
    with pytest.raises(DestinationError, match=r'key "uri": .* uses plain http'):
        discover_binding(DestinationRef(NAME, service_key=path), {})
    binding = Binding(uri="https://ok.test", url=url, client_id="c", credential_type="x",
                      source="hand-made", client_secret="s")  # fmt: skip
    with pytest.raises(DestinationError, match="hand-made: token endpoint: .* plain http"):
        DestinationClient(binding)


# --------------------------------------------------------------------- destinations


def test_destination_parsing() -> None:
    body = destination_json(
        NAME,
        keystore=("client.pem", b"-----BEGIN CERTIFICATE-----"),
        password="",
        headers={"successfactors-companyid": COMPANY},
        queries={"customPageSize": "500"},
        instance_level=True,
        extra_certificates=("other.p12",),
        lower_case_certificates=True,
    )
    d = Destination.from_json(body, name=NAME)
    assert d.name == NAME and d.url == "https://api.example-sf.test"
    assert d.authentication == "ClientCertificateAuthentication"
    assert (d.proxy_type, d.type, d.owner_level) == ("Internet", "HTTP", "instance")
    assert d.headers == {"successfactors-companyid": COMPANY}
    assert d.queries == {"customPageSize": "500"}
    assert d.keystore == b"-----BEGIN CERTIFICATE-----"
    assert d.keystore_password is None  # empty means none
    assert d.certificate_names == ("client.pem", "other.p12")
    assert "BEGIN" not in repr(d)
    sub = Destination.from_json(destination_json(NAME), name=NAME)
    assert sub.owner_level == "subaccount"
    with pytest.raises(DestinationError, match="without a destinationConfiguration"):
        Destination.from_json({"ErrorMessage": "x"}, name=NAME)


def test_keystore_formats(pki: PKI) -> None:
    def bundle(location: str, content: bytes, password: str | None = None) -> Any:
        body = destination_json(NAME, keystore=(location, content), password=password)
        return Destination.from_json(body, name=NAME).bundle()

    leaf = pki.client.cert
    assert bundle("client.pem", pki.client.btp_bundle()).leaf == leaf
    assert bundle("client.pem", pki.client.btp_bundle(b"pem-pass"), "pem-pass").leaf == leaf
    assert bundle("client.p12", p12_bytes(pki, b"p12-pass"), "p12-pass").leaf == leaf
    assert bundle("client.PFX", p12_bytes(pki, b"p12-pass"), "p12-pass").chain[-1] == pki.root.cert
    with pytest.raises(
        PasswordError, match=r"destination .*: key store client\.p12.*wrong password"
    ):
        bundle("client.p12", p12_bytes(pki, b"p12-pass"), "wrong")
    with pytest.raises(PasswordError, match="encrypted and no password"):
        bundle("client.pem", pki.client.btp_bundle(b"pem-pass"), "")
    with pytest.raises(CredentialError, match="Java JKS keystore.*keytool"):
        bundle("client.jks", b"\xfe\xed\xfe\xed" + bytes(64), "changeit")


def test_wrong_authentication_and_missing_keystore() -> None:
    basic = Destination.from_json(destination_json(NAME, authentication="BasicAuthentication"),
                                  name=NAME)  # fmt: skip
    with pytest.raises(DestinationError, match=f"destination {NAME}: .* is BasicAuthentication"):
        basic.bundle()
    assert "BasicAuthentication" in (describe(basic)["problem"] or "")
    body = destination_json(NAME, keystore=("client.pem", b"x"), extra_certificates=("a.p12",))
    body["destinationConfiguration"]["KeyStoreLocation"] = "renamed.pem"
    with pytest.raises(DestinationError, match=r"renamed\.pem .*present: client\.pem, a\.p12"):
        Destination.from_json(body, name=NAME).bundle()


# ----------------------------------------------------------------------------- client


async def test_fetch_with_secret_binding(btp: Served, pki: PKI, tmp_path: Path) -> None:
    btp.fake.destinations[NAME] = destination_json(
        NAME,
        keystore=("sf-client.pem", pki.client.btp_bundle()),
        headers={"successfactors-companyid": COMPANY},
        queries={"customPageSize": "500"},
    )
    binding = discover_binding(
        DestinationRef(NAME, service_key=write_key(tmp_path, secret_credentials(btp.url))), {}
    )
    async with DestinationClient(binding) as client:
        result = await client.fetch(NAME)
    assert not result.not_modified
    d = result.destination
    assert d.headers["successfactors-companyid"] == COMPANY
    client_identity = d.bundle().identity()
    assert client_identity.leaf == pki.client.cert
    assert len(client_identity.chain) == 3


async def test_fetch_with_x509_binding(
    btp: Served, pki: PKI, tmp_path: Path, ca_file: Path
) -> None:
    btp.fake.destinations[NAME] = destination_json(
        NAME, keystore=("c.pem", pki.client.btp_bundle())
    )
    path = write_key(tmp_path, x509_credentials(btp, pki))
    binding = discover_binding(DestinationRef(NAME, service_key=path), {})
    assert binding.token_endpoint.startswith("https://localhost:")
    async with DestinationClient(binding, ca_file=ca_file) as client:
        result = await client.fetch(NAME)
    assert result.destination.name == NAME
    assert btp.fake.client_cert_subjects == ["sidecar-technical-user"]


async def test_x509_binding_with_expired_certificate(btp: Served, pki: PKI, ca_file: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    old = pki.intermediate.client(not_before=past - dt.timedelta(days=30), not_after=past)
    creds_binding = Binding(uri=btp.url, url=btp.url, client_id=CLIENT_ID, credential_type="x509",
                            source="old binding", certificate=old.chain_pem().decode(),
                            key=old.key_pem().decode(), cert_url=btp.cert_url)  # fmt: skip
    async with DestinationClient(creds_binding, ca_file=ca_file) as client:
        with pytest.raises(CredentialError, match="old binding: certificate and key: .* expired"):
            await client.token()
    assert btp.fake.token_calls == 0


async def test_destination_not_found(btp: Served) -> None:
    async with DestinationClient(secret_binding(btp)) as client:
        with pytest.raises(DestinationError) as info:
            await client.fetch("no_such_destination")
    assert not isinstance(info.value, DestinationUnavailable)
    assert "destination no_such_destination not found" in str(info.value)
    assert "Configuration with the specified name was not found" in str(info.value)


async def test_service_down_is_transient(btp: Served) -> None:
    btp.fake.destinations[NAME] = destination_json(NAME)
    btp.fake.fail_with = 503
    async with DestinationClient(secret_binding(btp)) as client:
        with pytest.raises(DestinationUnavailable, match="HTTP 503"):
            await client.fetch(NAME)
        btp.fake.fail_with = 403
        with pytest.raises(DestinationError, match="HTTP 403") as info:
            await client.fetch(NAME)
        assert not isinstance(info.value, DestinationUnavailable)
        btp.fake.fail_with = None
        assert (await client.fetch(NAME)).destination.name == NAME
    btp.fake.fail_tokens_with = 502
    async with DestinationClient(secret_binding(btp)) as client:
        with pytest.raises(DestinationUnavailable, match=r"XSUAA .*HTTP 502"):
            await client.token()


async def test_unreachable_service_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    binding = Binding(uri=url, url=url, client_id=CLIENT_ID, credential_type="binding-secret",
                      source="gone", client_secret=CLIENT_SECRET)  # fmt: skip
    async with DestinationClient(binding, timeout=5) as client:
        with pytest.raises(DestinationUnavailable, match="cannot reach it"):
            await client.fetch(NAME)


async def test_refused_client_secret_is_permanent(btp: Served) -> None:
    binding = Binding(uri=btp.url, url=btp.url, client_id=CLIENT_ID,
                      credential_type="binding-secret", source="stale key",
                      client_secret="revoked-secret")  # fmt: skip
    async with DestinationClient(binding) as client:
        with pytest.raises(DestinationError, match="refused the client id and secret of stale key"):
            await client.token()


async def test_token_is_cached_until_shortly_before_expiry(btp: Served) -> None:
    btp.fake.destinations[NAME] = destination_json(NAME)
    clock = Clock()
    async with DestinationClient(secret_binding(btp), clock=clock) as client:
        first = await client.token()
        await client.fetch(NAME)
        await client.fetch(NAME)
        assert btp.fake.token_calls == 1
        clock.now += 43199 - 61  # a minute before expires_in: still good
        assert await client.token() == first
        clock.now += 2
        assert await client.token() != first
        assert btp.fake.token_calls == 2
    btp.fake.expires_in = 100  # a short lifetime keeps 10 % of it as margin
    async with DestinationClient(secret_binding(btp), clock=clock) as client:
        await client.token()
        clock.now += 89
        await client.token()
        assert btp.fake.token_calls == 3
        clock.now += 2
        await client.token()
        assert btp.fake.token_calls == 4


async def test_401_refreshes_the_token_once(btp: Served) -> None:
    btp.fake.destinations[NAME] = destination_json(NAME)
    async with DestinationClient(secret_binding(btp)) as client:
        await client.fetch(NAME)
        btp.fake.revoke_tokens()  # e.g. the token was revoked before it expired
        assert (await client.fetch(NAME)).destination.name == NAME
        assert (btp.fake.token_calls, btp.fake.destination_calls) == (2, 3)
        btp.fake.reject_tokens = True
        with pytest.raises(DestinationError, match="refused a fresh token"):
            await client.fetch(NAME)
        assert (btp.fake.token_calls, btp.fake.destination_calls) == (3, 5)


async def test_etag_gives_not_modified(btp: Served, pki: PKI) -> None:
    btp.fake.destinations[NAME] = destination_json(
        NAME, keystore=("c.pem", pki.client.btp_bundle())
    )
    async with DestinationClient(secret_binding(btp)) as client:
        first = await client.fetch(NAME)
        assert first.etag and not first.not_modified
        again = await client.fetch(NAME)
        assert again.not_modified and again.destination == first.destination
        assert btp.fake.not_modified_answers == 1
        btp.fake.destinations[NAME] = destination_json(NAME, url="https://other.example-sf.test")
        changed = await client.fetch(NAME)
        assert not changed.not_modified
        assert changed.destination.url == "https://other.example-sf.test"


# -------------------------------------------------------------------------- secrecy


async def test_describe_holds_no_secret(btp: Served, pki: PKI) -> None:
    password = "keystore-Passw0rd"
    keystore = pki.client.btp_bundle(password.encode())
    btp.fake.destinations[NAME] = destination_json(
        NAME,
        keystore=("sf.pem", keystore),
        password=password,
        headers={"successfactors-companyid": COMPANY, "Authorization": "Basic dXNlcjpwdw=="},
        queries={"customPageSize": "500", "api_key": "k-123456"},
    )
    async with DestinationClient(secret_binding(btp)) as client:
        d = (await client.fetch(NAME)).destination
    shown = describe(d)
    text = json.dumps(shown)
    assert shown["headers"]["successfactors-companyid"] == COMPANY
    assert shown["headers"]["Authorization"] == "(redacted)"
    assert shown["queries"] == {"customPageSize": "500", "api_key": "(redacted)"}
    assert shown["owner_level"] == "subaccount" and shown["authentication"].startswith("Client")
    assert shown["certificate"]["certificates"][0]["subject"].startswith(
        "CN=sidecar-technical-user"
    )
    assert shown["problem"] is None and shown["keystore_password_set"] is True
    secrets = [password, CLIENT_SECRET, *btp.fake.issued, "PRIVATE KEY", "dXNlcjpwdw==",
               "k-123456", base64.b64encode(keystore).decode()[:40]]  # fmt: skip
    for secret in secrets:
        assert secret not in text
        assert secret not in repr(d)


async def test_no_secret_in_any_error(btp: Served, pki: PKI) -> None:
    btp.fake.echo_secrets = True
    password = "keystore-Passw0rd"
    btp.fake.destinations[NAME] = destination_json(
        NAME, keystore=("sf.p12", p12_bytes(pki, b"the-real-one")), password=password
    )
    errors: list[BaseException] = []
    wrong = Binding(uri=btp.url, url=btp.url, client_id=CLIENT_ID,
                    credential_type="binding-secret", source="k",
                    client_secret="wrong-Secret-123")  # fmt: skip
    async with DestinationClient(wrong) as client:
        with pytest.raises(DestinationError) as info:
            await client.token()
        errors.append(info.value)
    async with DestinationClient(secret_binding(btp)) as client:
        d = (await client.fetch(NAME)).destination
        with pytest.raises(PasswordError) as bad_password:
            d.bundle()
        errors.append(bad_password.value)
        btp.fake.reject_tokens = True
        with pytest.raises(DestinationError) as refused:
            await client.fetch(NAME)
        errors.append(refused.value)
    assert "***" in str(errors[0]) and "***" in str(errors[2])  # echoed, then scrubbed
    for exc in errors:
        text = f"{exc} {exc!r} {getattr(exc, 'hint', '')}"
        for secret in (password, CLIENT_SECRET, "wrong-Secret-123", *btp.fake.issued):
            assert secret not in text


async def test_https_uses_the_system_trust_store(
    pki: PKI, ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = await serve(FakeBTP(), tls=pki.server_context(require_client_cert=False))
    try:
        served.fake.destinations[NAME] = destination_json(NAME)
        assert served.cert_url is not None
        binding = Binding(uri=served.cert_url, url=served.cert_url, client_id=CLIENT_ID,
                          credential_type="binding-secret", source="https binding",
                          client_secret=CLIENT_SECRET)  # fmt: skip
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        async with DestinationClient(binding) as client:
            with pytest.raises(DestinationUnavailable, match="TLS failed"):
                await client.token()
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # as in a container with a custom CA
        async with DestinationClient(binding) as client:
            assert (await client.fetch(NAME)).destination.name == NAME
    finally:
        await served.runner.cleanup()
