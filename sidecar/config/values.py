"""The config's small values: durations, sizes, counts, listen addresses, upstream URLs.

Each parser is a pure function from text (or a YAML number) to a value, raising
``ValueError`` with a message the validator prefixes with the key path.
"""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

from sidecar.config.schema import ListenAddress, UpstreamURL

# ------------------------------------------------------------------ small parsers

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


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
