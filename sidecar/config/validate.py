"""The one place that validates a config: a `Raw` tree in, frozen `Config` out.

Every error names the key path and the value's origin; ``${VAR}`` is expanded
from the environment mapping given; paths are made absolute against the
config file's folder. Nothing here opens a file or a socket.

Its ~450 lines are one `Reader` walking the whole schema on purpose: every key's
rule sits beside its neighbours', and a split would only scatter the key paths.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sidecar.config.schema import (
    DEFAULT_LISTEN,
    Config,
    CredentialsConfig,
    DestinationRef,
    InboundConfig,
    InterceptConfig,
    LimitsConfig,
    ListenAddress,
    LogConfig,
    RouteConfig,
    SessionConfig,
    Timeouts,
    TLSConfig,
)
from sidecar.config.tree import Raw
from sidecar.config.values import (
    parse_count,
    parse_duration,
    parse_listen,
    parse_size,
    parse_upstream,
)
from sidecar.errors import ConfigError
from sidecar.http_rules import has_control, header_problem

_ENV_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# ---------------------------------------------------------------------- validator

T = TypeVar("T")
N = TypeVar("N", int, float)
D = TypeVar("D")


class Reader:
    """Walks a `Raw` tree; every error names the key path and its origin."""

    def __init__(self, env: Mapping[str, str], base_dir: Path) -> None:
        self.env = env
        self.base_dir = base_dir

    # -- errors

    @staticmethod
    def fail(path: str, v: Raw | None, message: str, hint: str | None = None) -> ConfigError:
        origin = f" ({v.where})" if v is not None else ""
        return ConfigError(f"{path}{origin}: {message}", hint=hint)

    # -- structure

    def mapping(self, path: str, v: Raw | None, allowed: Iterable[str]) -> dict[str, Raw]:
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

    def string(self, path: str, v: Raw | None, *, required: bool = False) -> str | None:
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

    def expand(self, path: str, v: Raw, text: str) -> str:
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
        self, path: str, v: Raw | None, parse: Callable[[Any], T], *, numbers: bool = False
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

    def boolean(self, path: str, v: Raw | None, default: bool) -> bool:
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

    def duration(self, path: str, v: Raw | None, default: float, minimum: float = 0) -> float:
        return self.bounded(path, v, parse_duration, default, minimum, "s")

    def bounded(
        self,
        path: str,
        v: Raw | None,
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

    def choice(self, path: str, v: Raw | None, options: tuple[str, ...], default: str) -> str:
        text = self.string(path, v)
        if text is None:
            return default
        if text.lower() not in options:
            raise self.fail(path, v, f"{text!r} is not one of: {', '.join(options)}")
        return text.lower()

    def path(self, path: str, v: Raw | None) -> Path | None:
        text = self.string(path, v)
        if text is None or text == "":
            return None
        p = Path(text).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def env_name(self, path: str, v: Raw | None) -> str | None:
        name = self.string(path, v)
        if name is not None and not _ENV_NAME.match(name):
            raise self.fail(
                path,
                v,
                f"{name!r} is not an environment variable name",
                "give the variable's name (e.g. SIDECAR_KEY_PASSWORD), not its value",
            )
        return name

    def str_map(self, path: str, v: Raw | None, *, headers: bool = False) -> dict[str, str]:
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
            # The rules a destination's headers meet too (sidecar.forward.headers).
            problem = header_problem(key, value) if headers else None
            if problem is not None:
                raise self.fail(sub, item, f"{key!r} {problem}")
            out[key.lower() if headers else key] = value
        return out

    def str_list(self, path: str, v: Raw | None) -> tuple[str, ...]:
        if v is None or v.value is None:
            return ()
        if not isinstance(v.value, list):
            raise self.fail(path, v, f"expected a list, got {_kind(v.value)}")
        items = [self.string(f"{path}[{i}]", item, required=True) for i, item in enumerate(v.value)]
        return tuple(i.lower() for i in items if i)

    # -- the schema

    def config(self, root: Raw, source: Path | None) -> Config:
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

    def log(self, v: Raw | None) -> LogConfig:
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

    def route(self, path: str, v: Raw) -> RouteConfig:
        keys = (
            "name", "listen", "upstream", "company_id", "headers", "query", "credentials",
            "tls", "rewrite_links", "rewrite_hosts", "timeouts", "inbound", "limits",
            "session", "intercept",
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
            session=self.session(f"{path}.session", m.get("session")),
            intercept=self.intercept(f"{path}.intercept", m.get("intercept")),
        )

    def session(self, path: str, v: Raw | None) -> SessionConfig:
        m = self.mapping(path, v, ("reuse", "csrf"))
        return SessionConfig(
            reuse=self.boolean(f"{path}.reuse", m.get("reuse"), True),
            csrf=self.boolean(f"{path}.csrf", m.get("csrf"), True),
        )

    def intercept(self, path: str, v: Raw | None) -> InterceptConfig:
        m = self.mapping(path, v, ("enabled", "cert_dir"))
        return InterceptConfig(
            enabled=self.boolean(f"{path}.enabled", m.get("enabled"), False),
            cert_dir=self.path(f"{path}.cert_dir", m.get("cert_dir")),
        )

    def credentials(self, path: str, v: Raw | None, route: Raw) -> CredentialsConfig:
        keys = (
            "pem", "key", "pkcs12", "password_env", "password_file", "destination", "warn_before",
            "probe_before_switch", "probe_path",
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
            probe_before_switch=self.boolean(
                f"{path}.probe_before_switch", m.get("probe_before_switch"), True
            ),
            probe_path=self.probe_path(f"{path}.probe_path", m.get("probe_path")),
        )

    def probe_path(self, path: str, v: Raw | None) -> str:
        value = self.string(path, v) or "/odata/v2/"
        if not value.startswith("/") or any(c in value for c in " #\\") or has_control(value):
            raise self.fail(
                path,
                v,
                f"{value!r} is not a request path",
                "give a path on the upstream that starts with /, e.g. /odata/v2/",
            )
        return value

    def destination(self, path: str, v: Raw | None) -> DestinationRef | None:
        if v is None or not v.value:
            return None
        if isinstance(v.value, str):  # shorthand: destination: NAME
            v = Raw({"name": v}, v.where)
        m = self.mapping(path, v, ("name", "service_key", "refresh"))
        name = self.string(f"{path}.name", m.get("name"), required=True)
        assert name is not None
        return DestinationRef(
            name=name,
            service_key=self.path(f"{path}.service_key", m.get("service_key")),
            refresh=self.duration(f"{path}.refresh", m.get("refresh"), 15 * 60, minimum=1),
        )

    def timeouts(self, path: str, v: Raw | None) -> Timeouts:
        m = self.mapping(path, v, ("connect", "read", "shutdown"))
        return Timeouts(
            connect=self.duration(f"{path}.connect", m.get("connect"), 10.0, minimum=0.001),
            read=self.duration(f"{path}.read", m.get("read"), 300.0, minimum=0.001),
            shutdown=self.duration(f"{path}.shutdown", m.get("shutdown"), 10.0),
        )

    def limits(self, path: str, v: Raw | None) -> LimitsConfig:
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

    def count(self, path: str, v: Raw | None, default: int, minimum: int) -> int:
        return self.bounded(path, v, parse_count, default, minimum)

    def size(self, path: str, v: Raw | None, default: D, minimum: int) -> int | D:
        return self.bounded(path, v, parse_size, default, minimum, " bytes")

    def inbound(self, path: str, v: Raw | None) -> InboundConfig:
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


def _check_unique(routes: tuple[RouteConfig, ...], raw: list[Raw], r: Reader) -> None:
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


def _key_value(v: Raw, key: str) -> Raw:
    """The value of ``key`` in mapping ``v`` if written there, else ``v`` itself."""
    item = v.value.get(key) if isinstance(v.value, dict) else None
    return item if isinstance(item, Raw) else v


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
