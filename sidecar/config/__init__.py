"""The configuration: what a route is, and the one way to get a valid one.

- ``schema``: the frozen dataclasses (`Config`, `RouteConfig`, ...), pure data.
- ``values``: the small value parsers (durations, sizes, listen addresses, upstream URLs).
- ``tree``: raw YAML values that remember their ``file:line``.
- ``validate``: the one validator (key paths in every error, ``${VAR}`` expansion).
- ``load``: finding and reading the file, merging route flags.

Hands out the public names of all of them, so ``from sidecar.config import X`` works.
"""

from sidecar.config.load import config_from_flags, find_config_file, load_config, parse_config
from sidecar.config.schema import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    DEFAULT_LISTEN,
    Config,
    CredentialKind,
    CredentialsConfig,
    DestinationRef,
    InboundConfig,
    InterceptConfig,
    LimitsConfig,
    ListenAddress,
    LogConfig,
    LogFormat,
    LogLevel,
    RouteConfig,
    RouteFlags,
    SessionConfig,
    Timeouts,
    TLSConfig,
    UpstreamURL,
)
from sidecar.config.values import (
    parse_count,
    parse_duration,
    parse_header_line,
    parse_listen,
    parse_size,
    parse_upstream,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_LISTEN",
    "Config",
    "CredentialKind",
    "CredentialsConfig",
    "DestinationRef",
    "InboundConfig",
    "InterceptConfig",
    "LimitsConfig",
    "ListenAddress",
    "LogConfig",
    "LogFormat",
    "LogLevel",
    "RouteConfig",
    "RouteFlags",
    "SessionConfig",
    "TLSConfig",
    "Timeouts",
    "UpstreamURL",
    "config_from_flags",
    "find_config_file",
    "load_config",
    "parse_config",
    "parse_count",
    "parse_duration",
    "parse_header_line",
    "parse_listen",
    "parse_size",
    "parse_upstream",
]
