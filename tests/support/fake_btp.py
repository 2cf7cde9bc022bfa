"""A fake XSUAA token endpoint and a fake SAP BTP Destination Service.

Both follow the real wire formats closely enough for the client to be tested
end to end on loopback:

- ``POST /oauth/token`` takes a form body with ``grant_type=client_credentials``
  and authenticates the client by HTTP Basic (secret bindings) or, on the
  https site, by its TLS client certificate plus ``client_id`` in the form
  (X.509 bindings). It answers ``{"access_token", "token_type": "bearer",
  "expires_in", ...}``.
- ``GET /destination-configuration/v1/destinations/{name}`` requires a Bearer
  token it issued (401 otherwise), answers the "find destination" document
  (``owner``, ``destinationConfiguration``, ``certificates``, ``authTokens``),
  404 ``{"ErrorMessage": ...}`` for unknown names, and honours ``ETag`` /
  ``If-None-Match`` with 304.

Switches let tests make it fail (``fail_with = 503``), revoke tokens, and read
call counters.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

CLIENT_ID = "sb-sidecar-dest!b1234|destination-xsappname!b404"
CLIENT_SECRET = "s3cr3t-Cl1ent$Value=="


def destination_json(
    name: str,
    *,
    url: str = "https://api.example-sf.test",
    authentication: str = "ClientCertificateAuthentication",
    keystore: tuple[str, bytes] | None = None,  # (name, file content)
    password: str | None = None,
    headers: dict[str, str] | None = None,
    queries: dict[str, str] | None = None,
    instance_level: bool = False,
    extra_certificates: tuple[str, ...] = (),
    lower_case_certificates: bool = False,
) -> dict[str, Any]:
    """A "find destination" answer as the Destination Service writes it."""
    config: dict[str, Any] = {
        "Name": name,
        "Type": "HTTP",
        "URL": url,
        "Authentication": authentication,
        "ProxyType": "Internet",
    }
    certificates: list[dict[str, str]] = []
    if keystore is not None:
        config["KeyStoreLocation"] = keystore[0]
        config["KeyStorePassword"] = password if password is not None else ""
        certificates.append(_certificate(keystore[0], keystore[1], lower_case_certificates))
    for extra in extra_certificates:
        certificates.append(_certificate(extra, b"not the one", lower_case_certificates))
    for key, value in (headers or {}).items():
        config[f"URL.headers.{key}"] = value
    for key, value in (queries or {}).items():
        config[f"URL.queries.{key}"] = value
    owner = {
        "SubaccountId": "6aa64c2f-38c1-49a9-b2e8-cf9fea769b7f",
        "InstanceId": "bc8a216f-1184-49dc-b4b4-17cfe2828965" if instance_level else None,
    }
    body: dict[str, Any] = {"owner": owner, "destinationConfiguration": config}
    if certificates:
        body["certificates"] = certificates
    body["authTokens"] = []
    return body


def write_service_key(path: Path, url: str) -> Path:
    """A secret binding's service key for the fake at ``url``, as the BTP cockpit shows it."""
    key = {"uri": url, "url": url, "clientid": CLIENT_ID, "clientsecret": CLIENT_SECRET,
           "credential-type": "binding-secret"}  # fmt: skip
    path.write_text(json.dumps(key), encoding="utf-8")
    return path


def _certificate(name: str, content: bytes, lower: bool) -> dict[str, str]:
    kind = "CERTIFICATE"
    encoded = base64.b64encode(content).decode()
    if lower:
        return {"name": name, "type": kind, "content": encoded}
    return {"Name": name, "Type": kind, "Content": encoded}


@dataclass
class FakeBTP:
    """Shared state of the fake XSUAA and Destination Service."""

    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    expires_in: int = 43199
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_with: int | None = None  # answer every request with this status
    fail_tokens_with: int | None = None  # answer token requests with this status
    echo_secrets: bool = False  # put what the client sent into error bodies (scrub test)
    reject_tokens: bool = False  # the Destination Service refuses every token (401)
    etags: bool = True
    token_calls: int = 0
    destination_calls: int = 0
    not_modified_answers: int = 0
    issued: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    client_cert_subjects: list[str] = field(default_factory=list)

    def revoke_tokens(self) -> None:
        self.valid.clear()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_get("/destination-configuration/v1/destinations/{name}", self._destination)
        return app

    # -------------------------------------------------------------------- XSUAA

    async def _token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        if self.fail_tokens_with is not None:
            return web.json_response({"error": "unavailable"}, status=self.fail_tokens_with)
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", "grant_type must be client_credentials"
            )
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        peer = ssl_object.getpeercert() if ssl_object is not None else None
        if peer:  # a client certificate authenticates the client (X.509 binding)
            subject = dict(x[0] for x in peer["subject"])
            self.client_cert_subjects.append(subject.get("commonName", "?"))
            if form.get("client_id") != self.client_id:
                return _oauth_error(401, "unauthorized", "unknown client_id")
        else:
            login, password = _basic(request.headers.get("Authorization", ""))
            if login != self.client_id or password != self.client_secret:
                said = f" for {login}:{password}" if self.echo_secrets else ""
                return _oauth_error(401, "unauthorized", f"Bad credentials{said}")
        token = "tok-" + secrets.token_urlsafe(24)
        self.issued.append(token)
        self.valid.add(token)
        return web.json_response(
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.expires_in,
                "scope": "uaa.resource",
                "jti": secrets.token_hex(8),
            }
        )

    # ------------------------------------------------------ Destination Service

    async def _destination(self, request: web.Request) -> web.Response:
        self.destination_calls += 1
        if self.fail_with is not None:
            return web.Response(status=self.fail_with, text="<html>Service Unavailable</html>")
        auth = request.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        if token not in self.valid or self.reject_tokens:
            said = f" {token}" if self.echo_secrets else ""
            return web.json_response({"ErrorMessage": f"Invalid token{said}"}, status=401)
        name = request.match_info["name"]
        body = self.destinations.get(name)
        if body is None:
            return web.json_response(
                {"ErrorMessage": "Configuration with the specified name was not found"},
                status=404,
            )
        data = json.dumps(body).encode()
        headers: dict[str, str] = {}
        if self.etags:
            etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
            headers["ETag"] = etag
            if request.headers.get("If-None-Match") == etag:
                self.not_modified_answers += 1
                return web.Response(status=304, headers=headers)
        return web.Response(body=data, content_type="application/json", headers=headers)


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _basic(header: str) -> tuple[str | None, str | None]:
    if not header.startswith("Basic "):
        return None, None
    try:
        login, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return login, password


@dataclass
class Served:
    """A started fake: its http URL and, when asked for, its https URL."""

    fake: FakeBTP
    url: str
    cert_url: str | None
    runner: web.AppRunner


async def serve(fake: FakeBTP, *, tls: ssl.SSLContext | None = None) -> Served:
    """Serve ``fake`` on 127.0.0.1 over http, and over https too when ``tls`` is given."""
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{_port(site)}"
    cert_url = None
    if tls is not None:
        tls_site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await tls_site.start()
        cert_url = f"https://localhost:{_port(tls_site)}"
    return Served(fake, url, cert_url, runner)


def _port(site: web.TCPSite) -> int:
    server = site._server
    assert isinstance(server, asyncio.Server)
    port: int = server.sockets[0].getsockname()[1]
    return port
