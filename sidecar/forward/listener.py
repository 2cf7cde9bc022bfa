"""aiohttp's server side, adapted: a route's HTTP listener, our errors and limits.

This is the one module that reaches into aiohttp's server internals (the
list is below), so an aiohttp upgrade is a change here and nowhere else.

The low-level server hands every request to one handler, whatever its target
(``CONNECT host:443``, ``OPTIONS *``, absolute-form without a path), so the
proxy decides about all of them; a router would answer some with its own 404.
Requests aiohttp's parser rejects get DESIGN.md's JSON ``bad_request`` too,
instead of aiohttp's text page, and nothing ever shows a traceback.

Both of aiohttp's request parsers give the same verdicts: llhttp (its C
extension) and, where aiohttp has no wheel for the platform or
``AIOHTTP_NO_EXTENSIONS`` is set, its pure-Python parser, which this module
makes refuse what llhttp refuses (`refuse_as_llhttp`).

Limits (``routes[].limits``):

- ``max_header_size`` / ``max_headers``: aiohttp's parser refuses larger heads (400);
- ``header_timeout``: a connection must deliver a complete request head this
  soon after it opens or after its previous response (slowloris); else it is
  closed;
- ``idle_timeout``: aiohttp's keep-alive timeout;
- ``max_connections``: connections beyond it are accepted but not read until
  a slot frees (they wait, as in a backlog; nothing is refused), so a burst
  cannot exhaust file descriptors for the upstream pool.

aiohttp internals this module relies on (checked against aiohttp 3.14):

- ``web_protocol.RequestHandler`` subclassed: the hooks ``connection_made``,
  ``data_received``, ``connection_lost`` and ``handle_error`` overridden;
  its ``_manager`` (the `web.Server`), ``_loop`` and ``_parser`` read;
- ``web.Server.__call__`` overridden to build our protocol with the
  server's ``_kwargs`` and ``_loop``;
- ``request.writer.output_size`` (has the response started?) and
  ``request.protocol`` in the handler;
- ``web.TCPSite._server`` (its sockets) and ``_port`` for the bound port;
- the pure-Python parser: ``http_parser.HttpRequestParserPy`` and
  ``HttpPayloadParser`` (both get a subclass by ``__class__`` assignment, so
  no constructor signature is copied), their ``parse_message``,
  ``feed_data``, ``max_headers`` (counts the request line and the empty line),
  ``_lines``, ``_tail``, ``_payload_parser`` (assigned by ``feed_data``
  itself), ``_type``, ``ParseState`` and ``PayloadState``; and the rule that
  ``HttpParser.feed_data`` re-raises only ``InvalidHeader`` and
  ``TransferEncodingError`` from a body (the battery in
  tests/forward/test_request_parsing.py pins it);
- the tests swap ``web_protocol.HttpRequestParser`` to run both parsers.

Interception (``intercept.enabled``): the proxy answers a CONNECT it serves
with a `Tunnel`; `open_tunnel` then sends the 200 itself, makes sure the
client speaks TLS (a peek at its first byte through a duplicate of the
socket, so nothing is consumed: plain HTTP gets a JSON 400 and the
connection closes), and hands the socket to ``loop.start_tls`` (server side,
the interception certificate, ALPN http/1.1, bounded by ``header_timeout``).
The TLS connection gets a new `_Protocol` of the same listener, marked with
the tunnel's target (`intercepted`), so each request inside takes the very
same path as a plain one; the CONNECT's own protocol lets go of the socket
without closing it (`_Protocol.hand_over`). This relies on the CONNECT
protocol's ``_message_tail`` (what the client sent after the CONNECT head,
which aiohttp keeps unparsed), ``_manager.connection_lost`` (forgetting a
connection) and ``force_close`` with no transport; on asyncio and uvloop,
``start_tls`` not calling ``connection_made`` itself.

The response side (the end of this module, used by the proxy) relies on:
``StreamResponse._prepare_headers`` overridden, a connection reset through
``request.transport`` (``SO_LINGER`` 0, then ``abort()``), and
``request.writer`` written to directly for ``100 Continue``.

Its length (~480 lines) is that rule's price: every private aiohttp use on the
inbound side stays in this one file, so none hides elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion11, http_parser, web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler

from sidecar.config import LimitsConfig
from sidecar.forward.failures import BAD_REQUEST, INTERNAL_ERROR, error_response

log = logging.getLogger("sidecar.listener")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# ---- the pure-Python parser, made to refuse what llhttp refuses

#: llhttp's request methods (HTTP_METHOD_MAP); it refuses any other, lowercase ones too
LLHTTP_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
LLHTTP_VERSIONS = frozenset((b"HTTP/0.9", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0"))
_MAX_UINT64 = 2**64 - 1  # llhttp's Content-Length and chunk sizes are uint64
_REQUEST_LINE = re.compile(rb"([^ ]+) +([^ ]+) +([^ ]+)")  # llhttp takes runs of spaces
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_EXT_VALUE = _TCHAR + rb'*(?:"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*")?'
#: chunk extensions exactly as llhttp takes them (no whitespace; see the tests' fuzzing)
_CHUNK_EXTENSIONS = re.compile(
    rb"(?:;+(?:" + _TCHAR + rb"+(?:=" + _EXT_VALUE + rb")?|=" + _EXT_VALUE + rb"))*"
)
_PurePythonParser: type[http_parser.HttpRequestParser] = http_parser.HttpRequestParserPy


class _CheckedRequestParser(_PurePythonParser):  # type: ignore[misc,valid-type]
    """aiohttp's pure-Python request parser with the checks llhttp makes and it lacks.

    Platforms without aiohttp's C extensions get this parser; every input gets
    the verdict llhttp gives it (tests/forward/test_request_parsing.py runs its battery
    on both): a known method in its case, an ASCII request target, runs of
    spaces in the request line, ``Content-Length`` within 64 bits,
    ``chunked`` once and last, and refusals in a body (chunk sizes and
    extensions, trailers) that refuse the request instead of only failing
    its body.
    """

    @property
    def _payload_parser(self) -> http_parser.HttpPayloadParser | None:
        parser: http_parser.HttpPayloadParser | None = self.__dict__["_payload_parser"]
        return parser

    @_payload_parser.setter
    def _payload_parser(self, parser: http_parser.HttpPayloadParser | None) -> None:
        # The base class makes each body's parser itself; this is the one place to check it.
        if parser is not None:
            parser.__class__ = _CheckedPayloadParser
        self.__dict__["_payload_parser"] = parser

    def feed_data(self, data: bytes, *args: Any, **kwargs: Any) -> Any:
        result = super().feed_data(data, *args, **kwargs)
        # llhttp refuses a request line at its first impossible byte; the base
        # class waits for the end of the head (or the head timer) first.
        if self._lines:
            _request_line(self._lines[0])
        elif self._tail and self.__dict__["_payload_parser"] is None:
            method, space, _ = self._tail.lstrip(b"\r\n").partition(b" ")
            if method not in LLHTTP_METHODS and (
                space or not any(m.startswith(method) for m in LLHTTP_METHODS)
            ):
                raise BadHttpMethod(method.decode("latin-1"))
        return result

    def parse_message(self, lines: list[bytes]) -> Any:
        line = _request_line(lines[0])
        message = super().parse_message([line, *lines[1:]])
        if _length_too_large(message.headers.get("Content-Length", "")):
            raise BadHttpMessage("Content-Length is too large")
        codings = message.headers.get("Transfer-Encoding", "").split(",")
        if "chunked" in (c.strip(" \t").lower() for c in codings[:-1]):
            raise BadHttpMessage("Transfer-Encoding: chunked must be the last coding, once")
        return message


class _CheckedPayloadParser(http_parser.HttpPayloadParser):
    """A request body's parser, refusing chunk-size lines llhttp refuses.

    It follows the chunked framing alongside the base class (which keeps the
    size line's extensions to itself) to see every chunk-size line once.
    """

    _size_line = b""  # the start of a chunk-size line not complete yet
    _skip = 0  # chunk data (and its CRLF) still to come
    _sizes_done = False  # the last chunk was seen: trailers follow

    def feed_data(
        self, chunk: bytes, SEP: Any = b"\r\n", CHUNK_EXT: bytes = b";"
    ) -> tuple[http_parser.PayloadState, bytes]:
        if self._type == http_parser.ParseState.PARSE_CHUNKED:
            self._check_size_lines(chunk)
        try:
            return super().feed_data(chunk, SEP, CHUNK_EXT)
        except (InvalidHeader, TransferEncodingError):
            raise
        except BadHttpMessage as exc:
            # The base HttpParser hands any other error to the body only (the
            # handler then fails reading it); llhttp refuses the request: 400.
            raise TransferEncodingError(exc.message) from exc

    def _check_size_lines(self, data: bytes) -> None:
        pos = 0
        while pos < len(data) and not self._sizes_done:
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip -= step
                pos += step
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._size_line += data[pos:]  # the base class bounds it (LineTooLong)
                return
            line, self._size_line = (self._size_line + data[pos:end]).removesuffix(b"\r"), b""
            pos = end + 1
            digits, _, _ = line.partition(b";")
            if (
                not _HEX.fullmatch(digits)
                or int(digits, 16) > _MAX_UINT64
                or not _CHUNK_EXTENSIONS.fullmatch(line, len(digits))
            ):
                raise TransferEncodingError("invalid chunk size or chunk extension")
            size = int(digits, 16)
            self._sizes_done = size == 0
            self._skip = size + 2


def _request_line(line: bytes) -> bytes:
    """The request line with single spaces, as llhttp reads it; raise where llhttp refuses."""
    parts = _REQUEST_LINE.fullmatch(line)
    if parts is not None:
        line = b" ".join(parts.groups())
        if not parts[2].isascii():
            raise InvalidURLError(parts[2].decode("latin-1"))
        if parts[3] not in LLHTTP_VERSIONS:
            raise BadStatusLine(parts[3].decode("latin-1"))
    method = line.partition(b" ")[0]
    if method not in LLHTTP_METHODS:
        raise BadHttpMethod(method.decode("latin-1"))
    return line


def _length_too_large(length: str) -> bool:
    """Beyond 64 bits, or 2**64 - 1: llhttp's own value for "no Content-Length"."""
    return length.isascii() and length.isdigit() and int(length) >= _MAX_UINT64


def refuse_as_llhttp(parser: object) -> None:
    """Give aiohttp's pure-Python parser the checks llhttp makes (see `_CheckedRequestParser`).

    Any other parser (llhttp's, one already checked) is left as it is.
    """
    if type(parser) is _PurePythonParser:
        parser.__class__ = _CheckedRequestParser
        # The base class counts the request line and the empty line as headers too.
        parser.max_headers += 2


class _Protocol(RequestHandler):
    """One client connection, with the head timeout and the connection limit."""

    _head_timer: asyncio.TimerHandle | None = None
    _between_requests = False  # the next bytes start a new request head
    waiting = False  # for a slot (ListenerServer.admit)
    _held = b""  # what was read while waiting
    tunnel: str | None = None  # inside a CONNECT tunnel: its target (``host:port``)

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        refuse_as_llhttp(self._parser)

    @property
    def _listener(self) -> ListenerServer:
        manager = self._manager
        assert isinstance(manager, ListenerServer)
        return manager

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener.admit(self)

    def admitted(self) -> None:
        """The connection got a slot: read it; its first head must come soon."""
        self.waiting = False
        if self.transport is not None:
            self.transport.resume_reading()
        self._start_head_timer()
        held, self._held = self._held, b""
        if held:
            self.data_received(held)

    def data_received(self, data: bytes) -> None:
        if self.waiting:
            # uvloop starts reading after connection_made() even when the protocol paused
            # the transport there: hold that one read and pause again until admitted.
            self._held += data
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if self._between_requests:
            # The first bytes of the next request: the rest of its head must follow.
            self._between_requests = False
            self._start_head_timer()
        super().data_received(data)

    def response_done(self) -> None:
        """Idle now: aiohttp's keep-alive timeout applies until the next bytes."""
        self._between_requests = True

    def _start_head_timer(self) -> None:
        if self._head_timer is None and self.transport is not None:
            self._head_timer = self._loop.call_later(
                self._listener.limits.header_timeout, self._head_too_slow
            )

    def head_received(self) -> None:
        self._between_requests = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        log.info("closing a connection that sent no complete request head within %.1fs",
                 self._listener.limits.header_timeout)  # fmt: skip
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_received()
        self._listener.release(self)
        super().connection_lost(exc)

    def inside(self, target: str) -> _Protocol:
        """A new connection of this listener, for the requests inside a tunnel to ``target``."""
        inner = self._listener()
        assert isinstance(inner, _Protocol)
        inner.tunnel = target
        return inner

    def hand_over(self) -> None:
        """The socket now carries a tunnel's TLS: let go of it without closing it."""
        self.head_received()
        self._listener.release(self)
        manager = self._manager
        self.transport = None
        self.force_close()  # this request is the last; with no transport, nothing is closed
        if manager is not None:
            manager.connection_lost(self, None)

    def early_bytes(self, request: web.BaseRequest) -> bool:
        """Did the client send bytes after its CONNECT head before the 200?

        llhttp leaves them unparsed (``_message_tail``); the pure-Python parser
        makes them the CONNECT's body.
        """
        return bool(self._message_tail) or bytes_received(request) > 0

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; the connection is cut")
        if status < 500:
            # Only the class: the parser's text quotes header lines, which may hold secrets.
            log.debug("refused a malformed request (%s)", type(exc).__name__ if exc else status)
            response = error_response(BAD_REQUEST, f"malformed request: {message or exc}")
        else:
            log.error("internal error while handling %s %s: %s: %s", request.method,
                      request.raw_path.partition("?")[0], type(exc).__name__, exc,
                      exc_info=exc)  # fmt: skip
            response = error_response(
                INTERNAL_ERROR, "the sidecar failed to handle this request; see its log"
            )
        response.force_close()
        return response


class ListenerServer(web.Server):
    """`web.Server` whose connections answer errors as JSON and respect the limits."""

    def __init__(self, handler: Handler, limits: LimitsConfig, **kwargs: Any) -> None:
        super().__init__(self._with_head_timer(handler), **kwargs)
        self.limits = limits
        self._active: set[_Protocol] = set()
        self._waiting: deque[_Protocol] = deque()

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return _Protocol(self, loop=self._loop, **kwargs)

    @staticmethod
    def _with_head_timer(handler: Handler) -> Handler:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            if isinstance(protocol, _Protocol):
                protocol.head_received()
            try:
                if _length_too_large(request.headers.get("Content-Length", "")):
                    # llhttp reads 2**64 - 1 as "no length": an empty body, and the
                    # bytes after the head as the next request. Refused; nothing after
                    # it on this connection can be trusted.
                    refusal = error_response(
                        BAD_REQUEST, "malformed request: Content-Length is too large"
                    )
                    refusal.force_close()
                    return refusal
                if request.method == "CONNECT":
                    # llhttp gives a CONNECT no body; the pure-Python parser one that never
                    # ends (what follows belongs to the tunnel), which would keep a refused
                    # CONNECT's connection open for aiohttp's lingering time.
                    request.content.feed_eof()
                response = await handler(request)
                if isinstance(response, Tunnel) and isinstance(protocol, _Protocol):
                    await open_tunnel(request, protocol, response)
                return response
            finally:
                if isinstance(protocol, _Protocol):
                    protocol.response_done()

        return handle

    def admit(self, protocol: _Protocol) -> None:
        if len(self._active) < self.limits.max_connections:
            self._active.add(protocol)
            protocol.admitted()
            return
        protocol.waiting = True
        if protocol.transport is not None:
            protocol.transport.pause_reading()
        self._waiting.append(protocol)
        log.warning("connection limit (%d) reached: a new connection waits",
                    self.limits.max_connections)  # fmt: skip

    def release(self, protocol: _Protocol) -> None:
        if protocol in self._active:
            self._active.discard(protocol)
            while self._waiting and len(self._active) < self.limits.max_connections:
                nxt = self._waiting.popleft()
                if nxt.transport is not None and not nxt.transport.is_closing():
                    self._active.add(nxt)
                    nxt.admitted()
        elif protocol in self._waiting:
            self._waiting.remove(protocol)


def bound_port(site: web.TCPSite) -> int:
    """The port a started site listens on (asyncio's and uvloop's servers alike)."""
    sockets = getattr(site._server, "sockets", None) or ()  # noqa: SLF001
    return int(sockets[0].getsockname()[1]) if sockets else site._port  # noqa: SLF001


async def start_listener(
    handler: Handler, host: str, port: int, *, limits: LimitsConfig, shutdown_timeout: float
) -> tuple[web.ServerRunner, web.TCPSite]:
    """Serve ``handler`` on HOST:PORT; stop with ``runner.cleanup()``."""
    server = ListenerServer(
        handler,
        limits,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        access_log=None,  # the proxy writes its own access line
        auto_decompress=False,  # request bodies go upstream as sent
        max_line_size=limits.max_header_size,
        max_field_size=limits.max_header_size,
        max_headers=limits.max_headers,
        keepalive_timeout=limits.idle_timeout,
    )
    runner = web.ServerRunner(server, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


# ---- CONNECT tunnels (interception)

_TLS_HANDSHAKE = 0x16  # the first byte of every TLS connection: a handshake record


class Tunnel(web.StreamResponse):
    """The proxy's answer to a CONNECT that interception serves: 200, then TLS.

    `open_tunnel` writes the 200 itself (no Content-Length: RFC 9110 9.3.6), so
    aiohttp's own prepare and write_eof do nothing here.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        target: str,
        *,
        timeout: float,
        foreign_name: Callable[[object], str | None] = lambda _: None,
    ) -> None:
        super().__init__(status=200, reason="Connection established")
        self.context = context
        self.target = target
        self.timeout = timeout  # the client's TLS handshake must be done this soon
        self.foreign_name = foreign_name  # the SNI the TLS asked for, if not one we serve

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def intercepted(request: web.BaseRequest) -> bool:
    """Did ``request`` arrive inside a CONNECT tunnel (interception)?"""
    protocol = request.protocol
    return isinstance(protocol, _Protocol) and protocol.tunnel is not None


async def open_tunnel(request: web.BaseRequest, protocol: _Protocol, tunnel: Tunnel) -> None:
    """Send the 200, check that TLS follows, and serve HTTP/1.1 inside it."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    if protocol.early_bytes(request):
        log.info("closing the CONNECT tunnel to %s: the client sent data before the 200",
                 tunnel.target)  # fmt: skip
        transport.close()
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + tunnel.timeout
    transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    transport.pause_reading()  # the client's first bytes stay in the socket for TLS
    try:
        first = await _peek(transport, tunnel.timeout)
    except TimeoutError:
        log.info("closing the CONNECT tunnel to %s: no TLS handshake within %.1fs "
                 "(limits.header_timeout)", tunnel.target, tunnel.timeout)  # fmt: skip
        transport.close()
        return
    if first == b"":
        transport.close()  # the client left
        return
    if first is not None and first[0] != _TLS_HANDSHAKE:
        _refuse_plain(transport, tunnel.target)
        return
    inner = protocol.inside(tunnel.target)
    try:
        tls = await loop.start_tls(
            transport,
            inner,
            tunnel.context,
            server_side=True,
            ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
        )
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError; the socket is closed
        log.info("TLS inside the CONNECT tunnel to %s failed: %s", tunnel.target,
                 getattr(exc, "reason", None) or type(exc).__name__)  # fmt: skip
        return
    finally:
        # Until here the CONNECT's connection held its slot (limits.max_connections).
        protocol.hand_over()
    if tls is None:
        return
    name = tunnel.foreign_name(tls.get_extra_info("ssl_object"))
    if name is not None:
        # A client that verifies has refused our certificate already; any other is cut.
        log.info("closing the CONNECT tunnel to %s: the TLS inside is for %r, which the "
                 "interception certificate does not name", tunnel.target, name[:100])  # fmt: skip
        tls.close()
        return
    inner.connection_made(tls)


async def _peek(transport: asyncio.Transport, timeout: float) -> bytes | None:
    """The client's first bytes, left unread if they start TLS (else read and dropped);
    None where the loop cannot watch a socket."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    loop = asyncio.get_running_loop()
    # A duplicate descriptor: the transport keeps its own, and MSG_PEEK consumes nothing.
    try:
        peeker = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:  # Windows cannot dup a socket handle: TLS is then told by its failure
        return None
    try:
        readable: asyncio.Future[None] = loop.create_future()
        try:
            loop.add_reader(peeker.fileno(), _set_once, readable)
        except NotImplementedError:  # Windows' proactor loop
            return None
        try:
            async with asyncio.timeout(timeout):
                await readable
        finally:
            loop.remove_reader(peeker.fileno())
        try:
            first = peeker.recv(16, socket.MSG_PEEK)
            if first and first[0] != _TLS_HANDSHAKE:
                # Not TLS: read it now, so that closing the connection does not reset it.
                peeker.recv(65536)
        except OSError:
            return b""
        return first
    finally:
        peeker.close()


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _refuse_plain(transport: asyncio.Transport, target: str) -> None:
    """Plain HTTP inside a tunnel: a JSON 400 in plain HTTP, then the connection closes."""
    response = error_response(
        BAD_REQUEST,
        f"the CONNECT tunnel to {target} carries TLS only, and this is not TLS",
        "call the upstream's https:// URLs through https_proxy; for http:// URLs use http_proxy "
        "(no CONNECT)",
    )
    body = response.body
    assert isinstance(body, bytes)
    head = [f"HTTP/1.1 {response.status} {response.reason}"]
    head += [f"{name}: {value}" for name, value in response.headers.items()]
    head += [f"Content-Length: {len(body)}", "Connection: close"]
    log.info("refused plain HTTP inside the CONNECT tunnel to %s", target)
    transport.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
    transport.close()


# ---- the response side of the adapter (used by the proxy)
#
# What the proxy needs from aiohttp's server beyond its public API, kept here so an
# aiohttp upgrade is checked in one file. Each relies on:
#
# - `RelayedStream` / `Relayed`: overriding `StreamResponse._prepare_headers`, the
#   coroutine where aiohttp fills in Content-Type and Server, to take out the ones the
#   upstream did not send;
# - `send_continue`: `BaseRequest.writer` (the connection's `StreamWriter`), to write
#   the interim `100 Continue` line before the handler has a response;
# - `reset`: `BaseRequest.transport` and its ``socket`` extra info, to set SO_LINGER 0
#   and abort (a TCP reset instead of a FIN);
# - `bytes_received`: the request `StreamReader`'s undocumented ``total_bytes``
#   counter (``total_raw_bytes``, its documented twin, only exists from aiohttp 3.13).


class RelayedStream(web.StreamResponse):
    """A relayed answer: aiohttp invents no Content-Type or Server the upstream did not send."""

    async def _prepare_headers(self) -> None:
        invented = [n for n in ("Content-Type", "Server") if n not in self.headers]
        await super()._prepare_headers()
        for name in invented:
            self.headers.popall(name, None)


class Relayed(RelayedStream, web.Response):
    """A small relayed answer, sent in one write."""


async def send_continue(request: web.BaseRequest) -> None:
    """Invite the body of an ``Expect: 100-continue`` request (HTTP/1.1 clients only)."""
    if request.version >= HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def reset(request: web.BaseRequest) -> None:
    """Cut the client connection with a TCP reset, not a FIN.

    After a failure mid-body, a close-delimited body (HTTP/1.0) ended by FIN would
    look complete; a reset (SO_LINGER 0, then abort) cannot.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def bytes_received(request: web.BaseRequest) -> int:
    """How many body bytes the client has sent so far (for the access line)."""
    total: int = request.content.total_bytes
    return total
