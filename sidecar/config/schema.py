"""The configuration model: frozen, typed data and nothing else.

What a validated config is (routes, credentials, TLS, timeouts, limits, logging);
``sidecar.config.load`` builds it, ``sidecar.config.values`` parses its small values.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_CONFIG_NAME = "sidecar.yaml"
CONFIG_ENV = "SIDECAR_CONFIG"

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
CredentialKind = Literal["pem", "pkcs12", "destination"]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "text"
    access_log: bool = True
    query_values: bool = False


@dataclass(frozen=True)
class DestinationRef:
    name: str
    service_key: Path | None = None
    refresh: float = 15 * 60


@dataclass(frozen=True)
class CredentialsConfig:
    pem: Path | None = None
    key: Path | None = None
    pkcs12: Path | None = None
    password_env: str | None = None
    password_file: Path | None = None
    destination: DestinationRef | None = None
    warn_before: float = 30 * 86400
    # A renewed certificate is used only once the upstream accepts it (one probe request
    # to probe_path first); while refused, the current one stays and the new one is pending.
    probe_before_switch: bool = True
    probe_path: str = "/odata/v2/"

    @property
    def kind(self) -> CredentialKind:
        if self.pem is not None:
            return "pem"
        if self.pkcs12 is not None:
            return "pkcs12"
        return "destination"

    @property
    def files(self) -> tuple[Path, ...]:
        """The files whose change means the identity must be read again."""
        return tuple(p for p in (self.pem, self.key, self.pkcs12, self.password_file) if p)


@dataclass(frozen=True)
class TLSConfig:
    ca_file: Path | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    read: float = 300.0
    shutdown: float = 10.0


@dataclass(frozen=True)
class LimitsConfig:
    """Protection of a listener against clients that send too much or too slowly, and
    of the upstream against too many connections at once."""

    max_connections: int = 1000  # more wait (unread) until a slot frees
    max_header_size: int = 16384  # bytes of the request line and of each header line
    max_headers: int = 100
    header_timeout: float = 10.0  # a request head must arrive within this (slowloris)
    idle_timeout: float = 75.0  # keep-alive connections idle longer are closed
    max_body: int | None = None  # bytes; larger request bodies get 413
    # Open upstream connections (one request each) at most; a request waits up to
    # timeouts.connect for one to free, then gets 504.
    upstream_connections: int = 100


@dataclass(frozen=True)
class InboundConfig:
    allow_remote: bool = False
    token_env: str | None = None


@dataclass(frozen=True)
class SessionConfig:
    """What the sidecar keeps of the upstream's sessions for clients that keep none."""

    reuse: bool = True  # keep the upstream's session cookies for clients that send none
    csrf: bool = True  # fetch, cache and send X-CSRF-Token on writes that carry none


@dataclass(frozen=True)
class InterceptConfig:
    """Serving CONNECT for the upstream's own names, for clients that only speak https."""

    enabled: bool = False
    cert_dir: Path | None = None  # None: the user state dir (sidecar.intercept.certificate)


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


DEFAULT_LISTEN_ADDRESS = ListenAddress(host="127.0.0.1", port=8080)  # DEFAULT_LISTEN, parsed


@dataclass(frozen=True)
class UpstreamURL:
    """An https origin plus an optional path prefix, e.g. ``https://h:8443/api``."""

    host: str
    port: int = 443
    path_prefix: str = ""
    scheme: str = "https"

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{host}{port}"

    def __str__(self) -> str:
        return self.origin + self.path_prefix


@dataclass(frozen=True)
class RouteConfig:
    name: str
    credentials: CredentialsConfig
    listen: ListenAddress = field(default_factory=lambda: DEFAULT_LISTEN_ADDRESS)
    upstream: UpstreamURL | None = None
    company_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    tls: TLSConfig = field(default_factory=TLSConfig)
    rewrite_links: bool = True
    rewrite_hosts: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    intercept: InterceptConfig = field(default_factory=InterceptConfig)


@dataclass(frozen=True)
class Config:
    routes: tuple[RouteConfig, ...]
    log: LogConfig = field(default_factory=LogConfig)
    admin_prefix: str = "/-/"
    source: Path | None = None


@dataclass(frozen=True)
class RouteFlags:
    """The route flags of the command line; None means "not given"."""

    listen: str | None = None
    upstream: str | None = None
    cert: str | None = None
    key: str | None = None
    pkcs12: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    company_id: str | None = None
    headers: tuple[str, ...] = ()
    destination: str | None = None
    service_key: str | None = None
    ca_file: str | None = None
    allow_remote: bool = False
    token_env: str | None = None

    def any_given(self) -> bool:
        return any(
            (
                self.listen,
                self.upstream,
                self.cert,
                self.key,
                self.pkcs12,
                self.password_env,
                self.password_file,
                self.company_id,
                self.headers,
                self.destination,
                self.service_key,
                self.ca_file,
                self.allow_remote,
                self.token_env,
            )
        )
