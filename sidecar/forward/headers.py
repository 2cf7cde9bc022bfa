"""Which HTTP headers the sidecar forwards, and which a route may set (RFC 9110, 9112).

One place for the rules that the config reader, the route target and the
handler all apply, so a header refused in a config file is refused the same
way when a destination supplies it: the header names the sidecar reads or
sets, the Host and request-id grammars, what a route may set, what is never
forwarded (`filter_headers`), and how a route's query parameters join the
client's (`merge_query`).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from urllib.parse import parse_qsl, quote

from multidict import CIMultiDict, CIMultiDictProxy

#: SuccessFactors' company id, set from the route's ``company_id``
COMPANY_ID_HEADER = "successfactors-companyid"
#: the inbound token a client sends when the route has ``inbound.token_env``; never forwarded
TOKEN_HEADER = "X-Sidecar-Token"
#: a request id the client may send; echoed back and logged, never forwarded
REQUEST_ID_HEADER = "X-Request-ID"
#: RFC 9110 field name (a token)
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: connection-level headers: never forwarded either way
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: headers that frame a message: the sidecar sets them itself, a route may not
FRAMING = HOP_BY_HOP | {"content-length"}
#: a Host header value: a bracketed IP literal or a reg-name, and an optional port
HOST_VALUE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~!$&'()*+,;=%]+)(:[0-9]{1,5})?$")
#: an X-Request-ID a client may send: visible ASCII, at most 200 characters
REQUEST_ID_VALUE = re.compile(r"^[\x21-\x7e]{1,200}$")
# The one control-character rule: none in a header, but a tab; CR and LF only end its line.
_CONTROL_CLASS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f"
#: a control character in a whole request head, whose lines CR LF end
CONTROL_IN_HEAD = re.compile(f"[{_CONTROL_CLASS}]")
_CONTROL = re.compile(rf"[{_CONTROL_CLASS}\r\n]")  # in a field value


def has_control(value: str) -> bool:
    """A line break or control character (not a tab) in a field value: never sent on."""
    return _CONTROL.search(value) is not None


def header_problem(name: str, value: str) -> str | None:
    """Why a route (or its destination) may not set ``name: value``; None if it may."""
    if not HEADER_NAME.match(name):
        return "is not a valid HTTP header name"
    if name.lower() in FRAMING:
        return "cannot be set: the sidecar frames each request itself"
    if has_control(value):
        return "has a line break or control character in its value"
    return None


def connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }


def filter_headers(headers: CIMultiDictProxy[str], drop: Collection[str]) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones, those Connection names, and ``drop``.

    This runs twice per request, so it allocates as little as it can.
    """
    named = connection_tokens(headers) if "Connection" in headers else ()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if (
            lower not in HOP_BY_HOP
            and lower not in drop
            and lower not in named
            and not lower.startswith("proxy-")
        ):
            out.add(name, value)
    return out


def merge_query(query_string: str, extra: dict[str, str]) -> str:
    """The client's raw query plus ``extra`` parameters it did not send itself."""
    if not extra:
        return query_string
    sent = {name for name, _ in parse_qsl(query_string, keep_blank_values=True)}
    added = [f"{quote(k, safe='$')}={quote(v, safe='')}" for k, v in extra.items() if k not in sent]
    return "&".join(p for p in (query_string, *added) if p)


def undecodable_header(headers: CIMultiDictProxy[str]) -> str | None:
    """The name of a header whose bytes were not UTF-8 (aiohttp keeps them as surrogates)."""
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None
