"""sidecar.forward.pool: the request head, bodies, the pool and its errors, over real mTLS.

Most tests talk to `HTTPServer`, a blocking keep-alive HTTP/1.1 server on a
TLS socket (tests.support.tls_servers) that records the raw bytes of every request
head and body, counts the connections it accepts and how many are open at
once, and answers by path (``/slow``, ``/drop``, ``/partial``, ``/eof``,
``/hints``, ``/close-after``, anything else ``200 ok``). Where a real HTTP server is the
better judge (a chunked upload, keep-alive), the aiohttp `FakeUpstream` runs
behind the ``tls_upstream`` fixture. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.config import parse_upstream
from sidecar.credentials.identity import client_ssl_context, read_bundle
from sidecar.credentials.sources import Loaded
from sidecar.errors import ConfigError
from sidecar.forward import pool as upstream_http
from sidecar.forward.failures import classify
from sidecar.forward.pool import ConnectionPool, UpstreamResponse
from sidecar.forward.upstream import RETIRE_POLL, UpstreamClient, route_target
from sidecar.tasks import TaskGroup
from tests.conftest import PKI, eventually, free_port, route_config
from tests.support.tls_servers import IO_TIMEOUT, TLSServer, server_context
from tests.support.upstreams import FakeUpstream, pattern_chunks, pattern_sha256

SLOW = 0.15  # seconds /slow waits before it answers
PARTIAL_LENGTH = 1000  # the Content-Length /partial announces (it sends 10 bytes of it)


# ------------------------------------------------------------ a raw keep-alive upstream


class HTTPServer(TLSServer):
    """A blocking HTTP/1.1 upstream over TLS that keeps connections alive.

    ``requests`` gets each request head (without the blank line), ``wire`` the
    body bytes as they came over the wire and ``bodies`` the decoded bodies.
    ``active``/``max_active`` count connections past the handshake that are
    still open; ``ended`` those whose handler returned. ``/close-after``
    answers with keep-alive, waits for ``close_now``, closes the connection
    without a word and counts it in ``dropped``.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context, self._handle)
        self.wire: list[bytes] = []
        self.bodies: list[bytes] = []
        self.active = 0
        self.max_active = 0
        self.ended = 0
        self.close_now = threading.Event()
        self.dropped = 0

    def _handle(self, _server: TLSServer, conn: ssl.SSLSocket) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self._serve_requests(conn)
        except OSError:
            pass  # the client reset or aborted the connection: it ends here
        finally:
            with self._lock:
                self.active -= 1
                self.ended += 1

    def _serve_requests(self, conn: ssl.SSLSocket) -> None:
        buffer = _Buffer(conn)
        while True:
            head = buffer.until(b"\r\n\r\n")
            if head is None:
                return  # the client closed between requests
            head = head[:-4]
            self.requests.append(head)
            if head.split(b" ", 2)[1] == b"/no-read":  # takes the head, never the body
                self.close_now.wait(IO_TIMEOUT)
                return
            wire, body = _read_body(buffer, head)
            self.wire.append(wire)
            self.bodies.append(body)
            method, target = head.split(b" ", 2)[:2]
            path = target.partition(b"?")[0]
            if path == b"/slow":
                time.sleep(SLOW)
            if path == b"/drop":  # the request kills the connection: no answer
                conn.shutdown(socket.SHUT_RDWR)
                return
            if path == b"/partial":
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % PARTIAL_LENGTH
                    + b"0123456789"
                )
                while conn.recv(65536):  # until the client closes or resets
                    pass
                return
            if path == b"/eof":
                # Neither Content-Length nor chunked: the body ends with the connection.
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                for i in range(5):
                    conn.sendall(b"close-delimited part %d\n" % i)
                if b"fin" in target:
                    conn.shutdown(socket.SHUT_RDWR)  # no close_notify, as many servers do
                else:
                    conn.unwrap()  # close_notify, then the TCP close in _serve
                return
            if path == b"/hints-stall":  # an interim answer, then nothing
                conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
                while conn.recv(65536):  # until the client gives up
                    pass
                return
            if path == b"/hints":
                conn.sendall(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload\r\n\r\n"
                )
                time.sleep(0.02)  # the final answer comes in a later read
                _answer(conn, method, b"final", extra=b"X-Final: yes\r\n")
                continue
            _answer(conn, method, b"ok")
            if path == b"/close-after":
                # An idle keep-alive connection the server drops: the client notices late.
                self.close_now.wait(IO_TIMEOUT)
                conn.shutdown(socket.SHUT_RDWR)
                with self._lock:
                    self.dropped += 1
                return


class _Buffer:
    """Reads a socket in pieces; hands back exact byte counts or up to a marker."""

    def __init__(self, conn: ssl.SSLSocket) -> None:
        self.conn = conn
        self.data = b""

    def _more(self) -> bool:
        chunk = self.conn.recv(65536)
        self.data += chunk
        return bool(chunk)

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.data:
            if not self._more():
                if self.data:
                    raise ConnectionError(f"closed inside a request: {self.data!r}")
                return None
        end = self.data.index(marker) + len(marker)
        found, self.data = self.data[:end], self.data[end:]
        return found

    def exactly(self, n: int) -> bytes:
        while len(self.data) < n:
            if not self._more():
                raise ConnectionError("closed inside a request body")
        found, self.data = self.data[:n], self.data[n:]
        return found


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def _read_body(buffer: _Buffer, head: bytes) -> tuple[bytes, bytes]:
    """The request body: (bytes on the wire, decoded body)."""
    length = _header(head, b"Content-Length")
    if length is not None:
        body = buffer.exactly(int(length))
        return body, body
    if (_header(head, b"Transfer-Encoding") or b"").lower() == b"chunked":
        wire, body = b"", b""
        while True:
            size_line = buffer.until(b"\r\n")
            assert size_line is not None
            size = int(size_line.strip(), 16)
            chunk = buffer.exactly(size + 2)
            wire += size_line + chunk
            body += chunk[:-2]
            if size == 0:
                return wire, body
    return b"", b""


def _answer(conn: ssl.SSLSocket, method: bytes, body: bytes, extra: bytes = b"") -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra)
    conn.sendall(head if method == b"HEAD" else head + body)


async def stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
        await asyncio.sleep(0)


async def exchange(
    pool: ConnectionPool,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: AsyncIterator[bytes] | None = None,
) -> tuple[int, bytes]:
    """Send one request, read the whole answer, release the connection."""
    response = await pool.request(method, target, headers, body)
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def get(pool: ConnectionPool, target: str = "/") -> tuple[int, bytes]:
    return await exchange(pool, "GET", target, CIMultiDict())


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def client_context(bundle_file: Path, ca_file: Path) -> ssl.SSLContext:
    return client_ssl_context(read_bundle(pem=bundle_file).identity(), ca_file=ca_file)


@pytest.fixture
def server(pki: PKI) -> Iterator[HTTPServer]:
    with HTTPServer(server_context(pki)) as upstream:
        yield upstream


PoolFactory = Callable[..., ConnectionPool]


@pytest.fixture
async def make_pool(
    client_context: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[PoolFactory]:
    """ConnectionPool(127.0.0.1, port) with short test timeouts; closed afterwards.

    `ConnectionPool.close` starts the TLS shutdown of each connection and returns;
    the teardown waits until every connection the pools opened has really ended,
    so that no transport outlives the test's event loop (a ResourceWarning later).
    """
    pools: list[ConnectionPool] = []
    ended: list[asyncio.Future[None]] = []

    class Tracked(upstream_http.UpstreamConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # past the TLS handshake
            closed = self.closed  # created now: it resolves when the connection ends
            assert closed is not None
            ended.append(closed)

    monkeypatch.setattr(upstream_http, "UpstreamConnection", Tracked)

    def make(port: int, **overrides: Any) -> ConnectionPool:
        options: dict[str, Any] = {
            "server_hostname": None,
            "connect_timeout": 5.0,
            "read_timeout": 5.0,
            "limit": 10,
            "keepalive": 30.0,
        }
        options.update(overrides)
        ssl_context = options.pop("ssl_context", client_context)
        pool = ConnectionPool("127.0.0.1", port, ssl_context, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()
    if ended:
        await asyncio.wait_for(asyncio.gather(*ended, return_exceptions=True), IO_TIMEOUT)


# ------------------------------------------------------------------ the request head


async def test_get_head_is_exactly_what_we_asked_for(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    target = "/odata/v2/User?$filter=userId%20eq%20'a+b'&$top=1&p=%2F&p=%2f&empty=&;x=1"
    headers = CIMultiDict([("X-Trace", "a  b"), ("accept", "*/*"), ("X-Dup", "1"), ("X-Dup", "2")])
    assert await exchange(pool, "GET", target, headers) == (200, b"ok")
    assert server.requests == [
        f"GET {target} HTTP/1.1\r\n".encode()
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"X-Trace: a  b\r\naccept: */*\r\nX-Dup: 1\r\nX-Dup: 2"
    ]
    assert server.wire == [b""]


async def test_a_route_host_header_overrides_the_pool_host(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    headers = CIMultiDict([("X-A", "1"), ("host", "api.example.com"), ("X-B", "2")])
    assert await exchange(pool, "GET", "/x", headers) == (200, b"ok")
    assert server.requests == [b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nX-A: 1\r\nX-B: 2"]


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 8443, "127.0.0.1:8443"),
        ("api.example.com", 443, "api.example.com"),
        ("::1", 8443, "[::1]:8443"),
        ("::1", 443, "[::1]"),
    ],
)
async def test_host_header_forms(
    host: str, port: int, expected: str, client_context: ssl.SSLContext
) -> None:
    """No connection needed: the head is built before one is taken."""
    pool = ConnectionPool(
        host,
        port,
        client_context,
        server_hostname=None,
        connect_timeout=1,
        read_timeout=1,
        limit=1,
        keepalive=1,
    )
    head = pool._head("GET", "/", CIMultiDict(), False)
    assert head == f"GET / HTTP/1.1\r\nHost: {expected}\r\n\r\n".encode()


async def test_content_length_zero_only_for_methods_that_may_carry_a_body(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    methods = ["GET", "HEAD", "OPTIONS", "TRACE", "POST", "DELETE", "PUT", "PATCH"]
    for method in methods:
        status, body = await exchange(pool, method, "/m", CIMultiDict())
        assert (status, body) == (200, b"" if method == "HEAD" else b"ok")
    heads = dict(zip(methods, server.requests, strict=True))
    for method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        assert heads[method] == f"{method} /m HTTP/1.1\r\nHost: 127.0.0.1:{server.port}".encode()
    for method in ("POST", "DELETE", "PUT", "PATCH"):
        assert heads[method] == (
            f"{method} /m HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: 0".encode()
        )
    assert server.connections == 1  # HEAD's bodiless answer left the connection reusable


async def test_a_client_content_length_is_not_doubled(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    assert await exchange(pool, "POST", "/", CIMultiDict({"content-length": "0"})) == (200, b"ok")
    assert server.requests == [
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\ncontent-length: 0" % server.port
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Evil", "a\r\nX-Injected: 1"),
        ("X-Evil", "a\nb"),
        ("X-Evil", "a\rb"),
        ("X-Evil", "trailing\r\n"),
        ("Host", "api.example.com\r\nX-Injected: 1"),
        ("X-Evil\r\nX-Injected", "1"),
    ],
)
async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent(
    server: HTTPServer, make_pool: PoolFactory, name: str, value: str
) -> None:
    pool = make_pool(server.port)
    with pytest.raises(ValueError, match="line break"):
        await pool.request("GET", "/", CIMultiDict([("X-Ok", "1"), (name, value)]), None)
    assert pool.open_connections() == 0
    assert not pool.busy
    assert await get(pool) == (200, b"ok")  # the pool is fine afterwards
    assert server.connections == 1
    assert server.requests == [b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d" % server.port]


# ------------------------------------------------------------------ request bodies


BODY_CHUNKS = [b"first,", b"", b"second,", b"x" * 70_000, b"", b"last"]
BODY = b"".join(BODY_CHUNKS)


async def test_a_streamed_body_without_length_goes_chunked(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    status, _ = await exchange(
        pool, "POST", "/upload", CIMultiDict({"Content-Type": "x/y"}), stream(BODY_CHUNKS)
    )
    assert status == 200
    assert server.requests == [
        b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: x/y\r\n"
        b"Transfer-Encoding: chunked" % server.port
    ]
    # An empty chunk from the iterator must not end the body early (a 0-size chunk would).
    expected_wire = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in BODY_CHUNKS if c)
    assert server.wire == [expected_wire + b"0\r\n\r\n"]
    assert hashlib.sha256(server.bodies[0]).digest() == hashlib.sha256(BODY).digest()
    assert await get(pool) == (200, b"ok")  # the exchange ended cleanly: kept alive
    assert server.connections == 1


async def test_a_streamed_body_with_content_length_goes_raw(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    headers = CIMultiDict({"Content-Length": str(len(BODY))})
    assert await exchange(pool, "PUT", "/upload", headers, stream(BODY_CHUNKS)) == (200, b"ok")
    assert server.requests == [
        b"PUT /upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d"
        % (server.port, len(BODY))
    ]
    assert server.wire == [BODY]
    assert await get(pool) == (200, b"ok")
    assert server.connections == 1


@pytest.mark.parametrize("with_length", [False, True], ids=["chunked", "content-length"])
async def test_an_upload_arrives_intact_at_an_aiohttp_server(
    tls_upstream: Callable[..., Awaitable[str]], make_pool: PoolFactory, with_length: bool
) -> None:
    n = 1_000_003
    fake = FakeUpstream()
    port = urlsplit(await tls_upstream(fake.app())).port
    pool = make_pool(port)
    headers = CIMultiDict({"Content-Length": str(n)} if with_length else {})
    response = await pool.request("POST", "/upload", headers, stream(pattern_chunks(n, 40_000)))
    try:
        assert response.status == 200
        answer = await response.read()
    finally:
        response.release()
    seen = json.loads(answer)
    assert seen["sha256"] == pattern_sha256(n)
    assert seen["length"] == n
    if with_length:
        assert (seen["content_length"], seen["transfer_encoding"]) == (str(n), None)
    else:
        assert (seen["content_length"], seen["transfer_encoding"]) == (None, "chunked")


# ------------------------------------------------------------------ keep-alive


async def test_sequential_requests_share_one_connection(
    tls_upstream: Callable[..., Awaitable[str]], make_pool: PoolFactory
) -> None:
    fake = FakeUpstream(keep_alive=True)
    port = urlsplit(await tls_upstream(fake.app())).port
    pool = make_pool(port)
    for i in range(20):
        status, _ = await get(pool, f"/echo/{i}")
        assert status == 200
    assert fake.requests == 20
    assert len(fake.connections) == 1
    assert pool.open_connections() == 1
    assert not pool.busy


async def test_a_response_released_unread_closes_its_connection(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    response = await pool.request("GET", "/partial", CIMultiDict(), None)
    assert (response.status, response.content_length) == (200, PARTIAL_LENGTH)
    assert pool.busy
    closed = response.closed
    assert closed is not None and not closed.done()
    response.release()
    assert pool.open_connections() == 0
    assert not pool.busy
    await asyncio.wait_for(closed, 1)
    await eventually(lambda: server.ended == 1, within=1.0, what="server.ended == 1", every=0.01)
    assert await get(pool) == (200, b"ok")
    assert server.connections == 2
    response.release()  # twice is harmless


@pytest.mark.parametrize("target", ["/status/204", "/status/304", "/bytes/0", "/cookies"])
async def test_bodiless_and_empty_answers_keep_the_connection(
    tls_upstream: Callable[..., Awaitable[str]], make_pool: PoolFactory, target: str
) -> None:
    fake = FakeUpstream(keep_alive=True)
    port = urlsplit(await tls_upstream(fake.app())).port
    pool = make_pool(port)
    for _ in range(3):
        await get(pool, target)
    assert len(fake.connections) == 1
    assert pool.open_connections() == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_large_answer_streams_intact_and_keeps_the_connection(
    tls_upstream: Callable[..., Awaitable[str]], make_pool: PoolFactory, chunked: bool
) -> None:
    n = 2_000_001
    fake = FakeUpstream(keep_alive=True)
    port = urlsplit(await tls_upstream(fake.app())).port
    pool = make_pool(port)
    response = await pool.request(
        "GET", f"/bytes/{n}" + ("?chunked=1" if chunked else ""), CIMultiDict(), None
    )
    assert response.content_length == (None if chunked else n)
    digest = hashlib.sha256()
    length = 0
    async for chunk in response.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    response.release()
    assert (length, digest.hexdigest()) == (n, pattern_sha256(n))
    assert (await get(pool, "/echo"))[0] == 200
    assert len(fake.connections) == 1


async def test_an_exchange_with_connection_close_is_not_reused(
    tls_upstream: Callable[..., Awaitable[str]], make_pool: PoolFactory
) -> None:
    fake = FakeUpstream(keep_alive=False)
    port = urlsplit(await tls_upstream(fake.app())).port
    pool = make_pool(port)
    for _ in range(3):
        assert (await get(pool))[0] == 200
    assert len(fake.connections) == 3
    assert pool.open_connections() == 0


async def test_the_limit_bounds_open_connections_and_waiters_get_their_turn(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port, limit=2)
    peak = 0

    async def one(i: int) -> tuple[int, bytes]:
        nonlocal peak
        response = await pool.request("GET", f"/slow?i={i}", CIMultiDict(), None)
        peak = max(peak, pool.open_connections())
        try:
            return response.status, await response.read()
        finally:
            response.release()

    results = await asyncio.gather(*(one(i) for i in range(5)))
    assert results == [(200, b"ok")] * 5
    assert len(server.requests) == 5
    assert server.connections == 2
    assert server.max_active <= 2
    assert peak <= 2
    assert pool.open_connections() == 2


async def test_idle_connections_are_swept_after_keepalive(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port, keepalive=0.2)
    assert await get(pool) == (200, b"ok")
    assert pool.open_connections() == 1
    await eventually(
        lambda: pool.open_connections() == 0,
        within=1.0,
        what="pool.open_connections() == 0",
        every=0.01,
    )
    await eventually(
        lambda: server.ended == 1, within=1.0, what="server.ended == 1", every=0.01
    )  # closed at the server too
    assert await get(pool) == (200, b"ok")  # and a new one opens
    assert server.connections == 2


# ------------------------------------------------------------------ a stale connection


async def _with_a_connection_the_server_dropped(server: HTTPServer, pool: ConnectionPool) -> None:
    """One exchange kept alive; then the server closes it while the loop does not run."""
    assert await get(pool, "/close-after") == (200, b"ok")
    assert pool.open_connections() == server.connections == 1
    server.close_now.set()
    # Block the loop on purpose: the pool must not see the close before the next request.
    deadline = time.monotonic() + IO_TIMEOUT
    while not server.dropped:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)  # the FIN reaches our socket (loopback)


def _count_attempts(
    server: HTTPServer, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Each exchange the pool tries, as the number of connections the server had accepted."""
    attempts: list[int] = []
    original = pool._exchange

    async def counted(*args: Any) -> UpstreamResponse:
        attempts.append(server.connections)
        return await original(*args)

    monkeypatch.setattr(pool, "_exchange", counted)
    return attempts


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE"])
async def test_an_idempotent_bodiless_request_is_retried_on_a_new_connection(
    server: HTTPServer, make_pool: PoolFactory, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool(server.port)
    await _with_a_connection_the_server_dropped(server, pool)
    attempts = _count_attempts(server, pool, monkeypatch)
    status, _ = await exchange(pool, method, "/again", CIMultiDict())
    assert status == 200
    assert attempts == [1, 2]  # first on the dropped connection, then on a new one
    assert server.connections == 2
    assert server.requests[-1].startswith(f"{method} /again HTTP/1.1\r\n".encode())
    assert pool.open_connections() == 1


@pytest.mark.parametrize(
    ("method", "body"),
    [("POST", [b"payload"]), ("PUT", [b"payload"]), ("POST", None), ("PATCH", None)],
)
async def test_a_request_that_may_not_be_repeated_fails_on_a_dropped_connection(
    server: HTTPServer, make_pool: PoolFactory, method: str, body: list[bytes] | None
) -> None:
    pool = make_pool(server.port)
    await _with_a_connection_the_server_dropped(server, pool)
    with pytest.raises(aiohttp.ClientError) as caught:
        await pool.request(method, "/again", CIMultiDict(), None if body is None else stream(body))
    assert isinstance(caught.value, aiohttp.ClientConnectionError), repr(caught.value)
    assert classify(caught.value, upstream="u").code == "upstream_connect_failed"
    assert server.connections == 1  # not sent again
    assert pool.open_connections() == 0
    assert not pool.busy
    assert await get(pool) == (200, b"ok")  # the pool recovers


async def test_a_request_is_retried_once_only(server: HTTPServer, make_pool: PoolFactory) -> None:
    """An upstream that drops the connection on every GET /drop, with 3 idle connections."""
    pool = make_pool(server.port)
    answers = await asyncio.gather(*(get(pool, "/slow") for _ in range(3)))
    assert answers == [(200, b"ok")] * 3
    assert pool.open_connections() == server.connections == 3
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await get(pool, "/drop")
    sent = [head for head in server.requests if head.startswith(b"GET /drop ")]
    assert len(sent) <= 2, f"one GET reached the upstream {len(sent)} times"


# ------------------------------------------------------------------ response framing


@pytest.mark.parametrize("target", ["/eof", "/eof?fin"], ids=["close_notify", "tcp-fin"])
async def test_a_close_delimited_body_is_read_to_eof(
    server: HTTPServer, make_pool: PoolFactory, target: str
) -> None:
    pool = make_pool(server.port)
    response = await pool.request("GET", target, CIMultiDict(), None)
    assert response.status == 200
    assert response.content_length is None
    assert "Transfer-Encoding" not in response.headers
    body = await response.read()
    response.release()
    assert body == b"".join(b"close-delimited part %d\n" % i for i in range(5))
    assert pool.open_connections() == 0  # such a connection cannot be reused
    assert await get(pool) == (200, b"ok")
    assert server.connections == 2


async def test_interim_1xx_answers_are_skipped(server: HTTPServer, make_pool: PoolFactory) -> None:
    pool = make_pool(server.port)
    response: UpstreamResponse = await pool.request("GET", "/hints", CIMultiDict(), None)
    assert (response.status, response.reason) == (200, "OK")
    assert response.headers.get("X-Final") == "yes"
    assert "Link" not in response.headers
    assert await response.read() == b"final"
    response.release()
    assert await get(pool) == (200, b"ok")  # the connection stayed in step
    assert server.connections == 1


async def test_a_read_timeout_is_classified_and_the_connection_dropped(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port, read_timeout=0.05)
    with pytest.raises(aiohttp.ServerTimeoutError) as caught:
        await pool.request("GET", "/slow", CIMultiDict(), None)
    assert classify(caught.value, upstream="u").kind == "timeout"
    assert pool.open_connections() == 0
    assert len(server.requests) == 1  # a timed-out GET is not sent again


async def test_a_cancelled_request_drops_its_connection(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    task = asyncio.get_running_loop().create_task(get(pool, "/slow"))
    await eventually(
        lambda: len(server.requests) == 1, within=1.0, what="len(server.requests) == 1", every=0.01
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.open_connections() == 0 and not pool.busy
    await eventually(lambda: server.ended == 1, within=1.0, what="server.ended == 1", every=0.01)
    assert await get(pool) == (200, b"ok")
    assert server.connections == 2


# ------------------------------------------------------------------ close


async def test_close_closes_idle_connections_and_refuses_new_requests(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port)
    assert await get(pool) == (200, b"ok")
    assert pool.open_connections() == 1
    await pool.close()
    assert pool.closed is True
    assert pool.open_connections() == 0
    await eventually(lambda: server.ended == 1, within=1.0, what="server.ended == 1", every=0.01)
    with pytest.raises(aiohttp.ClientConnectionError):
        await pool.request("GET", "/", CIMultiDict(), None)
    assert server.connections == 1


async def test_close_wakes_a_waiting_request_with_an_error(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port, limit=1)
    held = await pool.request("GET", "/partial", CIMultiDict(), None)
    waiting = asyncio.get_running_loop().create_task(get(pool))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await pool.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(waiting, 1)
    held.release()
    assert pool.open_connections() == 0
    assert server.connections == 1


# ------------------------------------------------------------------ connect errors


async def test_a_refused_port_is_a_connector_error(make_pool: PoolFactory) -> None:
    port = free_port()
    pool = make_pool(port)
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await pool.request("GET", "/", CIMultiDict(), None)
    failure = classify(caught.value, upstream=f"https://127.0.0.1:{port}")
    assert (failure.code, failure.kind) == ("upstream_connect_failed", "connect")
    assert pool.open_connections() == 0 and not pool.busy


async def test_an_untrusted_server_certificate_is_a_certificate_error(
    pki: PKI, bundle_file: Path, tmp_path: Path, make_pool: PoolFactory
) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(pki.other_ca.cert_pem())
    context = client_ssl_context(read_bundle(pem=bundle_file).identity(), ca_file=other)
    with HTTPServer(server_context(pki)) as upstream:
        pool = make_pool(upstream.port, ssl_context=context)
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
            await pool.request("GET", "/", CIMultiDict(), None)
    failure = classify(caught.value, upstream=upstream.url)
    assert (failure.code, failure.kind) == ("upstream_tls_failed", "tls")
    assert upstream.requests == []


async def test_a_handshake_that_never_completes_is_a_connect_timeout(
    make_pool: PoolFactory,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never speaks TLS
        pool = make_pool(silent.getsockname()[1], connect_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientError) as caught:
            await pool.request("GET", "/", CIMultiDict(), None)
        elapsed = time.monotonic() - started
    assert isinstance(caught.value, aiohttp.ConnectionTimeoutError), repr(caught.value)
    failure = classify(caught.value, upstream="u")
    assert (failure.code, failure.kind) == ("upstream_timeout", "timeout")
    assert 0.25 < elapsed < 2
    assert pool.open_connections() == 0 and not pool.busy


# ------------------------------------------------------------------ waiters


async def test_a_cancelled_waiter_passes_its_turn_on(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port, limit=1)
    held = await pool.request("GET", "/", CIMultiDict(), None)
    assert await held.read() == b"ok"
    loop = asyncio.get_running_loop()
    first = loop.create_task(get(pool, "/first"))
    second = loop.create_task(get(pool, "/second"))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()  # both wait for the one slot
    held.release()  # the connection goes idle and the first waiter is woken ...
    first.cancel()  # ... but its client went away before it could run
    with pytest.raises(asyncio.CancelledError):
        await first
    # The turn passed on: the second request gets the one connection, at once.
    assert await asyncio.wait_for(second, 1) == (200, b"ok")
    assert pool.open_connections() == 1


async def test_a_wait_for_a_free_connection_counts_against_the_connect_timeout(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    # Issue 12: with limit 1 and a 0.5 s connect timeout the second request waited on.
    pool = make_pool(server.port, limit=1, connect_timeout=0.5)
    held = await pool.request("GET", "/partial", CIMultiDict(), None)  # the one connection
    started = time.monotonic()
    try:
        with pytest.raises(aiohttp.ConnectionTimeoutError) as caught:
            await asyncio.wait_for(get(pool, "/waiting"), 3)
        elapsed = time.monotonic() - started
    finally:
        held.release()
    assert 0.45 <= elapsed < 1.5, elapsed
    failure = classify(caught.value, upstream="https://api.example.com")
    assert (failure.status, failure.code, failure.kind) == (504, "upstream_timeout", "timeout")
    assert "all 1 connections to https://api.example.com were busy" in failure.message
    assert "limits.upstream_connections" in failure.message
    assert "limits.upstream_connections" in failure.hint
    assert not pool.busy and pool._waiters == deque()  # no waiter left behind
    assert await get(pool) == (200, b"ok")  # the freed slot serves the next request
    assert [head.split(b" ")[1] for head in server.requests] == [b"/partial", b"/"]


# ------------------------------------------------------------------ after review


@pytest.mark.parametrize("value", ["a\x01b", "a\x7fb", "a\x00b"], ids=["soh", "del", "nul"])
async def test_a_control_character_in_a_header_is_refused(
    server: HTTPServer, make_pool: PoolFactory, value: str
) -> None:
    pool = make_pool(server.port)
    with pytest.raises(ValueError, match="control character"):
        await pool.request("GET", "/", CIMultiDict([("X-Bad", value)]), None)
    assert server.connections == 0
    tab = CIMultiDict([("X-Tab", "a\tb")])  # a tab is a legal field character
    assert await exchange(pool, "GET", "/", tab) == (200, b"ok")


async def test_a_request_body_that_fails_oddly_is_an_upstream_failure_not_a_crash(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        await asyncio.sleep(0.01)
        raise RuntimeError("malformed chunked body")

    pool = make_pool(server.port)
    with pytest.raises(aiohttp.ClientConnectionError) as caught:
        response = await pool.request("POST", "/", CIMultiDict(), broken())
        await response.read()
        response.release()
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert classify(caught.value, upstream="u").code == "upstream_connect_failed"
    await eventually(
        lambda: not pool.busy and pool.open_connections() == 0,
        within=1.0,
        what="not pool.busy and pool.open_connections() == 0",
        every=0.01,
    )


async def test_waiters_are_served_in_arrival_order(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port, limit=1)
    held = await pool.request("GET", "/", CIMultiDict(), None)
    await held.read()
    order: list[str] = []

    async def fetch(name: str) -> None:
        assert await get(pool, f"/{name}") == (200, b"ok")
        order.append(name)

    loop = asyncio.get_running_loop()
    waiting = [loop.create_task(fetch(name)) for name in ("a", "b", "c", "d")]
    await asyncio.sleep(0.05)
    held.release()
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert order == ["a", "b", "c", "d"]
    assert server.connections == 1


async def test_the_upstream_name_is_looked_up_once_for_a_burst(
    server: HTTPServer, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []

    class Counting(aiohttp.ThreadedResolver):
        async def resolve(self, host: str, port: int = 0, family: Any = 0) -> Any:
            lookups.append(host)
            await asyncio.sleep(0.02)  # concurrent connects overlap the lookup
            return await super().resolve(host, port, family)

    monkeypatch.setattr(upstream_http, "DefaultResolver", Counting)
    pool = make_pool(server.port, limit=5)
    answers = await asyncio.gather(*(get(pool, "/slow") for _ in range(5)))
    assert answers == [(200, b"ok")] * 5
    assert server.connections == 5
    assert lookups == ["127.0.0.1"]


async def test_a_trailing_dot_in_the_server_name_is_not_sent(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    # The demo PKI's server certificate names "localhost"; the FQDN form must match it.
    pool = make_pool(server.port, server_hostname="localhost.")
    assert await get(pool) == (200, b"ok")


# ------------------------------------------------------------------ headers a route may set


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("Content-Length", "5", "frames each request itself"),
        ("Transfer-Encoding", "chunked", "frames each request itself"),
        ("Connection", "close", "frames each request itself"),
        ("X-Bad Name", "1", "not a valid HTTP header name"),
        ("X-Bad:Name", "1", "not a valid HTTP header name"),
        ("X-Ctl", "a\x01b", "control character"),
        ("X-Split", "a\r\nX-Injected: 1", "line break"),
    ],
)
def test_a_destination_header_that_would_break_framing_is_refused(
    bundle_file: Path, ca_file: Path, name: str, value: str, problem: str
) -> None:
    route = route_config("https://api.example.com", bundle_file, ca_file)
    loaded = Loaded(
        identity=read_bundle(pem=bundle_file).identity(),
        upstream=parse_upstream("https://api.example.com"),
        headers={name: value},
    )
    with pytest.raises(ConfigError, match=problem) as caught:
        route_target(route, loaded, "routes[0]")
    assert caught.value.args[0].startswith(f"routes[0]: the header {name!r}")


def test_route_headers_replace_destination_headers_whatever_their_case(
    bundle_file: Path, ca_file: Path
) -> None:
    route = route_config(
        "https://api.example.com", bundle_file, ca_file, headers={"x-tenant": "route"}
    )
    loaded = Loaded(
        identity=read_bundle(pem=bundle_file).identity(),
        headers={"X-Tenant": "destination", "X-Other": "kept"},
    )
    target = route_target(route, loaded)
    assert dict(target.set_headers) == {
        "x-tenant": "route",
        "X-Other": "kept",
        "successfactors-companyid": "ACME1234",
    }
    assert {"x-tenant", "x-other", "successfactors-companyid"} <= target.drop


async def test_the_read_timeout_runs_again_after_an_interim_answer(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    pool = make_pool(server.port, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(aiohttp.ServerTimeoutError) as caught:
        await pool.request("GET", "/hints-stall", CIMultiDict(), None)
    assert time.monotonic() - started < 3
    assert classify(caught.value, upstream="u").kind == "timeout"
    await eventually(
        lambda: not pool.busy and pool.open_connections() == 0,
        within=1.0,
        what="not pool.busy and pool.open_connections() == 0",
        every=0.01,
    )


async def test_an_upstream_that_stops_reading_an_upload_times_out(
    server: HTTPServer, make_pool: PoolFactory
) -> None:
    async def endless() -> AsyncIterator[bytes]:
        chunk = b"x" * 65536
        for _ in range(4096):  # 256 MiB at most: far beyond the socket buffers
            yield chunk

    pool = make_pool(server.port, read_timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(aiohttp.ServerTimeoutError, match="stopped reading"):
            response = await pool.request("POST", "/no-read", CIMultiDict(), endless())
            response.release()
        assert time.monotonic() - started < 5
    finally:
        server.close_now.set()
    assert classify(aiohttp.ServerTimeoutError("x"), upstream="u").kind == "timeout"
    await eventually(
        lambda: not pool.busy and pool.open_connections() == 0,
        within=1.0,
        what="not pool.busy and pool.open_connections() == 0",
        every=0.01,
    )


async def test_a_retired_pool_waits_for_a_request_that_took_it_before_the_swap(
    bundle_file: Path, ca_file: Path
) -> None:
    """Between taking the pool and holding a connection (e.g. while 100 Continue is written)."""
    route = route_config("https://127.0.0.1:9", bundle_file, ca_file)
    loaded = Loaded(identity=read_bundle(pem=bundle_file).identity())
    tasks = TaskGroup()
    client = UpstreamClient(route, tasks)
    try:
        old = client.install(loaded.identity, route_target(route, loaded))
        with old.pool.in_use():
            assert old.pool.busy
            client.install(loaded.identity, route_target(route, loaded))  # retires the old
            await asyncio.sleep(4 * RETIRE_POLL)
            assert not old.pool.closed  # the request can still use it
        await eventually(lambda: old.pool.closed, within=2.0, what="old.pool.closed", every=0.01)
    finally:
        await client.close()
        await tasks.close()
