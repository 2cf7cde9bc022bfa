"""The forwarding handler: plain HTTP in, mTLS out, bodies streamed both ways.

For each request on a route's listener:

1. refuse what must not be forwarded (CONNECT, absolute-form targets for
   other hosts, a missing inbound token, no valid identity);
2. build the upstream request: raw path behind the upstream's prefix, the
   query plus the route's parameters, filtered headers plus the route's;
3. stream the request body up and the response body down, in bounded chunks,
   with back-pressure from both sockets;
4. answer failures before the response started with the JSON error of
   DESIGN.md; after it started, cut the client connection so a truncated body
   can never look complete.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.config import RouteConfig
from sidecar.logs import access_logger, redact_query
from sidecar.upstream import UpstreamClient
from sidecar.upstream_errors import (
    BAD_REQUEST,
    CREDENTIALS_UNAVAILABLE,
    FORBIDDEN_TARGET,
    INBOUND_AUTH_REQUIRED,
    Failure,
    classify,
    error_response,
)

log = logging.getLogger("sidecar.proxy")

COMPANY_ID_HEADER = "successfactors-companyid"
TOKEN_HEADER = "X-Sidecar-Token"
REQUEST_ID_HEADER = "X-Request-ID"
CHUNK = 256 * 1024

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
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    }


def filter_headers(headers: CIMultiDictProxy[str], drop: Iterable[str]) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones, those Connection names, and ``drop``."""
    banned = HOP_BY_HOP | _connection_tokens(headers) | set(drop)
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in banned and not name.lower().startswith("proxy-")
    )


def merge_query(query_string: str, extra: dict[str, str]) -> str:
    """The client's raw query plus ``extra`` parameters it did not send itself."""
    if not extra:
        return query_string
    sent = {name for name, _ in parse_qsl(query_string, keep_blank_values=True)}
    added = [f"{quote(k, safe='$')}={quote(v, safe='')}" for k, v in extra.items() if k not in sent]
    return "&".join(p for p in (query_string, *added) if p)


@dataclass(frozen=True)
class _Target:
    url: URL
    request_id: str


class RouteProxy:
    """The aiohttp handler of one route; per-route work is done once, here."""

    def __init__(
        self,
        route: RouteConfig,
        client: UpstreamClient,
        *,
        token: str | None,
        query_values: bool = False,
        unavailable: Callable[[], str | None] = lambda: None,
    ) -> None:
        assert route.upstream is not None
        self.route = route
        self.client = client
        self.upstream = route.upstream
        self._token = token.encode() if token else None
        self._unavailable = unavailable
        self._query_values = query_values
        set_headers = dict(route.headers)
        if route.company_id:
            set_headers[COMPANY_ID_HEADER] = route.company_id
        self._set_headers = tuple(set_headers.items())
        # The client's values of headers the route sets are replaced, not merged.
        self._drop = frozenset(
            {"host", "expect", TOKEN_HEADER.lower(), REQUEST_ID_HEADER.lower(), *set_headers}
        )
        self._server_hostname = route.tls.server_name

    # ---------------------------------------------------------------- checks

    def _refusal(self, request: web.BaseRequest) -> web.Response | None:
        if request.method == "CONNECT":
            return error_response(
                FORBIDDEN_TARGET, "CONNECT tunnels are not served: the sidecar is not an open proxy"
            )
        url = request.url if _absolute_form(request) else None
        if url is not None and not self._is_upstream_host(url):
            return error_response(
                FORBIDDEN_TARGET,
                f"{url.host} is not this route's upstream ({self.upstream.host}); the sidecar "
                "is not an open proxy",
            )
        return self.check_token(request)

    def _is_upstream_host(self, url: URL) -> bool:
        host = (url.host or "").lower()
        if host != self.upstream.host:
            return False
        return url.explicit_port is None or url.port in (self.upstream.port, 80, 443)

    def check_token(self, request: web.BaseRequest) -> web.Response | None:
        """401 unless the inbound token (when one is configured) was sent."""
        if self._token is None:
            return None
        # surrogateescape: a header with non-UTF-8 bytes is just a wrong token
        given = request.headers.get(TOKEN_HEADER, "").encode("utf-8", "surrogateescape")
        if hmac.compare_digest(given, self._token):
            return None
        return error_response(INBOUND_AUTH_REQUIRED, f"missing or wrong {TOKEN_HEADER} header")

    # ---------------------------------------------------------------- handler

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if not _REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        refusal = self._refusal(request)
        if refusal is not None:
            refusal.headers[REQUEST_ID_HEADER] = request_id
            return self._logged(request, refusal, started, request_id)
        generation = self.client.current
        reason = self._unavailable()
        if generation is None or reason is not None:
            return self._logged(
                request,
                error_response(
                    CREDENTIALS_UNAVAILABLE,
                    f"route {self.route.name}: {reason or 'no valid client certificate'}",
                    request_id=request_id,
                ),
                started,
                request_id,
            )
        try:
            target = self._target(request, request_id)
        except ValueError as exc:
            return self._logged(
                request,
                error_response(
                    BAD_REQUEST, f"cannot forward this target: {exc}", request_id=request_id
                ),
                started,
                request_id,
            )
        bad = _undecodable_header(request.headers)
        if bad is not None:
            return self._logged(
                request,
                error_response(
                    BAD_REQUEST,
                    f"the value of header {bad} is not valid UTF-8; it cannot be forwarded "
                    "unchanged",
                    "send header values as ASCII or UTF-8",
                    request_id=request_id,
                ),
                started,
                request_id,
            )
        if request.headers.get("Expect", "").lower() == "100-continue":
            # Checks passed: invite the body (a refusal above is answered without it).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = filter_headers(request.headers, self._drop)
        headers.extend(self._set_headers)
        headers[REQUEST_ID_HEADER] = request_id
        data = request.content if request.body_exists else None
        try:
            upstream_cm = generation.session.request(
                request.method,
                target.url,
                headers=headers,
                data=data,
                allow_redirects=False,
                server_hostname=self._server_hostname,
            )
            upstream = await upstream_cm.__aenter__()
        except Exception as exc:  # the one table decides; unknown ones propagate
            fail = classify(exc, upstream=str(self.upstream))
            return self._failed(request, fail, started, request_id)
        upstream_time = time.perf_counter() - started
        try:
            return await self._relay(request, upstream, started, upstream_time, request_id)
        finally:
            await upstream_cm.__aexit__(None, None, None)

    def _target(self, request: web.BaseRequest, request_id: str) -> _Target:
        raw_path = request.raw_path
        if _absolute_form(request):
            raw_path = request.url.raw_path_qs
        path, _, query = raw_path.partition("?")
        if not path.startswith("/"):
            raise ValueError("the request target must start with '/'")
        query = merge_query(query, dict(self.route.query))
        url = URL.build(
            scheme="https",
            host=self.upstream.host,
            port=self.upstream.port,
            path=self.upstream.path_prefix + path,
            query_string=query,
            encoded=True,
        )
        return _Target(url, request_id)

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        started: float,
        upstream_time: float,
        request_id: str,
    ) -> web.StreamResponse:
        headers = filter_headers(upstream.headers, ())
        headers[REQUEST_ID_HEADER] = request_id
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        if upstream.status == 401:
            log.warning(
                "upstream answered 401 for %s %s: check the company id (%s) and that the "
                "X.509 certificate mapping in SuccessFactors Security Center names the right "
                "login name",
                request.method,
                request.path,
                self.route.company_id or "not set",
                extra={"route": self.route.name, "request_id": request_id},
            )
        await response.prepare(request)
        sent = 0
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
                sent += len(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            fail = classify(exc, upstream=str(self.upstream))
            log.error(
                "upstream failed mid-response after %d bytes: %s; the client connection is "
                "closed so the truncated body cannot look complete",
                sent,
                fail.message,
                extra={"route": self.route.name, "request_id": request_id},
            )
            if request.transport is not None:
                request.transport.close()
            self._access(request, upstream.status, sent, started, upstream_time, request_id)
            return response
        await response.write_eof()
        self._access(request, upstream.status, sent, started, upstream_time, request_id)
        return response

    # ---------------------------------------------------------------- outcomes

    def _failed(
        self, request: web.BaseRequest, fail: Failure, started: float, request_id: str
    ) -> web.StreamResponse:
        log.warning(
            "%s %s failed: %s",
            request.method,
            request.path,
            fail.message,
            extra={"route": self.route.name, "code": fail.code, "request_id": request_id},
        )
        response = error_response(fail.code, fail.message, fail.hint, request_id=request_id)
        return self._logged(request, response, started, request_id)

    def _logged(
        self, request: web.BaseRequest, response: web.Response, started: float, request_id: str
    ) -> web.Response:
        self._access(request, response.status, len(response.body or b""), started, None, request_id)  # type: ignore[arg-type]
        return response

    def _access(
        self,
        request: web.BaseRequest,
        status: int,
        bytes_out: int,
        started: float,
        upstream_time: float | None,
        request_id: str,
    ) -> None:
        if access_logger.disabled or not access_logger.isEnabledFor(logging.INFO):
            return
        query = redact_query(request.query_string, keep_values=self._query_values)
        path = request.path + (f"?{query}" if query else "")
        fields = {
            "route": self.route.name,
            "method": request.method,
            "path": path,
            "status": status,
            "bytes_in": request.content.total_bytes,
            "bytes_out": bytes_out,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "upstream_ms": None if upstream_time is None else round(upstream_time * 1000, 2),
            "request_id": request_id,
        }
        access_logger.info(
            "%(route)s %(method)s %(path)s %(status)d in=%(bytes_in)d out=%(bytes_out)d "
            "%(duration_ms)sms upstream=%(upstream_ms)sms id=%(request_id)s",
            fields,
            extra=fields,
        )


def _undecodable_header(headers: CIMultiDictProxy[str]) -> str | None:
    """The name of a header whose bytes were not UTF-8 (aiohttp keeps them as surrogates)."""
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None


def _absolute_form(request: web.BaseRequest) -> bool:
    return request.raw_path[:1] != "/" and "://" in request.raw_path[:10]
