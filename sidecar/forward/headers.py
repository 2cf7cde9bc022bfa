"""Which HTTP headers the sidecar forwards, adds and refuses (RFC 9110, 9112).

The one answer to "where is a header added or dropped?". The config reader,
the route target and the handler all apply these rules, so a header refused in
a config file is refused the same way when a destination supplies it:

- built on the rulebook in `sidecar.http_rules`: the header names the sidecar
  reads or sets, the Host and request-id grammars, the one control-character
  rule, what a route may set (`header_problem`);
- `route_headers`: what a route sends on every request (its ``headers``, the
  destination's, the company id), built once per identity;
- `upstream_request_headers`: a client's request headers as they go upstream
  (hop-by-hop and ours dropped, the route's added, X-Request-ID, Accept-Encoding
  narrowed while links are rewritten);
- `response_headers`: an upstream's response headers as they go back;
- `merge_query`: how a route's query parameters join the client's.

The pool writes the framing itself (Host, Content-Length or chunked), see
`sidecar.forward.pool`; link rewriting in headers is `sidecar.forward.rewrite`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from urllib.parse import parse_qsl, quote

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import ConfigError
from sidecar.forward.rewrite import decodable_accept_encoding
from sidecar.http_rules import (
    COMPANY_ID_HEADER,
    HOP_BY_HOP,
    REQUEST_ID_HEADER,
    TOKEN_HEADER,
    has_control,
    header_problem,
)


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


__all__ = [
    "HOP_BY_HOP",
    "NOT_FORWARDED",
    "connection_tokens",
    "filter_headers",
    "merge_query",
    "response_headers",
    "route_headers",
    "undecodable_header",
    "upstream_request_headers",
]

#: client headers never forwarded, whatever the route: set per hop, or the sidecar's own
NOT_FORWARDED = frozenset({"host", "expect", TOKEN_HEADER.lower(), REQUEST_ID_HEADER.lower()})


def route_headers(
    supplied: Mapping[str, str],
    configured: Mapping[str, str],
    company_id: str | None,
    where: str = "route",
) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
    """The headers a route sets on every request, and the client headers not forwarded.

    ``supplied`` comes from the credential source (a destination's
    ``URL.headers.*``), ``configured`` from the route's ``headers``; one value per
    name, whatever its case, the config winning; ``company_id`` sets
    `COMPANY_ID_HEADER` over both. A client's header of a name the route sets is
    dropped (`NOT_FORWARDED` always is). Raises ConfigError naming ``where``.
    """
    headers = {k.lower(): (k, v) for k, v in supplied.items()}
    headers.update({k.lower(): (k, v) for k, v in configured.items()})
    for name, value in headers.values():
        problem = header_problem(name, value)
        if problem is not None:
            raise ConfigError(
                f"{where}: the header {name!r} (from headers or the destination's "
                f"URL.headers.*) {problem}"
            )
    if company_id:
        headers[COMPANY_ID_HEADER] = (COMPANY_ID_HEADER, company_id)
    return tuple(headers.values()), NOT_FORWARDED | headers.keys()


def upstream_request_headers(
    client: CIMultiDictProxy[str],
    *,
    drop: Collection[str],
    set_headers: tuple[tuple[str, str], ...],
    request_id: str,
    rewriting: bool,
) -> CIMultiDict[str]:
    """The headers a client's request goes upstream with.

    The client's end-to-end headers but ``drop`` (`filter_headers`), then the
    route's ``set_headers`` (`route_headers`), then `REQUEST_ID_HEADER`. While
    links are ``rewriting``, Accept-Encoding asks only for the codings the
    rewriter decodes (Postman also offers br). Runs once per request: one dict.
    """
    headers = filter_headers(client, drop)
    headers.extend(set_headers)
    if rewriting and "Accept-Encoding" in headers:
        accept = decodable_accept_encoding(headers["Accept-Encoding"])
        if accept is not None:
            headers["Accept-Encoding"] = accept
    headers[REQUEST_ID_HEADER] = request_id
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> tuple[CIMultiDict[str], str | None]:
    """An upstream's response headers as they go back, and the name of one not relayable.

    Hop-by-hop headers are dropped (`filter_headers`). A header whose value holds
    a control character cannot be relayed (the client's side refuses to write
    it: header injection); its name comes back, never its value, which may hold
    a secret. The handler adds `REQUEST_ID_HEADER` once links are rewritten.
    """
    headers = filter_headers(upstream, ())
    bad = next((name for name, value in headers.items() if has_control(value)), None)
    return headers, bad


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
