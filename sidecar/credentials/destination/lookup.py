"""A destination: fetching it from the Destination Service and parsing what comes back.

`DestinationClient` owns the only I/O of this package (one aiohttp session) and
asks `Tokens` for the bearer token; `Destination` is the parsed answer, whose
keystore becomes an `identity.Bundle`; `describe` is what ``mtls-sidecar
destination`` prints (no secret in it).
"""

from __future__ import annotations

import base64
import binascii
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl

from sidecar.credentials import identity
from sidecar.credentials.certinfo import bundle_report
from sidecar.credentials.destination.binding import Binding, check_service_url
from sidecar.credentials.destination.replies import error_detail, json_body, read_body, unavailable
from sidecar.credentials.destination.token import Tokens
from sidecar.errors import DestinationError, DestinationUnavailable, SidecarError

CLIENT_CERTIFICATE_AUTHENTICATION = "ClientCertificateAuthentication"


@dataclass(frozen=True)
class Destination:
    """What the sidecar uses of a destination ("find destination" response)."""

    name: str
    url: str | None
    authentication: str
    proxy_type: str | None = None
    type: str | None = None
    owner_level: str | None = None  # "subaccount" or "instance"
    headers: Mapping[str, str] = field(default_factory=dict)  # from URL.headers.<name>
    queries: Mapping[str, str] = field(default_factory=dict)  # from URL.queries.<name>
    keystore_location: str | None = None
    certificate_names: tuple[str, ...] = ()  # every entry of certificates[]
    keystore: bytes | None = field(default=None, repr=False)  # the KeyStoreLocation entry
    keystore_password: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        # Headers and queries may hold credentials of their own (an API key header).
        return (
            f"Destination({self.name!r}, url={self.url!r}, "
            f"authentication={self.authentication!r}, keystore={self.keystore_location!r})"
        )

    @classmethod
    def from_json(cls, data: object, *, name: str) -> Destination:
        """Parse the Destination Service's answer for destination ``name``."""
        where = f"destination {name}"
        if not isinstance(data, dict) or not isinstance(data.get("destinationConfiguration"), dict):
            raise DestinationError(
                f"{where}: the Destination Service answered without a destinationConfiguration"
            )
        config: dict[str, Any] = data["destinationConfiguration"]

        def prop(key: str) -> str | None:
            value = config.get(key)
            return None if value is None else str(value)

        owner = data.get("owner")
        owner = owner if isinstance(owner, dict) else {}
        level = "instance" if owner.get("InstanceId") else None
        level = level or ("subaccount" if owner.get("SubaccountId") else None)
        location = prop("KeyStoreLocation") or None
        names: list[str] = []
        keystore: bytes | None = None
        certificates = data.get("certificates")
        for i, entry in enumerate(certificates if isinstance(certificates, list) else []):
            if not isinstance(entry, dict):
                continue
            entry_name = entry.get("Name", entry.get("name"))
            if not isinstance(entry_name, str):
                continue
            names.append(entry_name)
            if entry_name == location and keystore is None:
                content = entry.get("Content", entry.get("content"))
                keystore = _decode_content(content, f"{where}: certificates[{i}] ({entry_name})")
        return cls(
            name=prop("Name") or name,
            url=prop("URL"),
            authentication=prop("Authentication") or "NoAuthentication",
            proxy_type=prop("ProxyType"),
            type=prop("Type"),
            owner_level=level,
            headers=_prefixed(config, "URL.headers."),
            queries=_prefixed(config, "URL.queries."),
            keystore_location=location,
            certificate_names=tuple(names),
            keystore=keystore,
            keystore_password=prop("KeyStorePassword") or None,
        )

    def bundle(self) -> identity.Bundle:
        """The client certificate bundle named by KeyStoreLocation.

        Raises `DestinationError` when the destination does not carry one, and
        `CredentialError` when the keystore cannot be read.
        """
        where = f"destination {self.name}"
        if self.authentication != CLIENT_CERTIFICATE_AUTHENTICATION:
            raise DestinationError(
                f"{where}: its authentication is {self.authentication}, not "
                f"{CLIENT_CERTIFICATE_AUTHENTICATION}",
                hint="in the BTP cockpit set the destination's authentication to "
                "ClientCertificateAuthentication with the client certificate as its key "
                "store, or use credentials.pem / pkcs12 instead",
            )
        if not self.keystore_location:
            raise DestinationError(
                f"{where}: has no KeyStoreLocation",
                hint="select the uploaded client certificate as the destination's key store",
            )
        if self.keystore is None:
            present = ", ".join(self.certificate_names) or "none"
            raise DestinationError(
                f"{where}: the key store {self.keystore_location} (KeyStoreLocation) is not "
                f"among the certificates the Destination Service returned (present: {present})",
                hint="upload the key store under that name (Destinations → Certificates, at "
                "the same level as the destination), or fix KeyStoreLocation",
            )
        suffix = PurePosixPath(self.keystore_location).suffix.lower()
        password = self.keystore_password.encode() if self.keystore_password else None
        # The content is sniffed whatever the name says; the extension only tells
        # identity that a failed DER parse was meant to be PKCS#12 (a password issue).
        return identity.read_bundle_bytes(
            self.keystore,
            source=f"{where}: key store {self.keystore_location}",
            password=password,
            pkcs12_hint=suffix in (".p12", ".pfx"),
        )


def _prefixed(config: Mapping[str, Any], prefix: str) -> dict[str, str]:
    return {
        k[len(prefix) :]: str(v)
        for k, v in config.items()
        if k.startswith(prefix) and len(k) > len(prefix) and v is not None
    }


def _decode_content(content: object, where: str) -> bytes:
    if not isinstance(content, str) or not content.strip():
        raise DestinationError(f"{where}: has no Content")
    try:
        return base64.b64decode("".join(content.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DestinationError(
            f"{where}: Content is not base64", hint="upload the key store again"
        ) from None


_SENSITIVE_NAMES = ("authorization", "cookie", "secret", "password", "passwd", "token",
                    "apikey", "api-key", "api_key")  # fmt: skip


def describe(destination: Destination) -> dict[str, Any]:
    """What `destination show` prints: public data only.

    Values of headers and queries whose names suggest a secret (Authorization,
    *token*, *password*, API keys, ...) are replaced by "(redacted)".
    """

    def public(values: Mapping[str, str]) -> dict[str, str]:
        return {
            k: "(redacted)" if any(s in k.lower() for s in _SENSITIVE_NAMES) else v
            for k, v in values.items()
        }

    certificate: dict[str, Any] | None = None
    problem: str | None = None
    try:
        certificate = bundle_report(destination.bundle())
    except SidecarError as exc:
        problem = str(exc)
    return {
        "name": destination.name,
        "url": destination.url,
        "type": destination.type,
        "authentication": destination.authentication,
        "proxy_type": destination.proxy_type,
        "owner_level": destination.owner_level,
        "headers": public(destination.headers),
        "queries": public(destination.queries),
        "keystore_location": destination.keystore_location,
        "keystore_password_set": destination.keystore_password is not None,
        "certificates": list(destination.certificate_names),
        "certificate": certificate,
        "problem": problem,
    }


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class FetchResult:
    """A fetched destination; ``not_modified`` when the service answered 304 to our ETag."""

    destination: Destination
    not_modified: bool = False
    etag: str | None = None


class DestinationClient:
    """Tokens from XSUAA and destinations from the Destination Service, for one binding.

    Use ``async with DestinationClient(binding) as client:`` or call `close()`.
    Connections use the system trust store (``SSL_CERT_FILE`` honoured) plus
    ``ca_file`` when given; ``clock`` (monotonic seconds) is for tests.
    """

    def __init__(
        self,
        binding: Binding,
        *,
        ca_file: Path | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for url, key in ((binding.uri, "uri"), (binding.token_endpoint, "token endpoint")):
            check_service_url(url, f"{binding.source}: {key}")
        self.binding = binding
        self._ca_file = ca_file
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._tokens = Tokens(binding, session=self._get_session, ca_file=ca_file, clock=clock)
        self._last: dict[str, FetchResult] = {}

    async def __aenter__(self) -> DestinationClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---------------------------------------------------------------- token

    async def token(self) -> str:
        """An access token for the Destination Service, cached until shortly before expiry."""
        return await self._tokens.get()

    # --------------------------------------------------------------- lookup

    async def fetch(self, name: str) -> FetchResult:
        """The destination ``name``, with its certificates.

        Sends the last ETag seen for ``name``; on 304 returns the previous
        destination with ``not_modified=True``. A 401 refreshes the token once.
        """
        url = f"{self.binding.uri}/destination-configuration/v1/destinations/{quote(name, safe='')}"
        what = f"Destination Service {self.binding.uri}"
        previous = self._last.get(name)
        session = self._get_session()
        for attempt in (1, 2):
            token = await self.token()
            headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
            if previous is not None and previous.etag:
                headers["If-None-Match"] = previous.etag
            try:
                async with session.get(
                    yarl.URL(url, encoded=True), headers=headers, allow_redirects=False
                ) as resp:
                    status, etag = resp.status, resp.headers.get("ETag")
                    body = await read_body(resp, what)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise unavailable(what, exc) from exc
            if status == 401 and attempt == 1:
                self._tokens.forget(token)
                continue
            break
        if status == 200:
            data = json_body(body, what)
            result = FetchResult(Destination.from_json(data, name=name), etag=etag)
            if etag:
                self._last[name] = result
            else:
                self._last.pop(name, None)
            return result
        if status == 304 and previous is not None:
            return FetchResult(previous.destination, not_modified=True, etag=previous.etag)
        detail = self._tokens.scrub(error_detail(body))
        if status == 404:
            raise DestinationError(
                f"destination {name} not found ({what}: HTTP 404{detail})",
                hint="check the name in the BTP cockpit (Connectivity → Destinations), at the "
                "subaccount or at the destination service instance of this binding",
            )
        if status == 401:
            raise DestinationError(
                f"{what} refused a fresh token from XSUAA (HTTP 401{detail})",
                hint=f"check that {self.binding.source} belongs to a destination service instance",
            )
        if status == 403:
            raise DestinationError(
                f"{what}: access to destination {name} denied (HTTP 403{detail})",
                hint=f"check that {self.binding.source} belongs to a destination service instance",
            )
        if status in (408, 429) or status >= 500:
            raise DestinationUnavailable(f"{what}: HTTP {status}{detail}")
        raise DestinationError(f"{what}: unexpected answer HTTP {status}{detail}")

    # --------------------------------------------------------------- plumbing

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            ctx = ssl.create_default_context()  # system trust, honours SSL_CERT_FILE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self._ca_file is not None:
                try:
                    ctx.load_verify_locations(cafile=str(self._ca_file))
                except (ssl.SSLError, OSError) as exc:
                    raise DestinationError(
                        f"{self._ca_file}: cannot load the CA file: {exc}"
                    ) from None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(
                    total=self._timeout, sock_connect=min(10.0, self._timeout)
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session
