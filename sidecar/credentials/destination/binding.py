"""Where a destination service binding is found: service key, VCAP_SERVICES, SERVICE_BINDING_ROOT.

Pure: reads the files and environment it is pointed at and returns a `Binding`
(the service's URI, XSUAA's URL and the client credentials), or says where it
looked. The service URLs are checked here (https, or http on loopback only).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sidecar.config import DestinationRef
from sidecar.errors import DestinationError

SECRET_CREDENTIAL_TYPES = frozenset({"binding-secret", "instance-secret"})


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
    uri = check_service_url(required("uri"), at("uri"))
    url = check_service_url(required("url"), at("url"))
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
        cert_url=check_service_url(cert_url, at("certurl")),
    )


def _unescape_pem(value: str) -> str:
    # A PEM copied out of a JSON viewer sometimes keeps its newlines as "\n".
    if "-----BEGIN" in value and "\n" not in value and "\\n" in value:
        return value.replace("\\n", "\n")
    return value


def check_service_url(url: str, what: str) -> str:
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
