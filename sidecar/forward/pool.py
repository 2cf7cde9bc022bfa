"""HTTP/1.1 to the upstream over pooled mTLS connections, without a client session.

aiohttp's `ClientSession` is built for applications: URL joining, cookies,
redirects, auto headers, tracing, request and response objects with many
options. A proxy needs none of that, and on the hot path it cost more CPU than
everything else the sidecar does per request. This module keeps the parts of
aiohttp that are hard to get right — the C response parser with its flow
control and read timeout (`ResponseHandler`), the resolver (with a 10 s
cache) and happy-eyeballs connect, and aiohttp's connection errors, so that
`failures.classify` reads them as before — and adds only what a proxy
needs:

- `ConnectionPool`: keep-alive connections of one identity, most recently used
  first, at most ``limit`` open (callers wait for a slot), idle ones closed
  after ``keepalive`` seconds;
- `ConnectionPool.request`: one request written as the client sent it (the
  head in one write, a streamed body chunked or with the client's
  Content-Length), and the response head read; the body is the caller's to
  read, then `UpstreamResponse.release` returns the connection when it is clean.

aiohttp internals this module relies on
---------------------------------------

This is the one module of the client side that touches aiohttp beyond its
public API, so an aiohttp upgrade is checked here (pyproject.toml caps aiohttp
below the next minor version for that reason; .ci/floors.txt tests the floor):

- ``aiohttp.client_proto.ResponseHandler``, subclassed as `UpstreamConnection`:
  ``__init__(loop)``, ``connection_made``, ``connection_lost``,
  ``data_received``, ``set_exception(exc, cause)``, ``set_response_params``
  (``skip_payload``, ``read_until_eof``, ``auto_decompress``, ``read_timeout``,
  ``read_bufsize``), ``read()`` giving ``(message, payload)`` with
  ``message.code``/``reason``/``headers``, ``start_timeout``,
  ``_drop_timeout``, ``_drain_helper``, ``writing_paused``, ``should_close``,
  ``is_connected``, ``closed`` (a future; since 3.12.5), ``close``, ``abort``
  (since 3.12.11), ``transport``;
- ``aiohttp.client_reqrep.ConnectionKey``: the 7-field key the connector
  errors are built with (`connection_key`);
- the constructors of the client exceptions that `classify` reads:
  ``ClientConnectorError(key, os_error)`` and its DNS/SSL subclasses,
  ``ClientConnectorCertificateError(key, certificate_error)``,
  ``ConnectionTimeoutError``/``ServerTimeoutError(message)``,
  ``ClientConnectionResetError``;
- ``aiohttp.http_exceptions``: the parser's exception classes, re-exported
  here for `failures.classify` (``HttpProcessingError`` and the
  subclasses it tells apart);
- ``aiohttp.streams.StreamReader``: the body stream ``read()`` gives;
- ``aiohttp.resolver.DefaultResolver``: ``resolve(host, port, family)``
  returning dicts with ``host`` and ``port``, and ``close()``;
- ``aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay, interleave,
  loop)``.

Its length (~640 lines) is that rule's price: every private aiohttp use on the
client side stays in this one file, so none hides elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohappyeyeballs
import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_exceptions import BadStatusLine as BadStatusLine
from aiohttp.http_exceptions import ContentEncodingError as ContentEncodingError
from aiohttp.http_exceptions import ContentLengthError as ContentLengthError
from aiohttp.http_exceptions import HttpProcessingError as HttpProcessingError
from aiohttp.http_exceptions import InvalidHeader as InvalidHeader
from aiohttp.http_exceptions import LineTooLong as LineTooLong
from aiohttp.http_exceptions import PayloadEncodingError as PayloadEncodingError
from aiohttp.http_exceptions import TransferEncodingError as TransferEncodingError
from aiohttp.resolver import DefaultResolver
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.http_rules import CONTROL_IN_HEAD

# Methods without a body by definition: no `Content-Length: 0` is added (as aiohttp did).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Replayable on a fresh connection when a reused one turns out closed (RFC 9112 9.3.1).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
READ_BUFSIZE = 2**16
DNS_TTL = 10.0  # seconds a lookup of the upstream's name is reused (as aiohttp's connector)
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before the next address is tried in parallel (RFC 8305)
CLOSE_WAIT = 1.0  # seconds close() waits for the connections' TLS close
_STALE = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientConnectionResetError,
)


class PoolTimeoutError(aiohttp.ConnectionTimeoutError):
    """Every connection of the pool stayed busy for the whole connect timeout."""

    def __init__(self, limit: int, waited: float) -> None:
        super().__init__(f"all {limit} upstream connections were busy for {waited:g}s")
        self.limit, self.waited = limit, waited


class ClosedAfterHandshakeError(aiohttp.ClientConnectionError):
    """A new TLS 1.3 connection ended before any answer, the client not yet accepted.

    A TLS 1.3 server checks the client certificate after the client has finished
    its handshake; many then reset or close the connection, and the alert that
    says why is lost in the race. Until proven otherwise, that is a refusal.
    """


def _raise_if_refused(conn: UpstreamConnection, exc: BaseException) -> None:
    # Not once a byte of an answer came (so never on a reused connection): then the
    # server had taken the certificate, and a reset is a reset.
    if not conn.answered and conn.unconfirmed_tls13():
        raise ClosedAfterHandshakeError(
            "the server closed the connection right after the TLS handshake, before answering"
        ) from exc


class UpstreamConnection(ResponseHandler):
    """One mTLS connection: aiohttp's parser and flow control, plus the pool's bookkeeping."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lost: Callable[[UpstreamConnection], None]):
        super().__init__(loop)
        self._lost = lost
        self.idle_since = 0.0
        self.reused = False
        self.answered = False  # a byte of an answer arrived
        self._ssl_object: ssl.SSLObject | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._ssl_object = transport.get_extra_info("ssl_object")  # kept past the close

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._lost(self)

    def set_exception(self, exc: BaseException, exc_cause: BaseException | None = None) -> None:
        # aiohttp re-raises a parse error as a bare HttpProcessingError and attaches the
        # parser's own one (InvalidHeader, BadStatusLine...) only if a read is waiting:
        # always keep it as the cause, which classify reads instead of the message.
        if exc_cause is None:
            super().set_exception(exc)
            return
        if exc.__cause__ is None:
            exc.__cause__ = exc_cause
        super().set_exception(exc, exc_cause)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        super().data_received(data)

    def unconfirmed_tls13(self) -> bool:
        """A full TLS 1.3 handshake after which the server has not yet accepted us.

        The client finishes a TLS 1.3 handshake before the server has checked its
        certificate; the server sends its session tickets only once it has (OpenSSL,
        Go, nginx do), so a ticket is the proof that the certificate was accepted.
        """
        ssl_object = self._ssl_object
        if ssl_object is None or ssl_object.version() != "TLSv1.3" or ssl_object.session_reused:
            return False
        try:
            session = ssl_object.session
        except (ValueError, ssl.SSLError):
            session = None
        return session is None or not session.has_ticket

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        transport.write(data)

    async def drain(self) -> None:
        await self._drain_helper()

    def idle(self) -> None:
        """Between requests no read timer runs (a body writer may have armed one late)."""
        self._drop_timeout()


class UpstreamResponse:
    """The response head; the body streams from ``content``. Call `release` when done."""

    __slots__ = ("status", "reason", "headers", "content", "content_length",
                 "_conn", "_pool", "_writer")  # fmt: skip

    def __init__(
        self,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        conn: UpstreamConnection,
        pool: ConnectionPool,
        writer: asyncio.Task[bool] | None,
    ) -> None:
        self.status, self.reason, self.headers, self.content = status, reason, headers, content
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        self._conn: UpstreamConnection | None = conn
        self._pool = pool
        self._writer = writer

    @property
    def closed(self) -> asyncio.Future[None] | None:
        """The future that tells how the connection ended (a reset, or a clean close)."""
        return None if self._conn is None else self._conn.closed

    async def read(self) -> bytes:
        return await self.content.read()

    async def read_at_most(self, limit: int) -> bytes:
        """The body's first ``limit`` bytes (all of it if shorter); the rest is not read."""
        data = b""
        while len(data) < limit:
            chunk = await self.content.read(limit - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def release(self) -> None:
        """Back to the pool if the exchange ended cleanly; else the connection is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        writer = self._writer
        clean = writer is None or (writer.done() and not writer.cancelled() and writer.result())
        if writer is not None and not writer.done():
            writer.cancel()  # the upstream answered before it read the whole body
        # After a 101 the connection speaks another protocol (aiohttp's pure-Python
        # parser does not mark it closing as llhttp does).
        reusable = clean and not conn.should_close and self.status != 101
        self._pool.release(conn, reusable=reusable)


class _InUse:
    """The context of `ConnectionPool.in_use` (a class: no allocation per request)."""

    __slots__ = ("_pool",)

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def __enter__(self) -> None:
        self._pool._users += 1

    def __exit__(self, *exc_info: object) -> None:
        self._pool._users -= 1


class ConnectionPool:
    """Keep-alive mTLS connections to one upstream, presenting one identity."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None,
        connect_timeout: float | None,
        read_timeout: float | None,
        limit: int,
        keepalive: float,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._host, self._port, self._ssl = host, port, ssl_context
        self._server_hostname = (server_hostname or host).rstrip(".")  # an FQDN's root dot
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._limit, self._keepalive = limit, keepalive
        self._host_header = host if port == 443 else f"{host}:{port}"
        if ":" in host:  # an IPv6 literal
            self._host_header = f"[{host}]" if port == 443 else f"[{host}]:{port}"
        self._resolver = DefaultResolver()  # the one aiohttp's connector uses
        self._dns: tuple[float, list[Any]] | None = None  # (valid until, addresses)
        self._dns_lock = asyncio.Lock()
        self._key = connection_key(host, port, ssl_context)
        self._idle: list[UpstreamConnection] = []  # most recently used last
        self._busy: set[UpstreamConnection] = set()
        self._connecting = 0
        self._users = 0  # callers inside in_use()
        self._in_use = _InUse(self)  # no per-use state: one serves every request
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    # ---------------------------------------------------------------- requests

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request; return when the response head has arrived."""
        head = self._head(method, target, headers, body is not None)
        chunked = body is not None and "Content-Length" not in headers
        conn = await self._acquire()
        try:
            return await self._exchange(conn, method, head, body, chunked)
        except _STALE as exc:
            self.release(conn, reusable=False)
            _raise_if_refused(conn, exc)
            # A kept-alive connection the upstream closed just before our request is
            # sent again once, on a new connection, if that cannot repeat a side effect
            # (RFC 9112 9.3.1); the other idle ones may be stale too.
            if not (conn.reused and body is None and method in _IDEMPOTENT):
                raise
        except BaseException:
            self.release(conn, reusable=False)
            raise
        conn = await self._acquire(fresh=True)
        try:
            return await self._exchange(conn, method, head, body, chunked)
        except _STALE as exc:
            self.release(conn, reusable=False)
            _raise_if_refused(conn, exc)
            raise
        except BaseException:
            self.release(conn, reusable=False)
            raise

    async def _exchange(
        self,
        conn: UpstreamConnection,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> UpstreamResponse:
        conn.set_response_params(
            skip_payload=method == "HEAD",
            read_until_eof=True,  # a body without length or chunks ends with the connection
            auto_decompress=False,  # a proxy passes bytes through
            read_timeout=self._read_timeout,
            read_bufsize=READ_BUFSIZE,
        )
        writer: asyncio.Task[bool] | None = None
        conn.send(head)
        if body is None:
            conn.start_timeout()
        else:
            # The body streams while the response is awaited: an upstream may answer early.
            writer = self._loop.create_task(_send_body(conn, body, chunked, self._read_timeout))
        try:
            while True:
                message, payload = await conn.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    break  # 1xx interim answers are not relayed (Expect is ours)
                if writer is None or writer.done():  # else the writer starts it at the end
                    conn.start_timeout()  # the parser stopped it at the interim answer's end
        except BaseException:
            if writer is not None:
                writer.cancel()
            raise
        return UpstreamResponse(
            message.code, message.reason, message.headers, payload, conn, self, writer
        )

    def _head(self, method: str, target: str, headers: CIMultiDict[str], has_body: bool) -> bytes:
        host = self._host_header
        if "Host" in headers:  # a route may set its own
            headers = headers.copy()
            host = headers.popall("Host")[-1]
        lines = [f"{method} {target} HTTP/1.1\r\n", f"Host: {host}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if has_body:
            if "Content-Length" not in headers:
                lines.append("Transfer-Encoding: chunked\r\n")
        elif method not in _NO_BODY_METHODS and "Content-Length" not in headers:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        if (
            text.count("\n") != len(lines)
            or text.count("\r") != len(lines)
            or CONTROL_IN_HEAD.search(text) is not None
        ):
            # The parser and the config checks keep these out; this keeps a request single.
            raise ValueError("a header name or value holds a line break or control character")
        return text.encode("utf-8")

    # ---------------------------------------------------------------- the pool

    async def _acquire(self, fresh: bool = False) -> UpstreamConnection:
        """A connection: an idle one, a new one, or the next free one (waited for).

        The wait for a free slot and the connect share one deadline, timeouts.connect.
        """
        timeout = self._connect_timeout
        deadline = None if timeout is None else self._loop.time() + timeout
        requeued = False
        while True:
            if self.closed:
                raise aiohttp.ClientConnectionError("the connection pool is closed")
            now = time.monotonic()
            while self._idle and not fresh:
                conn = self._idle.pop()
                if (
                    conn.is_connected()
                    and not conn.should_close  # e.g. bytes the upstream sent unasked
                    and now - conn.idle_since < self._keepalive
                ):
                    conn.reused = True
                    self._busy.add(conn)
                    return conn
                conn.close()
            if len(self._busy) + self._connecting + (len(self._idle) if fresh else 0) < self._limit:
                break
            if fresh and self._idle:
                self._idle.pop(0).close()  # the oldest idle one makes room
                continue
            waiter = self._loop.create_future()
            if requeued:  # woken, but a newcomer took the slot: first in line again
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            requeued = True
            try:
                async with asyncio.timeout_at(deadline):
                    try:
                        await waiter  # _wake() pops it first: no search in a long queue
                    except asyncio.CancelledError:
                        if waiter.done() and not waiter.cancelled():
                            self._wake()  # woken, then cancelled: the turn passes on
                        else:
                            with contextlib.suppress(ValueError):
                                self._waiters.remove(waiter)
                        raise
            except TimeoutError:
                raise PoolTimeoutError(self._limit, timeout or 0.0) from None
        self._connecting += 1
        try:
            conn = await self._connect(deadline)
        except BaseException:
            self._wake()  # the slot is free again
            raise
        finally:
            self._connecting -= 1
        self._busy.add(conn)
        return conn

    async def _connect(self, deadline: float | None) -> UpstreamConnection:
        try:
            async with asyncio.timeout_at(deadline):
                infos = await self._addresses()
                try:
                    sock = await aiohappyeyeballs.start_connection(
                        infos,
                        happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                        interleave=1,
                        loop=self._loop,
                    )
                    try:
                        _, conn = await self._loop.create_connection(
                            lambda: UpstreamConnection(self._loop, self._lost),
                            sock=sock,
                            ssl=self._ssl,
                            server_hostname=self._server_hostname,
                        )
                    except BaseException:
                        sock.close()
                        if sock.fileno() != -1:
                            # uvloop closed the descriptor through libuv but still holds a
                            # reference on the socket object, which would close that
                            # number again (by then perhaps another connection's) when
                            # collected: let go of it.
                            sock.detach()
                        raise
                except ssl.SSLCertVerificationError as exc:
                    raise aiohttp.ClientConnectorCertificateError(self._key, exc) from exc
                except ssl.SSLError as exc:
                    raise aiohttp.ClientConnectorSSLError(self._key, exc) from exc
                except OSError as exc:
                    if exc.errno is None and isinstance(exc, TimeoutError):
                        raise
                    raise aiohttp.ClientConnectorError(self._key, exc) from exc
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(
                f"Connection timeout to host https://{self._host_header}"
            ) from exc
        return conn

    async def _addresses(self) -> list[Any]:
        """The upstream's addresses: looked up at most every ``DNS_TTL`` s, one lookup at once."""
        async with self._dns_lock:
            if self._dns is None or time.monotonic() >= self._dns[0]:
                try:
                    hosts = await self._resolver.resolve(
                        self._host, self._port, family=socket.AF_UNSPEC
                    )
                except OSError as exc:
                    raise aiohttp.ClientConnectorDNSError(self._key, exc) from exc
                infos = [_addr_info(h["host"], h["port"]) for h in hosts]
                self._dns = (time.monotonic() + DNS_TTL, infos)
            return self._dns[1]

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        self._busy.discard(conn)
        if reusable and not self.closed and conn.is_connected():
            conn.idle()
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
            if self._sweeper is None:
                self._sweeper = self._loop.call_later(self._keepalive, self._sweep)
        else:
            conn.abort()
        self._wake()

    def _lost(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle longer than ``keepalive``; run again while any are idle."""
        self._sweeper = None
        deadline = time.monotonic() - self._keepalive
        stale = [c for c in self._idle if c.idle_since <= deadline]
        for conn in stale:
            self._idle.remove(conn)
            conn.close()
        if self._idle:
            oldest = min(c.idle_since for c in self._idle)
            self._sweeper = self._loop.call_at(
                self._loop.time() + max(0.0, oldest - deadline), self._sweep
            )

    def in_use(self) -> _InUse:
        """``with pool.in_use():`` counts a caller as busy until it holds a connection."""
        return self._in_use

    @property
    def busy(self) -> bool:
        return bool(self._busy) or self._connecting > 0 or self._users > 0

    def open_connections(self) -> int:
        return len(self._busy) + len(self._idle)

    async def close(self) -> None:
        """Close every connection; requests still running lose theirs."""
        if not self.closed:
            await self._resolver.close()  # aiodns's holds a channel
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        ending = [f for f in (c.closed for c in (*self._idle, *self._busy)) if f is not None]
        for conn in self._idle:
            conn.close()
        for conn in self._busy:
            conn.abort()
        self._idle.clear()
        self._busy.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it finds the pool closed
        if ending:
            # A TLS close is a short exchange: let it finish before the loop may end.
            for future in ending:
                future.add_done_callback(_retrieve)
            await asyncio.wait(ending, timeout=CLOSE_WAIT)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a reset while closing is no news


async def _send_body(
    conn: UpstreamConnection, body: AsyncIterator[bytes], chunked: bool, stall: float | None
) -> bool:
    """Stream the request body with the transport's back-pressure; False if it failed.

    An upstream that stops reading for ``stall`` seconds (timeouts.read) ends the upload.
    """
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                conn.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            else:
                conn.send(chunk)
            if conn.writing_paused:
                async with asyncio.timeout(stall):
                    await conn.drain()
        if chunked:
            conn.send(b"0\r\n\r\n")
        conn.start_timeout()
    except aiohttp.ClientConnectionResetError:
        return False  # the connection is going: its loss tells the reader why (a TLS alert)
    except TimeoutError:
        conn.set_exception(
            aiohttp.ServerTimeoutError(f"the upstream stopped reading the body for {stall:g}s")
        )
        return False
    except (OSError, aiohttp.ClientError) as exc:
        conn.set_exception(exc)  # the response read raises it; the connection is not reused
        return False
    except Exception as exc:
        # E.g. the client's malformed body: a failed upstream exchange, not a sidecar bug.
        failed = aiohttp.ClientConnectionError(f"the request body could not be read: {exc}")
        failed.__cause__ = exc
        conn.set_exception(failed)
        return False
    return True


def connection_key(
    host: str, port: int, ssl_context: ssl.SSLContext | bool = True
) -> ConnectionKey:
    """The key aiohttp's connector errors name a connection by (``host``, ``port``, TLS)."""
    return ConnectionKey(host, port, True, ssl_context, None, None, None)


def _addr_info(host: str, port: int) -> Any:
    if ":" in host:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))
