"""Fake upstream aiohttp apps for the tests: serve them with the ``tls_upstream`` fixture.

Usage::

    from tests.support.upstreams import FakeUpstream, pattern_chunks, pattern_sha256

    fake = FakeUpstream()                  # keep_alive=False: every answer
                                           # closes its connection
    url = await tls_upstream(fake.app())   # "https://localhost:PORT"
    ...
    fake.connections     # {peer (host, port): TLS session resumed?} of every
                         # connection a request arrived on, in arrival order
    fake.requests        # number of requests seen (all endpoints)
    await fake.slow_started.wait()   # a /slow request has arrived
    fake.release.set()               # let every waiting /slow request finish now

Endpoints (any method unless noted):

``/bytes/{n}`` (GET, HEAD)
    ``n`` bytes of `pattern_chunks(n)`, written chunk by chunk with a
    Content-Length; ``?chunked=1`` answers with chunked encoding instead.
    Their sha256 is `pattern_sha256(n)`. HEAD answers the headers only.
``/upload``
    Reads the request body as a stream and answers JSON ``{"sha256",
    "length", "content_length", "transfer_encoding"}`` (the last two: the
    request's headers, or null).
``/status/{code}``
    An empty answer with that status; 304 carries ``ETag: "v1"``; other codes
    than 204/304 answer the text ``status {code}``.
``/cookies``
    200 with the three `COOKIES` as separate ``Set-Cookie`` headers.
``/gzip``
    `GZIP_BODY` (gzip of `GZIP_PLAIN`) with ``Content-Encoding: gzip``,
    ``Content-Type: text/plain`` and its Content-Length.
``/hop-by-hop``
    200 ``ok`` carrying the hop-by-hop headers in `HOP_BY_HOP_RESPONSE`
    (including ``Connection: x-hop`` and the ``X-Hop`` it names) plus
    ``X-Kept: yes``.
``/slow``
    Sets ``slow_started``, then waits ``?delay=`` seconds (default 30) or until
    ``release`` is set. ``?phase=headers`` (default) waits before answering;
    ``?phase=body`` sends the headers and ``b"partial "`` first, then waits,
    then ``b"done"``.
anything else: echo
    JSON ``{"method", "path" (raw path and query, exactly as received),
    "headers" (list of [name, value] pairs in order), "body_sha256",
    "body_length", "peer" ([host, port])}``; the body is read as a stream.
    `header_values(echo, name)` picks values out of ``headers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import random
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from aiohttp import web

CHUNK = 64 * 1024
COOKIES = ("a=1; Path=/", "b=2; Path=/; HttpOnly", "c=3; Max-Age=60")
GZIP_PLAIN = b"".join(b"line %d of a compressible text body\n" % i for i in range(2000))
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)
HOP_BY_HOP_RESPONSE = (
    ("Connection", "x-hop"),
    ("X-Hop", "named by Connection"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic realm=upstream"),
    ("Trailer", "X-Checksum"),
)


def pattern_chunks(n: int, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """``n`` deterministic pseudo-random bytes, in chunks of ``chunk_size``.

    The stream does not depend on ``chunk_size`` as long as it is a multiple
    of 4, and a shorter stream is a prefix of a longer one.
    """
    if chunk_size % 4:
        raise ValueError("chunk_size must be a multiple of 4")
    rng = random.Random(0x5EED)
    left = n
    while left > 0:
        size = min(chunk_size, left)
        # randbytes draws whole 32-bit words: round up and cut, to keep the
        # stream independent of how it is chunked.
        yield rng.randbytes(size + (-size) % 4)[:size]
        left -= size


@lru_cache(maxsize=16)
def pattern_sha256(n: int) -> str:
    """The sha256 (hex) of the ``n`` bytes of `pattern_chunks`."""
    digest = hashlib.sha256()
    for chunk in pattern_chunks(n):
        digest.update(chunk)
    return digest.hexdigest()


def header_values(echo: dict[str, Any], name: str) -> list[str]:
    """All values of header ``name`` (any case) in an echo answer."""
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


class FakeUpstream:
    """One fake upstream: the app plus what it saw. Make one per test."""

    def __init__(self, *, keep_alive: bool = True) -> None:
        self.keep_alive = keep_alive
        self.connections: dict[tuple[str, int], bool] = {}
        self.requests = 0
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/bytes/{n:\\d+}", self._bytes)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_route("*", "/status/{code:\\d{3}}", self._status)
        app.router.add_route("*", "/cookies", self._cookies)
        app.router.add_route("*", "/gzip", self._gzip)
        app.router.add_route("*", "/hop-by-hop", self._hop_by_hop)
        app.router.add_route("*", "/slow", self._slow)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        transport = request.transport
        if transport is not None:
            peer = transport.get_extra_info("peername")
            ssl_object = transport.get_extra_info("ssl_object")
            resumed = bool(ssl_object is not None and ssl_object.session_reused)
            self.connections.setdefault((peer[0], peer[1]), resumed)
        response: web.StreamResponse = await handler(request)
        if not self.keep_alive:
            response.force_close()
        return response

    async def _echo(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            length += len(chunk)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_sha256": digest.hexdigest(),
                "body_length": length,
                "peer": list(peer[:2]) if peer else None,
            }
        )

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            response.enable_chunked_encoding()
        else:
            response.content_length = n
        await response.prepare(request)
        if request.method != "HEAD":
            for chunk in pattern_chunks(n):
                await response.write(chunk)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "sha256": digest.hexdigest(),
                "length": length,
                "content_length": request.headers.get("Content-Length"),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
            }
        )

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code == 304:
            return web.Response(status=304, headers={"ETag": '"v1"'})
        if code == 204:
            return web.Response(status=204)
        return web.Response(status=code, text=f"status {code}")

    async def _cookies(self, request: web.Request) -> web.Response:
        response = web.Response(text="cookies")
        for cookie in COOKIES:
            response.headers.add("Set-Cookie", cookie)
        return response

    async def _gzip(self, request: web.Request) -> web.Response:
        return web.Response(
            body=GZIP_BODY,
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def _hop_by_hop(self, request: web.Request) -> web.Response:
        response = web.Response(text="ok", headers={"X-Kept": "yes"})
        for name, value in HOP_BY_HOP_RESPONSE:
            response.headers.add(name, value)
        return response

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        delay = float(request.query.get("delay", "30"))
        self.slow_started.set()
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        if request.query.get("phase") == "body":
            await response.prepare(request)
            await response.write(b"partial ")
            await self._wait(delay)
        else:
            await self._wait(delay)
            await response.prepare(request)
        await response.write(b"done")
        await response.write_eof()
        return response

    async def _wait(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), delay)
