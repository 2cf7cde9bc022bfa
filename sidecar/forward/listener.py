"""A route's HTTP/1.1 listener: an asyncio protocol on aiohttp's request parser.

This is the one module that reaches into aiohttp's server internals (the
list is below), so an aiohttp upgrade is a change here and nowhere else.

Each connection is a `_Protocol`: aiohttp's parser (llhttp, its C extension)
cuts the bytes into requests; each becomes a small `Request` record (the
parser's message, its body as a `StreamReader`, the connection), which the
handler answers with a whole `sidecar.forward.answer.Answer` (its own, or a
small relayed one), a `Streamed` answer it writes itself, or a `Tunnel`. No
aiohttp request or response object and no task is made per request: one
task per connection runs its requests in turn, and a whole answer goes out
in one write. Every target reaches the handler
(``CONNECT host:443``, ``OPTIONS *``, absolute-form without a path), so the
proxy decides about all of them. Requests the parser refuses get DESIGN.md's
JSON ``bad_request`` (the status line as aiohttp wrote it: ``HTTP/1.0``), and
nothing ever shows a traceback.

The framing follows aiohttp's own server, which the tests pin: no body (and
no Content-Length) for 1xx, 204, 304 and a CONNECT's 2xx; no body for HEAD;
chunked when an HTTP/1.1 answer has no length, close-delimited for 1.0; a
Date when there is none; ``Connection: keep-alive`` for a 1.0 client that
keeps it, ``close`` for a 1.1 one that does not; ``Content-Type`` and
``Server`` are only added to the sidecar's own answers, never to relayed ones.
A request body the handler left unread is read (and dropped) for up to 10 s
before the next request, else the connection closes.

Both of aiohttp's request parsers give the same verdicts: llhttp and, where
aiohttp has no wheel for the platform or ``AIOHTTP_NO_EXTENSIONS`` is set,
its pure-Python parser, which this module makes refuse what llhttp refuses
(`refuse_as_llhttp`).

Limits (``routes[].limits``):

- ``max_header_size`` / ``max_headers``: the parser refuses larger heads (400);
- ``header_timeout``: a connection must deliver a complete request head this
  soon after it opens or after its previous response (slowloris); else it is
  closed;
- ``idle_timeout``: a connection with no request for this long is closed;
- ``max_connections``: connections beyond it are accepted but not read until
  a slot frees (they wait, as in a backlog; nothing is refused), so a burst
  cannot exhaust file descriptors for the upstream pool.

aiohttp internals this module relies on (checked against aiohttp 3.14):

- ``web_protocol.HttpRequestParser`` (looked up per connection: the tests
  swap it to run both parsers), built as ``RequestHandler`` builds it;
  ``web_protocol.RequestPayloadError`` and ``web_protocol.ERROR`` (the
  placeholder message of a refused request); ``base_protocol.BaseProtocol``
  (flow control both ways: the parser pauses on a full body buffer and
  resumes through ``data_received(b"")``), ``streams.EMPTY_PAYLOAD``, the
  parser's ``feed_data`` (messages, upgraded, tail) and ``set_upgraded``;
- the pure-Python parser: ``http_parser.HttpRequestParserPy`` and
  ``HttpPayloadParser`` (both get a subclass by ``__class__`` assignment, so
  no constructor signature is copied), their ``parse_message``,
  ``feed_data``, ``max_headers`` (counts the request line and the empty line),
  ``_lines``, ``_tail``, ``_payload_parser`` (assigned by ``feed_data``
  itself), ``_type``, ``ParseState`` and ``PayloadState``; and the rule that
  ``HttpParser.feed_data`` re-raises only ``InvalidHeader`` and
  ``TransferEncodingError`` from a body (the battery in
  tests/forward/test_request_parsing.py pins it);
- the request body's ``StreamReader.total_bytes`` (`bytes_received`;
  ``total_raw_bytes``, its documented twin, only exists from aiohttp 3.13).

Interception (``intercept.enabled``): the proxy answers a CONNECT it serves
with a `Tunnel`; `open_tunnel` then sends the 200 itself, makes sure the
client speaks TLS (a peek at its first byte through a duplicate of the
socket, so nothing is consumed: plain HTTP gets a JSON 400 and the
connection closes), and hands the socket to ``loop.start_tls`` (server side,
the interception certificate, ALPN http/1.1, bounded by ``header_timeout``).
The TLS connection gets a new `_Protocol` of the same listener, marked with
the tunnel's target (`intercepted`), so each request inside takes the very
same path as a plain one; the CONNECT's own protocol lets go of the socket
without closing it (`_Protocol.hand_over`). Both parsers stop at a CONNECT
head (llhttp calls it an upgrade; the pure-Python parser gives it a body that
never ends, which is ended here), so what the client sent after it is kept
unparsed (`_Protocol.early_bytes`). On asyncio and uvloop ``start_tls`` does
not call ``connection_made`` itself.

Its length is that rule's price: every private aiohttp use on the inbound
side stays in this one file, so none hides elsewhere.
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
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import (
    ClientConnectionResetError,
    HttpVersion10,
    HttpVersion11,
    http_parser,
    web,
    web_protocol,
)
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import SERVER_SOFTWARE, RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    TransferEncodingError,
)
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy, MultiDictProxy
from yarl import URL

from sidecar.config import LimitsConfig
from sidecar.forward.answer import Answer
from sidecar.forward.failures import BAD_REQUEST, INTERNAL_ERROR, error_response

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("sidecar.listener")

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


# ---- what the handler gets and gives


class Request:
    """One request as the handler sees it: the parser's message, its body, its connection.

    The attribute names are those of aiohttp's ``web.BaseRequest``, for the ones used.
    """

    __slots__ = ("method", "raw_path", "version", "headers", "url", "rel_url", "content",
                 "protocol", "keep_alive", "started")  # fmt: skip

    def __init__(self, message: RawRequestMessage, content: StreamReader, protocol: _Protocol):
        self.method: str = message.method
        self.raw_path: str = message.path
        self.version = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        url: URL = message.url
        self.url = url  # absolute for an absolute-form target
        self.rel_url = url.relative() if url.absolute else url
        self.content = content
        self.protocol = protocol
        self.keep_alive = not message.should_close
        self.started = False  # the answer's head went out

    @property
    def path(self) -> str:
        return self.rel_url.path

    @property
    def query(self) -> MultiDictProxy[str]:
        return self.rel_url.query

    @property
    def query_string(self) -> str:
        return self.rel_url.query_string

    @property
    def body_exists(self) -> bool:
        return self.content is not EMPTY_PAYLOAD

    @property
    def content_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        return None if length is None else int(length)

    @property
    def host(self) -> str:
        """The Host header; for an absolute-form target its host (no port, as in aiohttp)."""
        if self.url.absolute:
            return self.url.host or ""
        return self.headers.get("Host") or socket.getfqdn()

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport


Handler = Callable[[Request], Awaitable["Response | Tunnel"]]


class Streamed:
    """A relayed answer whose body the handler writes as it comes.

    The head goes out at `prepare` (a client waiting on a slow body sees it
    at once); each `write` waits while the client's socket is full.
    """

    __slots__ = ("status", "reason", "headers", "keep_alive", "_request", "_chunked", "_empty")

    def __init__(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        self.keep_alive: bool | None = None
        self._request: Request | None = None
        self._chunked = self._empty = False

    async def prepare(self, request: Request) -> None:
        self._request = request
        head, self.keep_alive, self._chunked = _head(
            request, self.status, self.reason, self.headers, request.keep_alive, whole=None
        )
        self._empty = _must_be_empty(request.method, self.status)
        request.started = True
        await request.protocol.send([head])

    async def write(self, data: bytes) -> None:
        assert self._request is not None, "prepare() first"
        if self._empty or not data:
            return
        if self._chunked:
            await self._request.protocol.send([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            await self._request.protocol.send([data])

    async def write_eof(self) -> None:
        assert self._request is not None, "prepare() first"
        if self._chunked and not self._empty:
            await self._request.protocol.send([b"0\r\n\r\n"])


Response = Answer | Streamed  # or a `Tunnel`

_EMPTY_BODY_STATUS = frozenset({204, 304})


def _must_be_empty(method: str, status: int) -> bool:
    return (
        status < 200 or status in _EMPTY_BODY_STATUS or method == "HEAD"
        or (method == "CONNECT" and 200 <= status < 300)
    )  # fmt: skip


def _no_length(method: str, status: int) -> bool:
    """No Content-Length either (RFC 9110 8.6): 1xx, 204, and a CONNECT's 2xx; 304 keeps it."""
    return status < 200 or status == 204 or (method == "CONNECT" and 200 <= status < 300)


def _head(
    request: Request,
    status: int,
    reason: str | None,
    headers: CIMultiDict[str],
    keep_alive: bool,
    *,
    whole: int | None,
    own: bool = False,
) -> tuple[bytes, bool, bool]:
    """An answer's head, framed as aiohttp frames it: (bytes, keep-alive, chunked).

    ``whole``: the length of a body sent whole (else it streams); ``own``: the
    sidecar's own answer, which gets a Content-Type and a Server when it has none.
    """
    method, version = request.method, request.version
    if whole is not None and "Content-Length" not in headers:
        if whole or (status != 304 and method != "HEAD"):
            headers["Content-Length"] = str(whole)
    chunked = False
    if _must_be_empty(method, status):
        if _no_length(method, status):
            headers.popall("Content-Length", None)
        headers.popall("Transfer-Encoding", None)
    else:
        length = headers.get("Content-Length")
        if length is None:
            if version >= HttpVersion11:
                headers["Transfer-Encoding"] = "chunked"
                chunked = True
            else:
                keep_alive = False  # the body ends where the connection does
        if own and length != "0":
            headers.setdefault("Content-Type", "application/octet-stream")
    if "Date" not in headers:
        headers["Date"] = _date()
    if own:
        headers.setdefault("Server", SERVER_SOFTWARE)
    if "Connection" not in headers:
        if keep_alive:
            if version == HttpVersion10:
                headers["Connection"] = "keep-alive"
        elif version == HttpVersion11:
            headers["Connection"] = "close"
    if reason is None:
        reason = _reason(status)
    lines = [f"HTTP/{version[0]}.{version[1]} {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("a line break in the answer's status line or headers")
    return (text + "\r\n\r\n").encode(), keep_alive, chunked


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


_date_cache: tuple[int, str] = (0, "")


def _date() -> str:
    """The Date header's value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def _whole(request: Request, response: Answer) -> tuple[list[bytes], bool]:
    """A whole answer's bytes and whether the connection stays open after it."""
    keep_alive = request.keep_alive and response.keep_alive is not False
    head, keep_alive, _ = _head(
        request, response.status, response.reason, response.headers, keep_alive,
        whole=len(response.body), own=response.own,
    )  # fmt: skip
    if _must_be_empty(request.method, response.status):
        return [head], keep_alive
    return [head, response.body], keep_alive


# ---- connections

_LINGER = 10.0  # s an unread request body is read (and dropped) for, as aiohttp's lingering_time
_QUEUE_MAX = 32  # pipelined requests parsed ahead; reading pauses beyond, resumes at half
_Message = tuple[RawRequestMessage | HttpProcessingError, StreamReader]


class _Protocol(BaseProtocol):
    """One client connection: its requests in turn, with the head timeout and the limits."""

    tunnel: str | None = None  # inside a CONNECT tunnel: its target (``host:port``)
    waiting = False  # for a slot (`Listener.admit`)
    _held = b""  # what was read while waiting

    def __init__(self, listener: Listener) -> None:
        limits = listener.limits
        # As aiohttp's RequestHandler builds it; looked up here, so the tests can swap it.
        parser = web_protocol.HttpRequestParser(  # type: ignore[attr-defined]
            self,
            listener.loop,
            2**16,
            max_line_size=limits.max_header_size,
            max_field_size=limits.max_header_size,
            max_headers=limits.max_headers,
            payload_exception=web_protocol.RequestPayloadError,
            auto_decompress=False,  # request bodies go upstream as sent
        )
        refuse_as_llhttp(parser)
        super().__init__(listener.loop, parser)
        self.listener = listener
        self.current: Request | None = None  # the request being answered
        self._messages: deque[_Message] = deque()
        self._tail = b""  # bytes after an upgrade (a CONNECT), unparsed
        self._closing = False  # no request after the current one
        self.task: asyncio.Task[None] | None = None  # runs the requests; made at the first
        self._waiter: asyncio.Future[None] | None = None  # the task waits for a request
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._between_requests = False  # the next bytes start a new request head

    # -- bytes in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # TCP_NODELAY
        self.listener.connections.add(self)
        self.listener.admit(self)

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
        if self._closing:
            return
        if self._upgraded:
            self._tail += data
            return
        if data and self._between_requests:
            # The first bytes of the next request: the rest of its head must follow.
            self._between_requests = False
            self._start_head_timer()
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        parser = self._parser
        assert parser is not None
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            messages, upgraded, tail = [(exc, EMPTY_PAYLOAD)], False, b""
        if messages:
            self._messages.extend(messages)
            if len(self._messages) >= _QUEUE_MAX:
                self._pause_reading_for_buffer()
            if self.task is None:
                self.task = self._loop.create_task(self._serve())
            elif self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        self._upgraded = upgraded
        if upgraded and tail:
            self._tail = tail

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_received()
        self._stop_idle_timer()
        self.listener.forget(self)
        super().connection_lost(exc)
        self._closing = True
        if self.current is not None:
            self.current.content.set_exception(exc or ConnectionResetError("Connection lost"))
        if self.task is not None:
            self.task.cancel()  # a client that leaves cancels its upstream request

    # -- timers

    def _start_head_timer(self) -> None:
        if self._head_timer is None and self.transport is not None:
            self._head_timer = self._loop.call_later(
                self.listener.limits.header_timeout, self._head_too_slow
            )

    def head_received(self) -> None:
        self._between_requests = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        log.info("closing a connection that sent no complete request head within %.1fs",
                 self.listener.limits.header_timeout)  # fmt: skip
        if self.transport is not None:
            self.transport.close()

    def _idle(self) -> None:
        """Between requests: closed after ``idle_timeout`` unless a request comes."""
        self._between_requests = True
        if not self._messages and self._idle_timer is None:
            self._idle_timer = self._loop.call_later(
                self.listener.limits.idle_timeout, self._idle_too_long
            )

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_too_long(self) -> None:
        self._idle_timer = None
        if self.current is None and not self._messages and self.transport is not None:
            self.transport.close()

    # -- requests

    async def _serve(self) -> None:
        try:
            while not self._closing:
                if not self._messages:
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                message, payload = self._messages.popleft()
                if self._buffer_paused and len(self._messages) <= _QUEUE_MAX // 2:
                    self._resume_reading_for_buffer()
                self._stop_idle_timer()
                if not await self._one(message, payload):
                    break
        except asyncio.CancelledError:
            pass  # the client left, or shutdown gave up on its request
        except Exception as exc:  # a bug here: the connection is cut, never a traceback sent
            log.error("internal error on a client connection: %s", type(exc).__name__,
                      exc_info=exc)  # fmt: skip
        finally:
            self._closing = True
            if self.transport is not None:  # None: gone, or handed over to a tunnel's TLS
                self.transport.close()

    async def _one(self, message: RawRequestMessage | HttpProcessingError,
                   payload: StreamReader) -> bool:  # fmt: skip
        """Answer one request; False when the connection is to close after it."""
        if isinstance(message, HttpProcessingError):
            # Only the class: the parser's text quotes header lines, which may hold secrets.
            log.debug("refused a malformed request (%s)", type(message).__name__)
            refusal = error_response(
                BAD_REQUEST, f"malformed request: {message.message or message}"
            )
            refusal.force_close()
            await self.send(_whole(Request(web_protocol.ERROR, EMPTY_PAYLOAD, self), refusal)[0])
            return False
        self.head_received()
        request = self.current = Request(message, payload, self)
        try:
            response = await self._handle(request)
            if response is None:
                return False
            if isinstance(response, Tunnel):
                await open_tunnel(request, self, response)
                return False
            if isinstance(response, Streamed):
                keep_alive = bool(response.keep_alive)  # sent by the handler
            else:
                pieces, keep_alive = _whole(request, response)
                await self.send(pieces)
        except ConnectionError:
            return False  # the client left
        finally:
            self.current = None
        if not keep_alive or self._closing or not await self._linger(payload):
            return False
        if self._upgraded and not self._messages:
            # An upgrade the proxy did not take (it forwards none): parse what followed.
            assert self._parser is not None
            self._parser.set_upgraded(False)
            self._upgraded = False
            tail, self._tail = self._tail, b""
            self._parse(tail)
        self._idle()
        return True

    async def _handle(self, request: Request) -> Response | Tunnel | None:
        """The handler's answer; None when the connection is to be cut instead."""
        if _length_too_large(request.headers.get("Content-Length", "")):
            # llhttp reads 2**64 - 1 as "no length": an empty body, and the bytes after
            # the head as the next request. Refused; nothing after it can be trusted.
            refusal = error_response(BAD_REQUEST, "malformed request: Content-Length is too large")
            refusal.force_close()
            return refusal
        if request.method == "CONNECT":
            # llhttp gives a CONNECT no body; the pure-Python parser one that never ends
            # (what follows belongs to the tunnel).
            request.content.feed_eof()
        try:
            return await self.listener.handler(request)
        except Exception as exc:
            if request.started:
                return None  # the answer started: the connection is cut
            log.error("internal error while handling %s %s: %s: %s", request.method,
                      request.raw_path.partition("?")[0], type(exc).__name__, exc,
                      exc_info=exc)  # fmt: skip
            response = error_response(
                INTERNAL_ERROR, "the sidecar failed to handle this request; see its log"
            )
            response.force_close()
            return response

    async def _linger(self, payload: StreamReader) -> bool:
        """Read the rest of a body the handler left unread: True once it ended in time."""
        if payload.is_eof():
            return True
        # A body writer the proxy cancelled (the upstream answered early) still waits on
        # the body; one turn of the loop lets it go.
        await asyncio.sleep(0)
        try:
            async with asyncio.timeout(_LINGER):
                while not payload.is_eof():
                    await payload.readany()
        except (TimeoutError, HttpProcessingError, web_protocol.RequestPayloadError):
            return False
        return True

    # -- bytes out

    async def send(self, pieces: list[bytes]) -> None:
        """Write, then wait while the client's socket is full."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        if len(pieces) == 1:
            transport.write(pieces[0])
        else:
            transport.write(b"".join(pieces))
        if self._paused:
            await self._drain_helper()

    # -- shutdown, tunnels

    def shutdown(self) -> None:
        """No request after the current one; an idle connection closes now."""
        self._closing = True
        self._stop_idle_timer()
        if self.current is None and self.transport is not None:
            self.transport.close()

    def inside(self, target: str) -> _Protocol:
        """A new connection of this listener, for the requests inside a tunnel to ``target``."""
        inner = _Protocol(self.listener)
        inner.tunnel = target
        return inner

    def hand_over(self) -> None:
        """The socket now carries a tunnel's TLS: let go of it without closing it."""
        self.head_received()
        self.listener.forget(self)
        self.transport = None
        self._closing = True

    def early_bytes(self, request: Request) -> bool:
        """Did the client send bytes after its CONNECT head before the 200?

        llhttp leaves them unparsed (the tail); the pure-Python parser makes
        them the CONNECT's body.
        """
        return bool(self._tail) or bytes_received(request) > 0


class Listener:
    """A route's listening socket and its connections, with ``limits.max_connections``."""

    def __init__(self, handler: Handler, limits: LimitsConfig, shutdown_timeout: float) -> None:
        self.handler, self.limits, self.shutdown_timeout = handler, limits, shutdown_timeout
        self.loop = asyncio.get_running_loop()
        self.port = 0
        self.connections: set[_Protocol] = set()
        self._active: set[_Protocol] = set()
        self._waiting: deque[_Protocol] = deque()
        self._server: asyncio.AbstractServer | None = None

    def __call__(self) -> _Protocol:
        return _Protocol(self)

    async def start(self, host: str, port: int) -> None:
        server = await self.loop.create_server(self, host, port, reuse_address=True, backlog=1024)
        self._server = server
        sockets = getattr(server, "sockets", None) or ()
        self.port = int(sockets[0].getsockname()[1]) if sockets else port

    async def cleanup(self) -> None:
        """Stop accepting; requests in flight get ``shutdown_timeout`` to finish, then are
        cancelled (the handler counts them as 499); every connection closes."""
        if self._server is not None:
            self._server.close()
        for protocol in list(self.connections):
            protocol.shutdown()
        busy = {p.task for p in self.connections if p.task is not None and p.current is not None}
        if busy:
            _, late = await asyncio.wait(busy, timeout=self.shutdown_timeout)
            if late:
                log.warning("cancelling %d request(s) still in flight after %.1fs",
                            len(late), self.shutdown_timeout)  # fmt: skip
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=5)  # a handler gets its 499 recorded
        for protocol in list(self.connections):
            if protocol.task is not None:
                protocol.task.cancel()
            if protocol.transport is not None:
                protocol.transport.close()

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

    def forget(self, protocol: _Protocol) -> None:
        """The connection is gone (or handed over): its slot frees."""
        self.connections.discard(protocol)
        if protocol in self._active:
            self._active.discard(protocol)
            while self._waiting and len(self._active) < self.limits.max_connections:
                nxt = self._waiting.popleft()
                if nxt.transport is not None and not nxt.transport.is_closing():
                    self._active.add(nxt)
                    nxt.admitted()
        elif protocol in self._waiting:
            self._waiting.remove(protocol)


def bound_port(site: web.TCPSite | Listener) -> int:
    """The port a started site or listener listens on (asyncio's and uvloop's servers alike)."""
    if isinstance(site, Listener):
        return site.port
    sockets = getattr(site._server, "sockets", None) or ()  # noqa: SLF001
    return int(sockets[0].getsockname()[1]) if sockets else site._port  # noqa: SLF001


async def start_listener(
    handler: Handler, host: str, port: int, *, limits: LimitsConfig, shutdown_timeout: float
) -> Listener:
    """Serve ``handler`` on HOST:PORT; stop with ``cleanup()``."""
    listener = Listener(handler, limits, shutdown_timeout)
    await listener.start(host, port)
    return listener


# ---- CONNECT tunnels (interception)

_TLS_HANDSHAKE = 0x16  # the first byte of every TLS connection: a handshake record


class Tunnel:
    """The proxy's answer to a CONNECT that interception serves: 200, then TLS.

    `open_tunnel` writes the 200 itself (no Content-Length: RFC 9110 9.3.6).
    """

    status = 200
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())

    def __init__(
        self,
        context: ssl.SSLContext,
        target: str,
        *,
        timeout: float,
        foreign_name: Callable[[object], str | None] = lambda _: None,
    ) -> None:
        self.context = context
        self.target = target
        self.timeout = timeout  # the client's TLS handshake must be done this soon
        self.foreign_name = foreign_name  # the SNI the TLS asked for, if not one we serve


def intercepted(request: Request) -> bool:
    """Did ``request`` arrive inside a CONNECT tunnel (interception)?"""
    return request.protocol.tunnel is not None


async def open_tunnel(request: Request, protocol: _Protocol, tunnel: Tunnel) -> None:
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
        _refuse_plain(request, transport, tunnel.target)
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


def _refuse_plain(request: Request, transport: asyncio.Transport, target: str) -> None:
    """Plain HTTP inside a tunnel: a JSON 400 in plain HTTP, then the connection closes."""
    response = error_response(
        BAD_REQUEST,
        f"the CONNECT tunnel to {target} carries TLS only, and this is not TLS",
        "call the upstream's https:// URLs through https_proxy; for http:// URLs use http_proxy "
        "(no CONNECT)",
    )
    response.force_close()
    log.info("refused plain HTTP inside the CONNECT tunnel to %s", target)
    transport.write(b"".join(_whole(request, response)[0]))
    transport.close()


# ---- for the proxy: the client connection under a request


async def send_continue(request: Request) -> None:
    """Invite the body of an ``Expect: 100-continue`` request (HTTP/1.1 clients only)."""
    if request.version >= HttpVersion11:
        await request.protocol.send([b"HTTP/1.1 100 Continue\r\n\r\n"])


def reset(request: Request) -> None:
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


def bytes_received(request: Request) -> int:
    """How many body bytes the client has sent so far (for the access line)."""
    total: int = request.content.total_bytes
    return total
