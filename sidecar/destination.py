"""The SAP BTP Destination Service: binding discovery, OAuth token, destination lookup.

    DestinationRef + environment
        │ discover_binding()    service_key file → VCAP_SERVICES → $SERVICE_BINDING_ROOT
        ▼
    Binding                     uri, XSUAA url / certurl, client id, secret or X.509
        │ DestinationClient.token()      POST {url|certurl}/oauth/token, client credentials
        │ DestinationClient.fetch(name)  GET {uri}/destination-configuration/v1/destinations/{name}
        ▼
    FetchResult(Destination, not_modified, etag)
        │ Destination.bundle()  certificates[Name == KeyStoreLocation] → identity.read_bundle_bytes
        ▼
    identity.Bundle ──.identity()──▶ ClientIdentity   (the caller checks and uses it)

Discovery and parsing are pure; `DestinationClient` owns the only I/O (one
aiohttp session). Key material goes straight to `sidecar.identity`: the
binding's X.509 key becomes the token request's TLS context, the keystore
bytes become a `Bundle`; neither is logged, printed or put in a message.

Two kinds of failure, so the caller knows whether to retry:

    DestinationError           permanent: a wrong binding, a refused client, a
    │                          destination that does not exist or is not
    │                          ClientCertificateAuthentication
    └── DestinationUnavailable transient: connection errors, timeouts, 429 and
                               5xx answers — retry with backoff

A keystore or an X.509 binding that cannot be read raises
`sidecar.errors.CredentialError` (also permanent), as every bundle does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import yarl

from sidecar import identity
from sidecar.certinfo import bundle_report
from sidecar.config import DestinationRef
from sidecar.errors import DestinationError, SidecarError

CLIENT_CERTIFICATE_AUTHENTICATION = "ClientCertificateAuthentication"
SECRET_CREDENTIAL_TYPES = frozenset({"binding-secret", "instance-secret"})
TOKEN_MARGIN = 60.0  # seconds before expires_in a token counts as expired (at most)
DEFAULT_TOKEN_LIFETIME = 300.0  # when a token response has no expires_in
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class DestinationUnavailable(DestinationError):
    """The Destination Service or XSUAA cannot be reached right now; retry later."""

    transient = True


# ------------------------------------------------------------------------ binding


@dataclass(frozen=True)
class Binding:
    """The credentials of a destination service instance, wherever they were found."""

    uri: str  # the Destination Service, e.g. https://destination-configuration.cfapps...
    url: str  # XSUAA, e.g. https://<subdomain>.authentication.<region>.hana.ondemand.com
    client_id: str
    credential_type: str  # binding-secret, instance-secret, x509, x509_generated, ...
    source: str  # where it was found, for messages
    client_secret: str | None = field(default=None, repr=False)
    certificate: str | None = field(default=None, repr=False)  # PEM chain (x509)
    key: str | None = field(default=None, repr=False)  # PEM private key (x509)
    cert_url: str | None = None  # XSUAA's mTLS host (x509)

    @property
    def uses_x509(self) -> bool:
        return self.credential_type.lower().startswith("x509")

    @property
    def token_endpoint(self) -> str:
        base = self.cert_url if self.uses_x509 and self.cert_url else self.url
        return f"{base.rstrip('/')}/oauth/token"


def discover_binding(
    ref: DestinationRef, env: Mapping[str, str], *, instance: str | None = None
) -> Binding:
    """Find the destination service binding: service key, VCAP_SERVICES, SERVICE_BINDING_ROOT.

    ``instance`` picks a service instance by name when several are bound
    (VCAP_SERVICES ``name``; the binding directory's name or ``instance_name``).
    """
    if ref.service_key is not None:
        return _from_service_key(ref.service_key)
    looked: list[str] = ["destination.service_key is not set"]
    vcap = env.get("VCAP_SERVICES", "").strip()
    if vcap:
        binding = _from_vcap(vcap, instance)
        if binding is not None:
            return binding
        looked.append("VCAP_SERVICES has no service with label 'destination'")
    else:
        looked.append("VCAP_SERVICES is not set")
    root = env.get("SERVICE_BINDING_ROOT", "").strip()
    if root:
        binding = _from_binding_root(Path(root), instance)
        if binding is not None:
            return binding
        looked.append(f"SERVICE_BINDING_ROOT={root} has no directory whose 'type' is destination")
    else:
        looked.append("SERVICE_BINDING_ROOT is not set")
    named = f" named {instance!r}" if instance else ""
    raise DestinationError(
        f"no SAP BTP destination service binding{named} found: " + "; ".join(looked),
        hint="give the service key JSON from the BTP cockpit with destination.service_key "
        "(--service-key), or bind a destination service instance to the app",
    )


def _from_service_key(path: Path) -> Binding:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DestinationError(
            f"{path}: service key file not found (destination.service_key)",
            hint="create a service key for the destination service instance in the BTP "
            "cockpit and save its JSON to this file",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DestinationError(
            f"{path}: cannot read the service key file: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    data = _json_object(text, str(path))
    # `cf service-key` and `btp get services/binding` wrap the cockpit's object.
    prefix = ""
    if "uri" not in data and isinstance(data.get("credentials"), dict):
        data, prefix = data["credentials"], "credentials."
    return _binding_from(
        data, lambda key: f'{path}: key "{prefix}{key}"', source=f"service key {path}"
    )


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # `cf service-key` prints a "Getting key ..." line before the JSON.
        start = text.find("\n{")
        if start < 0:
            raise DestinationError(
                f"{where}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                hint="paste the service key exactly as the BTP cockpit shows it",
            ) from None
        return _json_object(text[start + 1 :], where)
    if not isinstance(data, dict):
        raise DestinationError(
            f"{where}: expected a JSON object, found {type(data).__name__}",
            hint="paste the service key exactly as the BTP cockpit shows it",
        )
    return data


def _from_vcap(text: str, instance: str | None) -> Binding | None:
    try:
        services = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DestinationError(
            f"VCAP_SERVICES: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(services, dict):
        raise DestinationError("VCAP_SERVICES: expected a JSON object of service lists")
    found: list[tuple[str, dict[str, Any]]] = []
    for label, entries in services.items():
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            if isinstance(entry, dict) and entry.get("label", label) == "destination":
                found.append((f"VCAP_SERVICES: {label}[{i}]", entry))
    if not found:
        return None
    if instance is not None:
        named = [(w, e) for w, e in found if instance in (e.get("name"), e.get("instance_name"))]
        if not named:
            names = ", ".join(repr(e.get("name")) for _, e in found)
            raise DestinationError(
                f"VCAP_SERVICES: no destination service named {instance!r} (bound: {names})",
                hint="bind that instance to the app, or give the name of a bound one",
            )
        found = named
    where, entry = found[0]
    credentials = entry.get("credentials")
    if not isinstance(credentials, dict):
        raise DestinationError(f"{where}.credentials: missing or not a JSON object")
    name = entry.get("name") or entry.get("instance_name") or "?"
    return _binding_from(
        credentials,
        lambda key: f"{where}.credentials.{key}",
        source=f"VCAP_SERVICES service {name}",
    )


def _from_binding_root(root: Path, instance: str | None) -> Binding | None:
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        raise DestinationError(
            f"SERVICE_BINDING_ROOT={root}: directory not found",
            hint="mount the service binding secret there, or unset SERVICE_BINDING_ROOT",
        ) from None
    except OSError as exc:
        raise DestinationError(f"SERVICE_BINDING_ROOT={root}: cannot list: {exc}") from None
    candidates = [d for d in entries if _read_text(d / "type", missing="").strip() == "destination"]
    if not candidates:
        return None
    if instance is not None:
        named = [
            d
            for d in candidates
            if instance in (d.name, _read_text(d / "instance_name", missing="").strip())
        ]
        if not named:
            names = ", ".join(d.name for d in candidates)
            raise DestinationError(
                f"SERVICE_BINDING_ROOT={root}: no destination binding named {instance!r} "
                f"(found: {names})",
                hint="give the binding directory's name or its instance_name",
            )
        candidates = named
    directory = candidates[0]
    credentials = _binding_directory(directory)
    return _binding_from(
        credentials, lambda key: f"{directory / key}", source=f"service binding {directory}"
    )


def _binding_directory(directory: Path) -> dict[str, Any]:
    """The credentials of a servicebinding.io directory (one file per key)."""
    metadata_file = directory / ".metadata"
    if not metadata_file.is_file():
        return {
            p.name: _read_text(p)
            for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in ("type", "provider")
        }
    # The SAP BTP service operator describes each key: its format, and whether it is
    # a "container" holding the whole credentials object as JSON.
    metadata = _json_object(_read_text(metadata_file), str(metadata_file))
    properties = metadata.get("credentialProperties")
    if not isinstance(properties, list):
        raise DestinationError(
            f'{metadata_file}: key "credentialProperties" is missing or not a list'
        )
    credentials: dict[str, Any] = {}
    for i, prop in enumerate(properties):
        if not isinstance(prop, dict) or not _is_file_name(prop.get("name")):
            raise DestinationError(
                f'{metadata_file}: key "credentialProperties[{i}].name" is missing or invalid'
            )
        name = prop["name"]
        path = directory / name
        value: Any = _read_text(path)
        if prop.get("format") == "json" or prop.get("container"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise DestinationError(
                    f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}), though "
                    f"{metadata_file.name} says its format is json"
                ) from None
        if prop.get("container"):
            if not isinstance(value, dict):
                raise DestinationError(f"{path}: expected a JSON object of credentials")
            credentials.update(value)
        else:
            credentials[name] = value
    return credentials


def _is_file_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _read_text(path: Path, *, missing: str | None = None) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing is not None:
            return missing
        raise DestinationError(f"{path}: file not found in the service binding") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DestinationError(f"{path}: cannot read: {reason}") from None


def _binding_from(
    credentials: Mapping[str, Any], at: Callable[[str], str], *, source: str
) -> Binding:
    def optional(key: str) -> str | None:
        value = credentials.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise DestinationError(f"{at(key)}: expected a string, found {type(value).__name__}")
        return value.strip()

    def required(key: str) -> str:
        value = optional(key)
        if not value:
            raise DestinationError(
                f"{at(key)} is missing from the destination service binding",
                hint="use the complete service key of a destination service instance",
            )
        return value

    credential_type = (optional("credential-type") or "").lower()
    if not credential_type:
        has_x509 = credentials.get("certificate") and credentials.get("key")
        credential_type = "x509" if has_x509 and not credentials.get("clientsecret") else ""
    x509 = credential_type.startswith("x509")
    if credential_type and not x509 and credential_type not in SECRET_CREDENTIAL_TYPES:
        raise DestinationError(
            f"{at('credential-type')}: unsupported credential type {credential_type!r}",
            hint="use a binding with credential-type binding-secret, instance-secret or x509",
        )
    uri = _check_service_url(required("uri"), at("uri"))
    url = _check_service_url(required("url"), at("url"))
    client_id = required("clientid")
    if not x509:
        return Binding(
            uri=uri,
            url=url,
            client_id=client_id,
            credential_type=credential_type or "binding-secret",
            source=source,
            client_secret=required("clientsecret"),
        )
    if not credentials.get("certificate") or not credentials.get("key"):
        raise DestinationError(
            f"{at('credential-type')}: credential type {credential_type} without the "
            "certificate and key",
            hint="only bindings that carry their certificate and key (x509, x509_generated, "
            "x509_provided) can be used; create the service key with credential-type x509",
        )
    cert_url = optional("certurl")
    if cert_url is None and ".authentication." in url:
        # XSUAA's mTLS host is the same name with a `cert` label, which is what SAP's
        # own libraries assume when a binding has no certurl.
        cert_url = url.replace(".authentication.", ".authentication.cert.", 1)
    if cert_url is None:
        raise DestinationError(f"{at('certurl')} is missing from the X.509 binding")
    return Binding(
        uri=uri,
        url=url,
        client_id=client_id,
        credential_type=credential_type,
        source=source,
        certificate=_unescape_pem(required("certificate")),
        key=_unescape_pem(required("key")),
        cert_url=_check_service_url(cert_url, at("certurl")),
    )


def _unescape_pem(value: str) -> str:
    # A PEM copied out of a JSON viewer sometimes keeps its newlines as "\n".
    if "-----BEGIN" in value and "\n" not in value and "\\n" in value:
        return value.replace("\\n", "\n")
    return value


def _check_service_url(url: str, what: str) -> str:
    """``url`` without a trailing slash; https, or http to a loopback host."""
    try:
        parts = urlsplit(url)
        scheme, host, _ = parts.scheme, parts.hostname, parts.port
    except ValueError:
        scheme, host = "", None
    if scheme not in ("http", "https") or not host:
        raise DestinationError(f"{what}: not an http(s) URL: {url!r}")
    if scheme == "http" and not _is_loopback(host):
        raise DestinationError(
            f"{what}: {url} uses plain http; XSUAA and the Destination Service are only "
            "reached over https (plain http is accepted for loopback hosts only)",
            hint="use the https URL the service key shows",
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- destination


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
            _check_service_url(url, f"{binding.source}: {key}")
        self.binding = binding
        self._ca_file = ca_file
        self._timeout = timeout
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()
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
        async with self._token_lock:
            now = self._clock()
            if self._token is not None and now < self._token_expires:
                return self._token
            token, lifetime = await self._request_token()
            self._token = token
            self._token_expires = now + lifetime - min(TOKEN_MARGIN, lifetime / 10)
            return token

    def _forget_token(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def _request_token(self) -> tuple[str, float]:
        b = self.binding
        endpoint = b.token_endpoint
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json"}
        tls: ssl.SSLContext | None = None
        if b.uses_x509:
            form["client_id"] = b.client_id
            if endpoint.startswith("https:"):
                tls = self._mtls_context()
        else:
            # aiohttp.BasicAuth is deprecated and encode_basic_auth is too new (3.14).
            pair = f"{b.client_id}:{b.client_secret or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        what = f"XSUAA {endpoint}"
        session = self._get_session()
        try:
            async with session.post(
                endpoint,
                data=form,
                headers=headers,
                allow_redirects=False,
                ssl=tls if tls is not None else True,  # True: the session's context
            ) as resp:
                status, body = resp.status, await _read_body(resp, what)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unavailable(what, exc) from exc
        if status == 200:
            data = _json_body(body, what)
            token = data.get("access_token")
            if not isinstance(token, str) or not token:
                raise DestinationError(f"{what}: the token response has no access_token")
            expires = data.get("expires_in")
            lifetime = (
                float(expires)
                if isinstance(expires, int | float) and expires > 0
                else DEFAULT_TOKEN_LIFETIME
            )
            return token, lifetime
        detail = self._scrub(_error_detail(body))
        if status in (400, 401, 403):
            how = "client certificate" if b.uses_x509 else "client id and secret"
            raise DestinationError(
                f"{what} refused the {how} of {b.source} (HTTP {status}{detail})",
                hint="the service key may have been deleted or renewed: create a new service "
                "key (or rebind) and use its JSON",
            )
        if status in (408, 429) or status >= 500:
            raise DestinationUnavailable(f"{what}: HTTP {status}{detail}")
        raise DestinationError(f"{what}: unexpected answer HTTP {status}{detail}")

    def _mtls_context(self) -> ssl.SSLContext:
        # Built for each token request (a few a day), so an expired binding
        # certificate is reported as such rather than as XSUAA's refusal.
        b = self.binding
        assert b.certificate is not None and b.key is not None
        bundle = identity.read_bundle_bytes(
            (b.certificate + "\n" + b.key).encode(), source=f"{b.source}: certificate and key"
        )
        return identity.client_ssl_context(bundle.identity(), ca_file=self._ca_file)

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
                    body = await _read_body(resp, what)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _unavailable(what, exc) from exc
            if status == 401 and attempt == 1:
                self._forget_token(token)
                continue
            break
        if status == 200:
            data = _json_body(body, what)
            result = FetchResult(Destination.from_json(data, name=name), etag=etag)
            if etag:
                self._last[name] = result
            else:
                self._last.pop(name, None)
            return result
        if status == 304 and previous is not None:
            return FetchResult(previous.destination, not_modified=True, etag=previous.etag)
        detail = self._scrub(_error_detail(body))
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

    def _scrub(self, text: str) -> str:
        """``text`` without any secret we hold (a server might echo what we sent)."""
        for secret in (self.binding.client_secret, self._token):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


def _unavailable(what: str, exc: BaseException) -> DestinationUnavailable:
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    elif isinstance(exc, aiohttp.ClientSSLError):
        reason = f"TLS failed: {exc}"
    else:
        reason = str(exc) or type(exc).__name__
    return DestinationUnavailable(
        f"{what}: cannot reach it: {reason}",
        hint="check the network and proxy settings; the sidecar retries",
    )


async def _read_body(resp: aiohttp.ClientResponse, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise DestinationError(f"{what}: the answer is larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_body(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        # An HTML page from a proxy or a maintenance screen: worth another try later.
        raise DestinationUnavailable(f"{what}: the answer is not JSON") from None
    if not isinstance(data, dict):
        raise DestinationError(f"{what}: the answer is not a JSON object")
    return data


def _error_detail(body: bytes) -> str:
    """A short reason from an error body: ErrorMessage, error_description, or text."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        for key in ("ErrorMessage", "error_description", "error", "message"):
            if isinstance(data.get(key), str) and data[key]:
                return f": {data[key][:300]}"
        return ""
    text = body.decode("utf-8", "replace").strip()
    if not text or text.startswith("<"):
        return ""
    return f": {' '.join(text.split())[:300]}"
