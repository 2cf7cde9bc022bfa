"""The forwarding handler: plain HTTP in, mTLS out, bodies streamed both ways.

For each request on a route's listener:

1. refuse what must not be forwarded (CONNECT, unless interception serves it
   for one of the upstream's names: then a `Tunnel`, see `_connect`;
   absolute-form targets for other hosts, a missing inbound token, no valid
   identity, a malformed target or header);
2. build the upstream request from the current `Generation`'s `Target`: raw
   path behind the upstream's prefix, the query plus the route's parameters,
   filtered headers plus the route's;
3. stream the request body up and the response body down, in bounded chunks,
   with back-pressure from both sockets;
4. answer failures before the response started with the JSON error of
   DESIGN.md; after it started, cut the client connection so a truncated body
   can never look complete. An upstream's HTTP-level refusal of the client
   certificate (`http_refusal`) is such a failure too.

Every outcome goes through `_record`, which writes the access line and the
metrics exactly once, so no path forgets either: a bug (any exception the
handler did not expect) is answered 500 ``internal_error`` and recorded too.
Response bodies whose links are rewritten are decoded in bounded pieces
(`sidecar.forward.rewrite.BodyRewriter`), so a compressed body costs the same memory
whatever it inflates to. The requests it gets and the answers it gives are
`sidecar.forward.listener`'s records (and `sidecar.forward.answer.Answer`).

Its length (~600 lines) keeps one request's life in one class: refusing,
preparing, relaying and recording, so that every outcome visibly passes `_record`
once; the header rules and failure table it applies live in `headers` and `failures`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from aiohttp import HttpVersion
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.config import RouteConfig, UpstreamURL
from sidecar.errors import ConfigError
from sidecar.forward.answer import Answer
from sidecar.forward.failures import (
    BAD_REQUEST,
    CREDENTIALS_UNAVAILABLE,
    ERROR_CODES,
    FORBIDDEN_TARGET,
    INBOUND_AUTH_REQUIRED,
    INTERNAL_ERROR,
    REQUEST_TIMEOUT,
    REQUEST_TOO_LARGE,
    UPSTREAM_BAD_RESPONSE,
    Failure,
    classify,
    error_response,
    exception_chain,
    failure,
    peek_refusal,
)
from sidecar.forward.headers import (
    merge_query,
    response_headers,
    undecodable_header,
    upstream_request_headers,
)
from sidecar.forward.listener import (
    Request,
    Response,
    Streamed,
    Tunnel,
    bytes_received,
    intercepted,
    reset,
    send_continue,
)
from sidecar.forward.pool import UpstreamResponse
from sidecar.forward.rewrite import (
    BodyDecodeError,
    BodyRewriter,
    local_origin,
    rewritten_headers,
    should_rewrite,
)
from sidecar.forward.session import (
    RETRY_BODY,
    WRITES,
    FetchFailed,
    refuses_token,
    service_root,
)
from sidecar.forward.upstream import Generation, Target, UpstreamClient
from sidecar.http_rules import (
    CSRF_HEADER,
    HOST_VALUE,
    REQUEST_ID_HEADER,
    REQUEST_ID_VALUE,
    TOKEN_HEADER,
)
from sidecar.intercept.certificate import route_certificates
from sidecar.intercept.names import upstream_names
from sidecar.intercept.tunnel import connect_target, proxy_password
from sidecar.telemetry.logs import access_logger, redact_query, without_userinfo
from sidecar.telemetry.metrics import RouteStats
from sidecar.telemetry.recent import Entry

log = logging.getLogger("sidecar.proxy")

CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024  # bodies up to this size (known length) are sent in one write

TOKEN_MISSING = f"missing or wrong {TOKEN_HEADER} header"
_VERSIONS = frozenset({HttpVersion(1, 0), HttpVersion(1, 1)})
# Generated request ids: unique per process start, cheaper than uuid4 per request.
_ID_PREFIX = os.urandom(8).hex() + "-"
_ID_COUNTER = itertools.count(1)
_R = TypeVar("_R", bound=Response | Tunnel)


class _Refused(Exception):
    """A request the sidecar answers itself, before anything goes upstream."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


@dataclass
class _Exchange:
    """One request on its way through: what the access line and metrics need."""

    request: Request
    request_id: str
    started: float
    upstream_time: float | None = None
    bytes_out: int = 0
    response: Streamed | None = None  # once its head went out
    recorded: bool = False  # `_record` ran: never twice
    supplied: str = ""  # what the sidecar's session added: "session", "csrf", "csrf-retry"
    error: str | None = None  # the code of an answer the sidecar gave itself
    hint: str | None = None

    def supply(self, what: str) -> None:
        if what not in self.supplied.split(","):
            self.supplied = f"{self.supplied},{what}" if self.supplied else what


class RouteProxy:
    """The listener's handler for one route."""

    def __init__(
        self,
        route: RouteConfig,
        client: UpstreamClient,
        stats: RouteStats,
        *,
        token: str | None,
        query_values: bool = False,
        unavailable: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.route = route
        self.client = client
        self.stats = stats
        self._token = token.encode() if token else None
        self._unavailable = unavailable
        self._query_values = query_values
        self._max_body = route.limits.max_body

    def foreign_target(self, request: Request) -> str | None:
        """Why an absolute-form target is not this route's upstream, or None.

        Checked before anything else, admin paths included: ``GET http://other/-/status``
        is meant for another server. Before credentials name the upstream, the
        configured one is used; with neither known, no absolute form is served.
        """
        if not _absolute_form(request):
            return None
        generation = self.client.current
        upstream = generation.target.upstream if generation else self.route.upstream
        if upstream is not None and _same_host(request.url, upstream):
            return None
        return (
            f"{request.url.host} is not this route's upstream "
            f"({upstream.host if upstream else 'not known yet'}); the sidecar is not an open proxy"
        )

    def token_ok(self, request: Request) -> bool:
        """True unless a token is configured and the request lacks it (constant time).

        Requests inside a CONNECT tunnel have it: the CONNECT needed it.
        """
        if self._token is None or intercepted(request):
            return True
        # surrogateescape: a header with non-UTF-8 bytes is just a wrong token
        given = request.headers.get(TOKEN_HEADER, "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, self._token)

    # ---------------------------------------------------------------- handler

    async def handle(self, request: Request) -> Response | Tunnel:
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        if not REQUEST_ID_VALUE.match(request_id):
            request_id = f"{_ID_PREFIX}{next(_ID_COUNTER):x}"
        ex = _Exchange(request, request_id, self.stats.started())
        try:
            return await self._forward(ex)
        except asyncio.CancelledError:
            # The client went away (or shutdown gave up): logged and counted as nginx's 499.
            self._record(ex, 499)
            raise
        except Exception as exc:  # a bug: still answered, logged, counted (issue 12)
            return self._internal_error(ex, exc)

    async def _forward(self, ex: _Exchange) -> Response | Tunnel:
        request = ex.request
        if request.method == "CONNECT":
            return self._finish(ex, self._connect(ex))
        try:
            generation, path = self._prepare(request)
        except _Refused as refused:
            return self._finish(ex, self._answer(ex, refused.code, refused.message, refused.hint))
        target = generation.target
        # Until the request holds an upstream connection, the pool counts it as a user,
        # so a credential swap in between cannot retire the pool under it.
        with generation.pool.in_use():
            if request.headers.get("Expect", "").lower() == "100-continue":
                # Checks passed: invite the body (a refusal above is answered without it).
                await send_continue(request)
            send = _Send(generation, path, request)
            body = None
            kept: list[bytes] | None = None  # the body, when a CSRF refusal may resend it
            try:
                if request.body_exists:
                    body = _request_body(request.content, self._max_body, self.route.timeouts.read)
                    if send.csrf_root is not None and (request.content_length or 0) <= RETRY_BODY:
                        kept, body = await _kept(body, RETRY_BODY)
                upstream = await self._send(ex, send, body)
                read = b""
                if send.csrf_root is not None and refuses_token(upstream.status, upstream.headers):
                    if kept is not None or body is None:
                        upstream, read = await self._resend(ex, send, upstream, kept)
            except Exception as exc:  # the one table decides; unknown ones propagate
                body_error = _client_body_error(exc)
                if body_error is not None:
                    refusal = self._answer(ex, body_error.code, body_error.message)
                    refusal.force_close()  # the rest of the body is not read
                    return self._finish(ex, refusal)
                fail = classify(exc, upstream=str(target.upstream))
                return self._finish(ex, self._failed(ex, fail))
        ex.upstream_time = time.perf_counter() - ex.started
        try:
            response = await self._relay(ex, upstream, target, read)
        finally:
            upstream.release()
        return self._finish(ex, response)

    # ---------------------------------------------------------------- the session

    async def _send(
        self, ex: _Exchange, send: _Send, body: AsyncIterator[bytes] | None
    ) -> UpstreamResponse:
        """One request upstream, with the session's cookies and CSRF token when it governs."""
        generation, session = send.generation, send.generation.session
        headers = upstream_request_headers(
            send.client,
            drop=generation.target.drop,
            set_headers=generation.target.set_headers,
            request_id=ex.request_id,
            rewriting=bool(generation.target.rewrite_bases) and not intercepted(ex.request),
        )
        if send.governed:
            if send.csrf_root is not None:
                token = send.token or await session.token(
                    send.csrf_root, lambda: self._fetch_token(ex, send)
                )
                if token is not None:
                    headers[CSRF_HEADER] = send.token = token
                    ex.supply("csrf")
            # Replaces cookies the client echoed back: they are the sidecar's, maybe of an
            # earlier session (before a rotation), never to be sent with another identity.
            cookie = session.cookie_header(send.path)
            headers.popall("Cookie", None)
            if cookie is not None:
                headers["Cookie"] = cookie
                ex.supply("session")
        upstream = await generation.pool.request(ex.request.method, send.target, headers, body)
        if send.governed:
            self._keep_cookies(send, upstream, send.path)
        return upstream

    async def _resend(
        self, ex: _Exchange, send: _Send, refused: UpstreamResponse, kept: list[bytes] | None
    ) -> tuple[UpstreamResponse, bytes]:
        """A write refused for its CSRF token, sent once more with a fresh one (DESIGN.md:
        the one exception to never-retry, the upstream having refused it unprocessed).

        Returns the answer to relay and the body bytes already read from it: the
        refusal itself when no other token comes or its body is too long to keep.
        """
        read = await refused.read_at_most(SMALL_BODY + 1)
        if len(read) > SMALL_BODY:
            return refused, read
        refused.release()
        assert send.csrf_root is not None
        stale = send.token
        send.token = await send.generation.session.fresh_token(
            send.csrf_root, stale, lambda: self._fetch_token(ex, send)
        )
        if send.token is None or send.token == stale:
            return refused, read
        ex.supply("csrf-retry")
        return await self._send(ex, send, None if kept is None else _replay(kept)), b""

    async def _fetch_token(self, ex: _Exchange, send: _Send) -> str | None:
        """``GET`` of the service root with ``X-CSRF-Token: Fetch``, in the session: the
        token, None when the upstream offers none, `FetchFailed` when it did not answer
        usably (no answer, 5xx, 429)."""
        assert send.csrf_root is not None
        generation, root = send.generation, send.csrf_root
        target = root + (f"?{q}" if (q := merge_query("", generation.target.query)) else "")
        headers = upstream_request_headers(
            _NO_HEADERS,
            drop=(),
            set_headers=generation.target.set_headers,
            request_id=f"{ex.request_id}-csrf",
            rewriting=False,
        )
        headers[CSRF_HEADER] = "Fetch"
        cookie = generation.session.cookie_header(root)
        if cookie is not None:
            headers["Cookie"] = cookie
        extra = {"route": self.route.name, "request_id": ex.request_id}
        self.stats.csrf_fetched()
        try:
            answer = await generation.pool.request("GET", target, headers, None)
            try:
                await answer.read_at_most(_FETCH_BODY)  # a longer body closes the connection
                self._keep_cookies(send, answer, root)
            finally:
                answer.release()
        except (aiohttp.ClientError, TimeoutError) as exc:
            fail = classify(exc, upstream=str(generation.target.upstream))
            log.warning("CSRF token fetch failed (%s); the write goes without a token",
                        fail.message, extra=extra)  # fmt: skip
            raise FetchFailed from exc
        if answer.status >= 500 or answer.status == 429:  # passing: the next write asks again
            log.warning("CSRF token fetch at %s answered %d; the write goes without a token",
                        root, answer.status, extra=extra)  # fmt: skip
            raise FetchFailed
        token = answer.headers.get(CSRF_HEADER, "").strip()
        if answer.status >= 400 or not token or token.lower() in ("required", "fetch"):
            log.info("the upstream offered no CSRF token at %s (%d); writes go without one",
                     root, answer.status, extra=extra)  # fmt: skip
            return None
        log.info("CSRF token fetched at %s for writes that carry none", root, extra=extra)
        return token

    def _keep_cookies(self, send: _Send, upstream: UpstreamResponse, path: str) -> None:
        if send.generation.session.store(upstream.headers.getall("Set-Cookie", ()), path):
            self.stats.session_opened()
            log.info(
                "the upstream opened a session; its cookies are kept for clients that send none",
                extra={"route": self.route.name},
            )

    # ---------------------------------------------------------------- refusals

    def _prepare(self, request: Request) -> tuple[Generation, str]:
        """Refuse what must not go upstream; else the pool, target and request target to use."""
        if request.version not in _VERSIONS:
            raise _Refused(BAD_REQUEST, f"HTTP/{request.version[0]}.{request.version[1]} is "
                           "not served; send HTTP/1.1 (or 1.0)")  # fmt: skip
        foreign = self.foreign_target(request)
        if foreign is not None:
            raise _Refused(FORBIDDEN_TARGET, foreign)
        if not self.token_ok(request):
            raise _Refused(INBOUND_AUTH_REQUIRED, TOKEN_MISSING)
        generation = self.client.current
        reason = self._unavailable()
        if generation is None or reason is not None:
            raise _Refused(
                CREDENTIALS_UNAVAILABLE,
                f"route {self.route.name}: {reason or 'no valid client certificate'}",
            )
        target = generation.target
        absolute = _absolute_form(request)
        raw = request.url.raw_path_qs if absolute else request.raw_path
        path, _, query = raw.partition("?")
        if not path.startswith("/") or "#" in path or "\\" in path:
            # Not an origin-form target (RFC 9112 3.2): a fragment or a backslash is
            # read differently by different servers, so it is refused, not forwarded.
            raise _Refused(BAD_REQUEST, f"cannot forward the request target {raw[:100]!r}")
        host = request.headers.get("Host")
        if host is not None and not HOST_VALUE.match(host):
            raise _Refused(BAD_REQUEST, f"the Host header {host[:100]!r} is not a valid host")
        if self._max_body is not None and (request.content_length or 0) > self._max_body:
            raise _Refused(
                REQUEST_TOO_LARGE,
                f"the request body ({request.content_length} bytes) is larger than "
                f"limits.max_body ({self._max_body} bytes)",
            )
        bad = undecodable_header(request.headers)
        if bad is not None:
            raise _Refused(
                BAD_REQUEST,
                f"the value of header {bad} is not valid UTF-8; it cannot be forwarded unchanged",
                "send header values as ASCII or UTF-8",
            )
        query = merge_query(query, target.query)
        path = target.upstream.path_prefix + path + (f"?{query}" if query else "")
        return generation, path

    def _connect(self, ex: _Exchange) -> Response | Tunnel:
        """CONNECT: a tunnel into the interception's TLS for an upstream name, else refused.

        Never a blind tunnel: the sidecar terminates TLS itself and serves each
        request inside like a plain one (`sidecar.forward.listener.open_tunnel`).
        """
        try:
            return self._tunnel(ex.request)
        except _Refused as refused:
            refusal = self._answer(ex, refused.code, refused.message, refused.hint)
            refusal.force_close()  # nothing after a refused CONNECT is read
            return refusal

    def _tunnel(self, request: Request) -> Tunnel:
        route = self.route
        if not route.intercept.enabled or intercepted(request):
            raise _Refused(
                FORBIDDEN_TARGET,
                "CONNECT tunnels are not served: the sidecar is not an open proxy",
                "for https_proxy clients of the upstream, turn on interception "
                "(intercept.enabled, or run --intercept)"
                if not intercepted(request)
                else None,
            )
        generation = self.client.current
        upstream = generation.target.upstream if generation else route.upstream
        names = upstream_names(upstream, route.rewrite_hosts) if upstream else ()
        target = connect_target(request.raw_path)
        if target is None or target not in names:
            served = ", ".join(map(str, names)) or "none known yet"
            raise _Refused(
                FORBIDDEN_TARGET,
                f"CONNECT {request.raw_path[:100]!r} is not served: only the route's upstream "
                f"names are ({served}); the sidecar is not an open proxy",
            )
        if not self.token_ok(request) and not self._proxy_token_ok(request):
            raise _Refused(
                INBOUND_AUTH_REQUIRED,
                f"{TOKEN_MISSING}, or Proxy-Authorization: Basic with the token as password",
                "use a proxy URL like http://sidecar:TOKEN@127.0.0.1:8080",
            )
        reason = self._unavailable()
        if generation is None or reason is not None:
            raise _Refused(
                CREDENTIALS_UNAVAILABLE,
                f"route {route.name}: {reason or 'no valid client certificate'}",
            )
        certificates = route_certificates(route, None, upstream)
        try:
            context = certificates.server_context()
        except ConfigError as exc:  # e.g. the certificate expired and cert_dir is read-only
            raise _Refused(CREDENTIALS_UNAVAILABLE, exc.message, exc.hint) from None
        return Tunnel(
            context,
            str(target),
            timeout=route.limits.header_timeout,
            foreign_name=certificates.foreign_server_name,
        )

    def _proxy_token_ok(self, request: Request) -> bool:
        password = proxy_password(request.headers.get("Proxy-Authorization"))
        if self._token is None or password is None:
            return False
        return hmac.compare_digest(password.encode("utf-8", "surrogateescape"), self._token)

    async def _relay(
        self, ex: _Exchange, upstream: UpstreamResponse, target: Target, read: bytes = b""
    ) -> Response:
        """Relay an answer (``read``: the start of its body, read already)."""
        request = ex.request
        if upstream.status in (429, 503) and "Retry-After" in upstream.headers:
            self.stats.upstream_throttled()
        if upstream.status == 101:
            # Never asked for (Upgrade is hop-by-hop and not forwarded). The connection
            # now speaks another protocol: the pool must not hand it out again.
            return self._failed(
                ex,
                failure(
                    UPSTREAM_BAD_RESPONSE,
                    f"{target.upstream} answered 101 Switching Protocols, which the sidecar "
                    "never asks for",
                    "protocol",
                ),
            )
        try:
            head, refusal = (read, None) if read else await peek_refusal(upstream, request.method)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._failed(ex, self._body_failure(exc, target))
        if refusal is not None and refusal.certain:
            return self._failed(ex, refusal.failure(str(target.upstream)))
        headers, bad = response_headers(upstream.headers)
        if bad is not None:
            message = (
                f"{target.upstream} sent the header {bad!r} with a control character in "
                "its value, which cannot be relayed"
            )
            return self._failed(ex, failure(UPSTREAM_BAD_RESPONSE, message, "protocol"))
        body: BodyRewriter | None = None
        # Inside a CONNECT tunnel the client uses the upstream's own names: nothing to rewrite.
        if target.rewrite_bases and not intercepted(request):
            body, headers = self._rewriting(request, upstream, target, headers)
        headers[REQUEST_ID_HEADER] = ex.request_id
        if upstream.status == 401:
            log.warning(
                "upstream answered 401 for %s %s: check the company id (%s) and that the "
                "X.509 certificate mapping in SuccessFactors Security Center names the right "
                "login name",
                request.method,
                _log_path(request),
                target.company_id or "not set",
                extra={"route": self.route.name, "request_id": ex.request_id},
            )
        length = upstream.content_length
        if (
            length is not None
            and length <= SMALL_BODY
            and request.method != "HEAD"
            and upstream.status not in (204, 304)
            # a compressed body may inflate ~1000-fold: it always streams, piece by piece
            and (body is None or body.coding == "identity")
        ):
            return await self._relay_small(ex, upstream, target, headers, head, body)
        pieces = _pieces(upstream.content, head, body)
        async with contextlib.aclosing(pieces):
            first = b""
            if body is not None:
                # A body that does not decode at all still gets a proper answer.
                try:
                    first = await anext(pieces, b"")
                except (aiohttp.ClientError, TimeoutError, BodyDecodeError) as exc:
                    return self._failed(ex, self._body_failure(exc, target))
            response = Streamed(upstream.status, upstream.reason, headers)
            await response.prepare(request)
            ex.response = response
            closed = _close_watch(request, upstream)
            try:
                if first:
                    await response.write(first)
                    ex.bytes_out += len(first)
                async for piece in pieces:
                    await response.write(piece)  # waits while the client's socket is full
                    ex.bytes_out += len(piece)
                if closed is not None and closed.done() and _failed_future(closed):
                    # aiohttp ends a close-delimited body at a reset as if at a clean EOF.
                    raise aiohttp.ClientPayloadError("the upstream reset the connection mid-body")
            except (aiohttp.ClientError, TimeoutError, BodyDecodeError) as exc:
                fail = self._body_failure(exc, target)
                self.stats.upstream_error(fail.kind, fail.message)
                log.error(
                    "upstream failed mid-response after %d bytes: %s; the client connection "
                    "is closed so the truncated body cannot look complete",
                    ex.bytes_out,
                    fail.message,
                    extra={
                        "route": self.route.name,
                        "code": fail.code,
                        "request_id": ex.request_id,
                    },
                )
                reset(request)
                return response
        await response.write_eof()
        return response

    async def _relay_small(
        self,
        ex: _Exchange,
        upstream: UpstreamResponse,
        target: Target,
        headers: CIMultiDict[str],
        head: bytes,
        body: BodyRewriter | None,
    ) -> Response:
        """A small identity body of known length: read it, then answer in one write.

        Bounded (``SMALL_BODY``), and a failure while reading it can still be
        answered with a proper error instead of a cut connection.
        """
        try:
            data = head + await upstream.read()
            if body is not None:
                data = b"".join(body.feed(data)) + body.flush()
        except (aiohttp.ClientError, TimeoutError, BodyDecodeError) as exc:
            return self._failed(ex, self._body_failure(exc, target))
        headers.popall("Content-Length", None)  # set from the body we send
        ex.bytes_out = len(data)
        return Answer(upstream.status, headers, data, reason=upstream.reason, own=False)

    def _body_failure(self, exc: BaseException, target: Target) -> Failure:
        if isinstance(exc, BodyDecodeError):
            # The zlib reason only: never the upstream's bytes.
            message = f"{target.upstream} sent an undecodable body: {exc}"
            return failure(UPSTREAM_BAD_RESPONSE, message, "protocol")
        return classify(exc, upstream=str(target.upstream))

    def _rewriting(
        self,
        request: Request,
        upstream: UpstreamResponse,
        target: Target,
        headers: CIMultiDict[str],
    ) -> tuple[BodyRewriter | None, CIMultiDict[str]]:
        """The body rewriter (if this response needs one) and the rewritten headers."""
        try:
            origin = _client_origin(request)
        except ValueError:
            return None, headers  # no usable Host: nothing to point links at
        body = None
        if (
            request.method != "HEAD"
            and upstream.status not in (204, 206, 304)
            and should_rewrite(headers.get("Content-Type"), headers.get("Content-Encoding"))
        ):
            body = BodyRewriter(target.rewrite_bases, origin, headers.get("Content-Encoding"))
        rewritten = rewritten_headers(
            headers.items(),
            bases=target.rewrite_bases,
            local_origin=origin,
            body_rewritten=body is not None,
        )
        return body, CIMultiDict(rewritten)

    # ---------------------------------------------------------------- outcomes

    def _answer(self, ex: _Exchange, code: str, message: str, hint: str | None = None) -> Answer:
        response = error_response(code, message, hint, request_id=ex.request_id)
        ex.bytes_out = len(response.body)
        ex.error, ex.hint = code, hint or ERROR_CODES[code][1]
        return response

    def _failed(self, ex: _Exchange, fail: Failure) -> Answer:
        self.stats.upstream_error(fail.kind, fail.message)
        log.warning(
            "%s %s failed: %s",
            ex.request.method,
            _log_path(ex.request),
            fail.message,
            extra={"route": self.route.name, "code": fail.code, "request_id": ex.request_id},
        )
        return self._answer(ex, fail.code, fail.message, fail.hint)

    def _internal_error(self, ex: _Exchange, exc: Exception) -> Response:
        """A bug: the traceback goes to the log only; the client gets 500 ``internal_error``.

        The request is still counted and logged once, so the in-flight gauge stays
        balanced. If the answer had started, the connection is cut instead.
        """
        log.error(
            "internal error while handling %s %s: %s",
            ex.request.method,
            _log_path(ex.request),
            type(exc).__name__,
            exc_info=exc,
            extra={"route": self.route.name, "code": INTERNAL_ERROR, "request_id": ex.request_id},
        )
        if ex.recorded:
            raise exc  # a failure in `_record` itself: nothing more to count
        if ex.response is not None:
            reset(ex.request)  # a truncated body must not look complete
            return self._finish(ex, ex.response)
        response = self._answer(
            ex, INTERNAL_ERROR, "the sidecar failed to handle this request; see its log"
        )
        response.force_close()  # the request body may be half read
        return self._finish(ex, response)

    def _finish(self, ex: _Exchange, response: _R) -> _R:
        self._record(ex, response.status, response.headers.get("Content-Type"))
        return response

    def _record(self, ex: _Exchange, status: int, content_type: str | None = None) -> None:
        """The metrics, the console's entry and the access line of one request, whatever
        its outcome (once)."""
        if ex.recorded:
            return
        ex.recorded = True
        request = ex.request
        elapsed = time.perf_counter() - ex.started
        self.stats.finished(request.method, status, elapsed)
        entry = Entry(
            time.time(),
            self.route.name,
            request.method,
            # The raw (still percent-encoded) path: a decoded %0A must not split a line.
            request.raw_path,
            status,
            round(elapsed * 1000, 2),
            None if ex.upstream_time is None else round(ex.upstream_time * 1000, 2),
            bytes_received(request),
            ex.bytes_out,
            ex.request_id,
            ex.error,
            ex.hint,
            ex.supplied or None,
            content_type,
        )
        self.stats.recent(entry)
        if access_logger.disabled or not access_logger.isEnabledFor(logging.INFO):
            return
        query = redact_query(request.query_string, keep_values=self._query_values)
        fields = {
            "route": entry.route,
            "method": entry.method,
            "path": without_userinfo(request.raw_path.partition("?")[0])
            + (f"?{query}" if query else ""),
            "status": status,
            "bytes_in": entry.bytes_in,
            "bytes_out": entry.bytes_out,
            "duration_ms": entry.duration_ms,
            "upstream_ms": entry.upstream_ms,
            "request_id": entry.request_id,
            "supplied": entry.supplied,
            "intercepted": intercepted(request),
        }
        # "-": no upstream request was made (the sidecar answered itself)
        upstream = "-" if entry.upstream_ms is None else f"{entry.upstream_ms}ms"
        tail = f" supplied={entry.supplied}" if entry.supplied else ""
        tail += " intercepted" if fields["intercepted"] else ""
        access_logger.info(
            _ACCESS + tail.replace("%", "%%"), {**fields, "upstream": upstream}, extra=fields
        )


# ...then " supplied=session,csrf" (what the sidecar's session added) and " intercepted"
# (a request inside a CONNECT tunnel), when they apply.
_ACCESS = (
    "%(route)s %(method)s %(path)s %(status)d in=%(bytes_in)d out=%(bytes_out)d "
    "%(duration_ms)sms upstream=%(upstream)s id=%(request_id)s"
)
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_FETCH_BODY = 1024 * 1024  # bytes of a token fetch's answer read (dropped): more closes it


class _Send:
    """One client request's upstream sends: where to, and what the session supplies."""

    __slots__ = ("generation", "target", "path", "client", "governed", "csrf_root", "token")

    def __init__(self, generation: Generation, target: str, request: Request) -> None:
        self.generation, self.target, self.client = generation, target, request.headers
        self.path = target.partition("?")[0]  # cookies match on the path alone
        session = generation.session
        self.governed = session.governs(request.headers)
        # Where the CSRF token comes from, when the sidecar supplies it (else None)
        self.csrf_root = (
            service_root(self.path)
            if self.governed
            and session.csrf
            and request.method in WRITES
            and CSRF_HEADER not in request.headers
            else None
        )
        self.token: str | None = None  # the token sent last


class _ClientBodyError(Exception):
    """The client's request body broke a limit; answered with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def _request_body(
    content: aiohttp.StreamReader, limit: int | None, stall: float
) -> AsyncIterator[bytes]:
    """The client's body, streamed; cut when it passes ``limit`` or stalls ``stall`` s."""
    seen = 0
    while True:
        try:
            async with asyncio.timeout(stall):
                chunk = await content.readany()
        except TimeoutError:
            raise _ClientBodyError(
                REQUEST_TIMEOUT, f"the request body stalled for {stall:g}s (timeouts.read)"
            ) from None
        if not chunk:
            return
        seen += len(chunk)
        if limit is not None and seen > limit:
            raise _ClientBodyError(
                REQUEST_TOO_LARGE,
                f"the request body is larger than limits.max_body ({limit} bytes)",
            )
        yield chunk


async def _kept(
    body: AsyncIterator[bytes], limit: int
) -> tuple[list[bytes] | None, AsyncIterator[bytes]]:
    """A body read up to ``limit`` bytes: all of it (kept, to send again if need be), or
    None and the body to stream when it is longer (the chunks read, then the rest)."""
    chunks: list[bytes] = []
    seen = 0
    async for chunk in body:
        chunks.append(chunk)
        seen += len(chunk)
        if seen > limit:
            return None, _chained(chunks, body)
    return chunks, _replay(chunks)


async def _replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _chained(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


async def _pieces(
    content: aiohttp.StreamReader, head: bytes, body: BodyRewriter | None
) -> AsyncGenerator[bytes]:
    """The answer's body to send: ``head`` (read already), then the rest as it arrives.

    With a rewriter, each chunk comes out as bounded pieces (`BodyRewriter.feed`),
    each taken only after the previous one was written.
    """
    chunk = head
    while True:
        if chunk:
            if body is None:
                yield chunk
            else:
                for piece in body.feed(chunk):
                    yield piece
        chunk = await content.read(CHUNK)
        if not chunk:
            break
    if body is not None and (tail := body.flush()):
        yield tail


def _client_origin(request: Request) -> str:
    """The origin the client used, for the links it gets back (ValueError: none usable).

    An absolute-form target (the sidecar as ``http_proxy``) names it, port included
    (aiohttp's ``request.host`` then drops the port); else the Host header does.
    """
    if _absolute_form(request):
        scheme, _, rest = request.raw_path.partition("://")
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        return local_origin(authority, scheme=scheme.lower())
    return local_origin(request.headers.get("Host") or request.host)


def _client_body_error(exc: BaseException) -> _ClientBodyError | None:
    return next((e for e in exception_chain(exc) if isinstance(e, _ClientBodyError)), None)


def _close_watch(request: Request, upstream: UpstreamResponse) -> asyncio.Future[None] | None:
    """For a body delimited by the connection's close, the future that tells how it closed."""
    if (
        upstream.content_length is not None
        or "chunked" in upstream.headers.get("Transfer-Encoding", "").lower()
        or request.method == "HEAD"
        or upstream.status in (204, 304)
    ):
        return None
    closed = upstream.closed
    if closed is not None:
        closed.add_done_callback(_failed_future)  # retrieve its exception, whatever happens
    return closed


def _failed_future(future: asyncio.Future[None]) -> bool:
    return not future.cancelled() and future.exception() is not None


def _log_path(request: Request) -> str:
    """The path as sent, still percent-encoded, without the query (it may hold personal data)."""
    return request.raw_path.partition("?")[0]


def _same_host(url: URL, upstream: UpstreamURL) -> bool:
    if (url.host or "").lower() != upstream.host:
        return False
    return url.explicit_port is None or url.port in (upstream.port, 80, 443)


def _absolute_form(request: Request) -> bool:
    return request.raw_path[:1] != "/" and "://" in request.raw_path[:10]
