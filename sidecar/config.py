"""The configuration model: frozen dataclasses and the one place that validates them.

A config comes from a YAML file (see DESIGN.md), from route flags on the
command line, or from both (flags override the single route of a file).
Both paths go through the same validator: the raw input becomes a tree of
`_Value`s that remember where each value came from (``sidecar.yaml:12`` or
``--cert``), and every error names the key path and that origin.

Parsing is pure: nothing here opens a certificate or a socket. Paths are made
absolute against the config file's folder; ``${VAR}`` is expanded from the
environment mapping passed in.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from sidecar.errors import ConfigError, UsageError
from sidecar.headers import header_problem

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
    listen: ListenAddress = field(default_factory=lambda: parse_listen(DEFAULT_LISTEN))
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


# ------------------------------------------------------------------ small parsers

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_duration(text: str | int | float) -> float:
    """``500ms``, ``10s``, ``15m``, ``1h``, ``30d`` or a number of seconds."""
    if isinstance(text, bool):
        raise ValueError("expected a duration such as 500ms, 10s, 15m, 1h, 30d")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        if not math.isfinite(text):
            raise ValueError(f"{text!r} is not a duration; use a number of seconds or 10s, 15m")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a duration; use a number of seconds or 500ms, 10s, 15m, 1h, 30d"
        )
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
                 "gb": 1000**3, "gib": 1024**3}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``16384``, ``64KiB``, ``100MB``, ``1GiB``: a number of bytes."""
    if isinstance(text, bool) or isinstance(text, float):
        raise ValueError("expected a whole number of bytes, e.g. 100MB or 64KiB")
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size; use bytes or 64KiB, 100MB, 1GiB")
    return int(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "b").lower()]


def parse_count(value: str | int) -> int:
    """A whole number, given as a YAML integer or as text."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a whole number, got {value!r}")
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def parse_listen(text: str) -> ListenAddress:
    """``HOST:PORT``, ``[v6]:PORT`` or a bare ``PORT`` (on 127.0.0.1)."""
    text = text.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT; write IPv6 hosts as [::1]:8080")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8080")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 hosts in brackets, e.g. [::1]:8080")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return ListenAddress(host=host, port=int(port_text))


def parse_upstream(text: str) -> UpstreamURL:
    """An ``https://`` URL without query, fragment or user info."""
    parts = urlsplit(text.strip())
    if parts.scheme != "https":
        raise ValueError(
            f"{text!r} must start with https:// (the sidecar speaks mTLS to the upstream)"
        )
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host name")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r} must not hold a query or fragment; use the route's `query`")
    if parts.username or parts.password:
        raise ValueError(f"{text!r} must not hold user info; the client certificate authenticates")
    try:
        port = parts.port or 443
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    return UpstreamURL(host=parts.hostname.lower(), port=port, path_prefix=parts.path.rstrip("/"))


def parse_header_line(text: str) -> tuple[str, str]:
    """``Name: value`` as given to ``--header``."""
    name, sep, value = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r} is not 'Name: value'")
    return name.strip(), value.strip()


# ------------------------------------------------------------ raw values with origin


@dataclass
class _Value:
    """A raw value plus where it came from, for error messages."""

    value: Any
    where: str


def _yaml_tree(text: str, filename: str) -> _Value:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return _Value({}, f"{filename}:1")
        return _convert(loader, node, filename)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{filename}{line}: not valid YAML: {exc.problem or exc}",
            hint="check indentation and quoting around that line",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _convert(
    loader: yaml.SafeLoader, node: yaml.Node, filename: str, seen: tuple[int, ...] = ()
) -> _Value:
    where = f"{filename}:{node.start_mark.line + 1}"
    if id(node) in seen:
        raise ConfigError(
            f"{where}: an alias refers to the mapping or list that contains it",
            hint="YAML anchors (&a) may be reused with *a, but not inside themselves",
        )
    seen = (*seen, id(node))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[str, _Value] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError(
                    f"{filename}:{key_node.start_mark.line + 1}: key {key!r} must be a string"
                )
            if key in out:
                raise ConfigError(
                    f"{filename}:{key_node.start_mark.line + 1}: key {key!r} appears twice",
                    hint="remove one of them",
                )
            value = _convert(loader, value_node, filename, seen)
            # A block mapping or list starts on the line after its key; errors about the
            # value name the key, so they point at the key's line.
            value.where = f"{filename}:{key_node.start_mark.line + 1}"
            out[key] = value
        return _Value(out, where)
    if isinstance(node, yaml.SequenceNode):
        return _Value([_convert(loader, n, filename, seen) for n in node.value], where)
    return _Value(loader.construct_object(node, deep=True), where)


# ---------------------------------------------------------------------- validator

T = TypeVar("T")
N = TypeVar("N", int, float)
D = TypeVar("D")


class _Reader:
    """Walks a `_Value` tree; every error names the key path and its origin."""

    def __init__(self, env: Mapping[str, str], base_dir: Path) -> None:
        self.env = env
        self.base_dir = base_dir

    # -- errors

    @staticmethod
    def fail(path: str, v: _Value | None, message: str, hint: str | None = None) -> ConfigError:
        origin = f" ({v.where})" if v is not None else ""
        return ConfigError(f"{path}{origin}: {message}", hint=hint)

    # -- structure

    def mapping(self, path: str, v: _Value | None, allowed: Iterable[str]) -> dict[str, _Value]:
        if v is None or v.value is None:
            return {}
        if not isinstance(v.value, dict):
            raise self.fail(path, v, f"expected a mapping, got {_kind(v.value)}")
        allowed = tuple(allowed)
        for key in v.value:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(allowed)
                raise self.fail(_join(path, key), v.value[key], "unknown key", hint)
        return dict(v.value)

    def string(self, path: str, v: _Value | None, *, required: bool = False) -> str | None:
        if v is None or v.value is None:
            if required:
                raise self.fail(path, v, "is required")
            return None
        if isinstance(v.value, bool) or not isinstance(v.value, str | int | float):
            raise self.fail(path, v, f"expected a string, got {_kind(v.value)}")
        text = self.expand(path, v, str(v.value))
        if required and not text:
            raise self.fail(path, v, "must not be empty")
        return text

    def expand(self, path: str, v: _Value, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if not _ENV_NAME.match(name):
                raise self.fail(path, v, f"${{{name}}} is not a valid environment variable name")
            if name not in self.env:
                raise self.fail(
                    path,
                    v,
                    f"environment variable {name} is not set",
                    f"export {name}=... or write the value directly",
                )
            return self.env[name]

        return _ENV_REF.sub(sub, text)

    def convert(
        self, path: str, v: _Value | None, parse: Callable[[Any], T], *, numbers: bool = False
    ) -> T | None:
        if v is None or v.value is None:
            return None
        # Only parsers that take numbers (durations) see YAML numbers and booleans as they
        # are; the others get text (`listen: 8080` is a port), and mappings/lists never pass.
        scalar = isinstance(v.value, bool | int | float)
        raw = v.value if numbers and scalar else self.string(path, v)
        try:
            return parse(raw)
        except ValueError as exc:
            raise self.fail(path, v, str(exc)) from None

    def boolean(self, path: str, v: _Value | None, default: bool) -> bool:
        if v is None or v.value is None:
            return default
        if isinstance(v.value, bool):
            return v.value
        if isinstance(v.value, str):
            text = self.expand(path, v, v.value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
        raise self.fail(path, v, f"expected true or false, got {v.value!r}")

    def duration(self, path: str, v: _Value | None, default: float, minimum: float = 0) -> float:
        return self.bounded(path, v, parse_duration, default, minimum, "s")

    def bounded(
        self,
        path: str,
        v: _Value | None,
        parse: Callable[[Any], N],
        default: D,
        minimum: N,
        unit: str = "",
    ) -> N | D:
        """A number parsed by ``parse``, at least ``minimum``, or ``default`` when absent."""
        value = self.convert(path, v, parse, numbers=True)
        if value is None:
            return default
        if value < minimum:
            raise self.fail(path, v, f"must be at least {minimum:g}{unit}")
        return value

    def choice(self, path: str, v: _Value | None, options: tuple[str, ...], default: str) -> str:
        text = self.string(path, v)
        if text is None:
            return default
        if text.lower() not in options:
            raise self.fail(path, v, f"{text!r} is not one of: {', '.join(options)}")
        return text.lower()

    def path(self, path: str, v: _Value | None) -> Path | None:
        text = self.string(path, v)
        if text is None or text == "":
            return None
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def env_name(self, path: str, v: _Value | None) -> str | None:
        name = self.string(path, v)
        if name is not None and not _ENV_NAME.match(name):
            raise self.fail(
                path,
                v,
                f"{name!r} is not an environment variable name",
                "give the variable's name (e.g. SIDECAR_KEY_PASSWORD), not its value",
            )
        return name

    def str_map(self, path: str, v: _Value | None, *, headers: bool = False) -> dict[str, str]:
        if v is None or v.value is None:
            return {}
        if not isinstance(v.value, dict):
            raise self.fail(path, v, f"expected a mapping of names to values, got {_kind(v.value)}")
        out: dict[str, str] = {}
        for key, item in v.value.items():
            sub = _join(path, key)
            value = self.string(sub, item, required=False)
            if value is None:
                raise self.fail(sub, item, "needs a value")
            if "\r" in value or "\n" in value or "\0" in value:
                raise self.fail(sub, item, "must not contain line breaks or NUL")
            # The rules a destination's headers meet too (sidecar.headers).
            problem = header_problem(key, value) if headers else None
            if problem is not None:
                raise self.fail(sub, item, f"{key!r} {problem}")
            out[key.lower() if headers else key] = value
        return out

    def str_list(self, path: str, v: _Value | None) -> tuple[str, ...]:
        if v is None or v.value is None:
            return ()
        if not isinstance(v.value, list):
            raise self.fail(path, v, f"expected a list, got {_kind(v.value)}")
        items = [self.string(f"{path}[{i}]", item, required=True) for i, item in enumerate(v.value)]
        return tuple(i.lower() for i in items if i)

    # -- the schema

    def config(self, root: _Value, source: Path | None) -> Config:
        top = self.mapping("config", root, ("log", "admin_prefix", "routes"))
        log = self.log(top.get("log"))
        prefix = self.string("admin_prefix", top.get("admin_prefix")) or "/-/"
        if not (prefix.startswith("/") and prefix.endswith("/")) or len(prefix) < 3:
            raise self.fail(
                "admin_prefix", top.get("admin_prefix"), "must start and end with '/', e.g. /-/"
            )
        routes_v = top.get("routes")
        if routes_v is None or routes_v.value is None or routes_v.value == []:
            raise self.fail(
                "routes",
                routes_v or root,
                "at least one route is required",
                "see `mtls-sidecar init`",
            )
        if not isinstance(routes_v.value, list):
            raise self.fail("routes", routes_v, f"expected a list, got {_kind(routes_v.value)}")
        routes = tuple(self.route(f"routes[{i}]", r) for i, r in enumerate(routes_v.value))
        _check_unique(routes, routes_v.value, self)
        return Config(routes=routes, log=log, admin_prefix=prefix, source=source)

    def log(self, v: _Value | None) -> LogConfig:
        m = self.mapping("log", v, ("level", "format", "access_log", "query_values"))
        return LogConfig(
            level=self.choice(  # type: ignore[arg-type]
                "log.level", m.get("level"), ("debug", "info", "warning", "error"), "info"
            ),
            format=self.choice(  # type: ignore[arg-type]
                "log.format", m.get("format"), ("text", "json"), "text"
            ),
            access_log=self.boolean("log.access_log", m.get("access_log"), True),
            query_values=self.boolean("log.query_values", m.get("query_values"), False),
        )

    def route(self, path: str, v: _Value) -> RouteConfig:
        keys = (
            "name", "listen", "upstream", "company_id", "headers", "query", "credentials",
            "tls", "rewrite_links", "rewrite_hosts", "timeouts", "inbound", "limits",
        )  # fmt: skip
        m = self.mapping(path, v, keys)
        if v.value is None:
            raise self.fail(path, v, "a route must be a mapping with at least `credentials`")
        given = self.string(f"{path}.name", m.get("name"))
        name = given or ("default" if path == "routes[0]" else path)
        if given and not re.match(r"^[A-Za-z0-9_.-]+$", given):
            raise self.fail(
                f"{path}.name", m.get("name"), "use letters, digits, '.', '_' and '-' only"
            )
        listen = self.convert(f"{path}.listen", m.get("listen"), parse_listen)
        listen = listen or parse_listen(DEFAULT_LISTEN)
        credentials = self.credentials(f"{path}.credentials", m.get("credentials"), v)
        upstream = self.convert(f"{path}.upstream", m.get("upstream"), parse_upstream)
        if upstream is None and credentials.destination is None:
            raise self.fail(
                f"{path}.upstream",
                m.get("upstream") or v,
                "is required unless the credentials come from a destination",
                "e.g. upstream: https://api.successfactors.eu (--upstream URL on the command line)",
            )
        company = self.string(f"{path}.company_id", m.get("company_id"))
        headers = self.str_map(f"{path}.headers", m.get("headers"), headers=True)
        inbound = self.inbound(f"{path}.inbound", m.get("inbound"))
        if not listen.is_loopback and not inbound.allow_remote:
            raise self.fail(
                f"{path}.listen",
                m.get("listen"),
                f"{listen} is reachable from other machines",
                "listen on 127.0.0.1, or set inbound.allow_remote: true and inbound.token_env",
            )
        tls_m = self.mapping(f"{path}.tls", m.get("tls"), ("ca_file", "server_name"))
        return RouteConfig(
            name=name,
            listen=listen,
            upstream=upstream,
            company_id=company or None,
            headers=headers,
            query=self.str_map(f"{path}.query", m.get("query")),
            credentials=credentials,
            tls=TLSConfig(
                ca_file=self.path(f"{path}.tls.ca_file", tls_m.get("ca_file")),
                server_name=self.string(f"{path}.tls.server_name", tls_m.get("server_name"))
                or None,
            ),
            rewrite_links=self.boolean(f"{path}.rewrite_links", m.get("rewrite_links"), True),
            rewrite_hosts=self.str_list(f"{path}.rewrite_hosts", m.get("rewrite_hosts")),
            timeouts=self.timeouts(f"{path}.timeouts", m.get("timeouts")),
            limits=self.limits(f"{path}.limits", m.get("limits")),
            inbound=inbound,
        )

    def credentials(self, path: str, v: _Value | None, route: _Value) -> CredentialsConfig:
        keys = (
            "pem", "key", "pkcs12", "password_env", "password_file", "destination", "warn_before",
        )  # fmt: skip
        if v is None or v.value is None:
            raise self.fail(
                path,
                v or route,
                "is required",
                "give credentials.pem, credentials.pkcs12 or credentials.destination "
                "(--cert, --pkcs12 or --destination on the command line)",
            )
        m = self.mapping(path, v, keys)
        sources = [k for k in ("pem", "pkcs12", "destination") if m.get(k) and m[k].value]
        if len(sources) != 1:
            found = ", ".join(sources) if sources else "none"
            raise self.fail(
                path, v, f"needs exactly one of pem, pkcs12, destination (found: {found})"
            )
        if m.get("key") and m["key"].value and sources[0] != "pem":
            raise self.fail(f"{path}.key", m["key"], "goes with `pem` only")
        pw_env = self.env_name(f"{path}.password_env", m.get("password_env"))
        pw_file = self.path(f"{path}.password_file", m.get("password_file"))
        if pw_env and pw_file:
            raise self.fail(
                f"{path}.password_file",
                m.get("password_file"),
                "give password_env or password_file, not both",
            )
        return CredentialsConfig(
            pem=self.path(f"{path}.pem", m.get("pem")),
            key=self.path(f"{path}.key", m.get("key")),
            pkcs12=self.path(f"{path}.pkcs12", m.get("pkcs12")),
            password_env=pw_env,
            password_file=pw_file,
            destination=self.destination(f"{path}.destination", m.get("destination")),
            warn_before=self.duration(f"{path}.warn_before", m.get("warn_before"), 30 * 86400),
        )

    def destination(self, path: str, v: _Value | None) -> DestinationRef | None:
        if v is None or not v.value:
            return None
        if isinstance(v.value, str):  # shorthand: destination: NAME
            v = _Value({"name": v}, v.where)
        m = self.mapping(path, v, ("name", "service_key", "refresh"))
        name = self.string(f"{path}.name", m.get("name"), required=True)
        assert name is not None
        return DestinationRef(
            name=name,
            service_key=self.path(f"{path}.service_key", m.get("service_key")),
            refresh=self.duration(f"{path}.refresh", m.get("refresh"), 15 * 60, minimum=1),
        )

    def timeouts(self, path: str, v: _Value | None) -> Timeouts:
        m = self.mapping(path, v, ("connect", "read", "shutdown"))
        return Timeouts(
            connect=self.duration(f"{path}.connect", m.get("connect"), 10.0, minimum=0.001),
            read=self.duration(f"{path}.read", m.get("read"), 300.0, minimum=0.001),
            shutdown=self.duration(f"{path}.shutdown", m.get("shutdown"), 10.0),
        )

    def limits(self, path: str, v: _Value | None) -> LimitsConfig:
        keys = (
            "max_connections", "max_header_size", "max_headers", "header_timeout",
            "idle_timeout", "max_body", "upstream_connections",
        )  # fmt: skip
        m = self.mapping(path, v, keys)
        d = LimitsConfig()
        return LimitsConfig(
            max_connections=self.count(
                f"{path}.max_connections", m.get("max_connections"), d.max_connections, 1
            ),  # fmt: skip
            max_header_size=self.size(
                f"{path}.max_header_size", m.get("max_header_size"), d.max_header_size, 1024
            ),  # fmt: skip
            max_headers=self.count(f"{path}.max_headers", m.get("max_headers"), d.max_headers, 8),
            header_timeout=self.duration(
                f"{path}.header_timeout", m.get("header_timeout"), d.header_timeout, minimum=0.1
            ),  # fmt: skip
            idle_timeout=self.duration(
                f"{path}.idle_timeout", m.get("idle_timeout"), d.idle_timeout, minimum=0.1
            ),  # fmt: skip
            max_body=self.size(f"{path}.max_body", m.get("max_body"), None, 1),
            upstream_connections=self.count(
                f"{path}.upstream_connections",
                m.get("upstream_connections"),
                d.upstream_connections,
                1,
            ),
        )

    def count(self, path: str, v: _Value | None, default: int, minimum: int) -> int:
        return self.bounded(path, v, parse_count, default, minimum)

    def size(self, path: str, v: _Value | None, default: D, minimum: int) -> int | D:
        return self.bounded(path, v, parse_size, default, minimum, " bytes")

    def inbound(self, path: str, v: _Value | None) -> InboundConfig:
        m = self.mapping(path, v, ("allow_remote", "token_env"))
        allow = self.boolean(f"{path}.allow_remote", m.get("allow_remote"), False)
        token_env = self.env_name(f"{path}.token_env", m.get("token_env"))
        if allow and not token_env:
            raise self.fail(
                f"{path}.token_env",
                m.get("token_env") or v,
                "is required when allow_remote is true",
                "set token_env to a variable that holds a long random token; clients send it "
                "as X-Sidecar-Token",
            )
        return InboundConfig(allow_remote=allow, token_env=token_env)


def _check_unique(routes: tuple[RouteConfig, ...], raw: list[_Value], r: _Reader) -> None:
    names: dict[str, int] = {}
    listens: dict[ListenAddress, int] = {}
    for i, route in enumerate(routes):
        if route.name in names:
            raise r.fail(
                f"routes[{i}].name",
                _key_value(raw[i], "name"),
                f"{route.name!r} is already used by routes[{names[route.name]}]",
                "give every route a unique name",
            )
        names[route.name] = i
        if route.listen.port and route.listen in listens:
            raise r.fail(
                f"routes[{i}].listen",
                _key_value(raw[i], "listen"),
                f"{route.listen} is already used by routes[{listens[route.listen]}]",
                "give every route its own port",
            )
        listens[route.listen] = i


def _key_value(v: _Value, key: str) -> _Value:
    """The value of ``key`` in mapping ``v`` if written there, else ``v`` itself."""
    item = v.value.get(key) if isinstance(v.value, dict) else None
    return item if isinstance(item, _Value) else v


def _join(path: str, key: str) -> str:
    return key if path == "config" else f"{path}.{key}"


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


# ------------------------------------------------------------------------- public


# Route flag -> key path inside routes[0]; used both to merge and to name the flag in errors.
_FLAG_PATHS: dict[str, tuple[str, ...]] = {
    "--listen": ("listen",),
    "--upstream": ("upstream",),
    "--cert": ("credentials", "pem"),
    "--key": ("credentials", "key"),
    "--pkcs12": ("credentials", "pkcs12"),
    "--password-env": ("credentials", "password_env"),
    "--password-file": ("credentials", "password_file"),
    "--company-id": ("company_id",),
    "--destination": ("credentials", "destination", "name"),
    "--service-key": ("credentials", "destination", "service_key"),
    "--ca-file": ("tls", "ca_file"),
    "--allow-remote": ("inbound", "allow_remote"),
    "--token-env": ("inbound", "token_env"),
}


def parse_config(
    text: str,
    *,
    filename: str = DEFAULT_CONFIG_NAME,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: RouteFlags | None = None,
    cwd: Path | None = None,
) -> Config:
    """Parse YAML text (and optional route flags) into a validated `Config`."""
    env = os.environ if env is None else env
    root = _yaml_tree(text, filename)
    if flags is not None and flags.any_given():
        root = _merge_flags(root, flags, cwd or Path.cwd())
    reader = _Reader(env, base_dir if base_dir is not None else Path.cwd())
    source = (base_dir / filename) if base_dir is not None else None
    return reader.config(root, source)


def config_from_flags(
    flags: RouteFlags, *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Config:
    """A one-route config built from route flags alone."""
    cwd = cwd or Path.cwd()
    root = _merge_flags(_Value({}, "command line"), flags, cwd)
    return _Reader(os.environ if env is None else env, cwd).config(root, None)


def find_config_file(explicit: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """``-c FILE``, else ``$SIDECAR_CONFIG``, else ``./sidecar.yaml`` if it exists."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def load_config(
    path: Path | None,
    flags: RouteFlags | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read the config file (if any), merge route flags, validate."""
    flags = flags or RouteFlags()
    if path is None:
        if not flags.any_given():
            raise UsageError(
                "no configuration: no -c FILE, no $SIDECAR_CONFIG and no ./sidecar.yaml",
                hint="create one with `mtls-sidecar init`, or give route flags such as "
                "--upstream and --cert",
            )
        return config_from_flags(flags, env=env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found",
            hint="check the path, or create one with `mtls-sidecar init`",
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    base = path.resolve().parent
    return parse_config(text, filename=path.name, base_dir=base, env=env, flags=flags)


def _merge_flags(root: _Value, flags: RouteFlags, cwd: Path) -> _Value:
    """Override the single route of ``root`` with the route flags."""
    top = root.value if isinstance(root.value, dict) else {}
    routes_v = top.get("routes")
    routes = routes_v.value if routes_v is not None and isinstance(routes_v.value, list) else []
    if len(routes) > 1:
        raise UsageError(
            f"route flags cannot be combined with a config file that has {len(routes)} routes",
            hint="edit the file, or use the flags without -c",
        )
    route = routes[0] if routes else _Value({}, "command line")
    if not isinstance(route.value, dict):
        route = _Value({}, route.where)
    values: dict[str, Any] = {
        "--listen": flags.listen,
        "--upstream": flags.upstream,
        "--cert": _abs(flags.cert, cwd),
        "--key": _abs(flags.key, cwd),
        "--pkcs12": _abs(flags.pkcs12, cwd),
        "--password-env": flags.password_env,
        "--password-file": _abs(flags.password_file, cwd),
        "--company-id": flags.company_id,
        "--destination": flags.destination,
        "--service-key": _abs(flags.service_key, cwd),
        "--ca-file": _abs(flags.ca_file, cwd),
        "--allow-remote": flags.allow_remote or None,
        "--token-env": flags.token_env,
    }
    creds = route.value.get("credentials")
    if any(values[f] for f in ("--cert", "--pkcs12", "--destination")) and creds is not None:
        # A credential source given on the command line replaces the file's source.
        kept = {
            k: v
            for k, v in (creds.value or {}).items()
            if k in ("password_env", "password_file", "warn_before")
        }
        route.value["credentials"] = _Value(kept, creds.where)
    for flag, value in values.items():
        if value is None:
            continue
        target = route
        keys = _FLAG_PATHS[flag]
        for key in keys[:-1]:
            nxt = target.value.get(key)
            if nxt is None or not isinstance(nxt.value, dict):
                nxt = _Value({}, flag)
                target.value[key] = nxt
            target = nxt
        target.value[keys[-1]] = _Value(value, flag)
    if flags.headers:
        headers = route.value.get("headers")
        merged = dict(headers.value) if headers and isinstance(headers.value, dict) else {}
        for line in flags.headers:
            try:
                name, value = parse_header_line(line)
            except ValueError as exc:
                raise ConfigError(f"--header: {exc}", hint="write --header 'Name: value'") from None
            merged[name] = _Value(value, "--header")
        route.value["headers"] = _Value(merged, "--header")
    top = dict(top)
    top["routes"] = _Value([route], routes_v.where if routes_v else "command line")
    return _Value(top, root.where)


def _abs(path: str | None, cwd: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else cwd / p)
