"""Hardening, each protection proven on real loopback sockets with real TLS.

Four groups, as the [hardening] issue lists them:

- **limits** (`LimitsConfig`): a head must arrive within ``header_timeout``
  (slowloris), an idle keep-alive connection lives until ``idle_timeout`` and
  no longer, connections beyond ``max_connections`` wait unread and are served
  when a slot frees, bodies beyond ``max_body`` get 413 ``request_too_large``;
- **faults**: the upstream resetting or closing mid-response and mid-request,
  the client leaving mid-upload and mid-download (the upstream request is
  cancelled; no connection, task or file descriptor is left behind), an
  upstream speaking garbage, every TLS alert class the error table maps, the
  client certificate expiring while the sidecar runs;
- **inbound**: listening beyond loopback needs ``allow_remote`` and a token,
  the token is compared in constant time and never forwarded;
- **secrets**: the key never touches a file system while the sidecar starts
  and rotates, and no error text carries a password or key material.

The request-parsing battery lives in tests/forward/test_request_parsing.py.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import hmac
import inspect
import io
import json
import logging
import os
import ssl
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.cli import main as cli
from sidecar.config import (
    Config,
    CredentialsConfig,
    InboundConfig,
    LimitsConfig,
    ListenAddress,
    RouteFlags,
    Timeouts,
    config_from_flags,
    parse_config,
)
from sidecar.credentials.sources import read_file_bundle
from sidecar.demo.pki import CA, Issued, new_key
from sidecar.errors import ConfigError, CredentialError, PasswordError, SidecarError
from sidecar.forward.failures import _REJECTION_ALERTS
from sidecar.forward.handler import RouteProxy
from sidecar.server import Sidecar
from tests.conftest import NO_CSRF, PKI, Running, eventually, route_config
from tests.support.answers import Answer, assert_sidecar_error, fetch
from tests.support.raw_http import RawResponse, assert_raw_error, raw, read_response
from tests.support.tls_servers import (
    IO_TIMEOUT,
    ThreadedServer,
    TLSServer,
    close_cleanly,
    read_request,
    reset,
    respond,
    server_context,
)
from tests.support.upstreams import FakeUpstream, pattern_chunks

TOKEN = "s3cr3t-inbound-token-0123456789abcdef"
GET = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
MiB = 1024 * 1024


# --------------------------------------------------------------------- helpers


def port_of(running: Running) -> int:
    return int(running.url.rsplit(":", 1)[1])


@dataclass
class Served:
    """A `FakeUpstream` and the sidecar in front of it."""

    fake: FakeUpstream
    running: Running

    @property
    def port(self) -> int:
        return port_of(self.running)


@pytest.fixture
async def serve(
    tls_upstream: Any, start_sidecar: Any, bundle_file: Path, ca_file: Path
) -> Callable[..., Awaitable[Served]]:
    """``await serve(limits=..., **route_overrides)``: a FakeUpstream behind a sidecar."""

    async def start(*, env: dict[str, str] | None = None, **overrides: Any) -> Served:
        fake = FakeUpstream()
        url = await tls_upstream(fake.app())
        running = await start_sidecar(route_config(url, bundle_file, ca_file, **overrides), env=env)
        return Served(fake, running)

    return start


async def connect(
    port: int, host: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


async def seconds_until_closed(reader: asyncio.StreamReader, limit: float = 10) -> float:
    """Read until EOF (everything read must be nothing); the seconds it took."""
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), limit)
    except ConnectionError:
        data = b""
    assert data == b"", f"expected a silent close, got {data[:200]!r}"
    return time.monotonic() - started


def write_bundle(path: Path, issued: Issued, password: bytes | None = None) -> Path:
    path.write_bytes(issued.btp_bundle(password))
    path.chmod(0o600)
    return path


def odd_intermediate(root: CA, not_before: dt.datetime, not_after: dt.datetime) -> CA:
    """An intermediate CA with the given validity (the leaves it signs are valid now)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "odd intermediate")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    return CA(root._sign(builder, new_key(), not_before=not_before, not_after=not_after))


# ======================================================================= limits


async def test_header_timeout_closes_a_connection_that_sends_half_a_head(serve) -> None:
    s = await serve(limits=LimitsConfig(header_timeout=0.5, idle_timeout=30))
    reader, writer = await connect(s.port)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # no empty line: the head never ends
        await writer.drain()
        elapsed = await seconds_until_closed(reader)
    finally:
        await close(writer)
    assert 0.4 <= elapsed < 2.0, elapsed
    assert s.fake.requests == 0


async def test_header_timeout_is_not_reset_by_a_head_that_trickles(serve) -> None:
    """Slowloris proper: a byte every 0.1 s keeps data flowing, the head never completes."""
    s = await serve(limits=LimitsConfig(header_timeout=0.5, idle_timeout=30))
    head = b"GET /x HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200  # 20 s at this pace
    reader, writer = await connect(s.port)
    started = time.monotonic()
    closed_after = None
    try:
        for i in range(len(head)):
            try:
                writer.write(head[i : i + 1])
                await writer.drain()
                data = await asyncio.wait_for(reader.read(100), 0.1)
            except TimeoutError:
                continue
            except ConnectionError:
                data = b""
            assert data == b"", data
            closed_after = time.monotonic() - started
            break
    finally:
        await close(writer)
    assert closed_after is not None, "the trickling head was never cut"
    assert 0.4 <= closed_after < 2.0, closed_after


async def test_header_timeout_applies_to_the_head_of_the_next_request(serve) -> None:
    s = await serve(limits=LimitsConfig(header_timeout=0.5, idle_timeout=30))
    reader, writer = await connect(s.port)
    try:
        writer.write(GET)
        assert (await read_response(reader)).status == 200
        writer.write(b"GET /second HTTP/1.1\r\nHost: x\r\n")  # half a head, then nothing
        await writer.drain()
        elapsed = await seconds_until_closed(reader)
    finally:
        await close(writer)
    assert 0.4 <= elapsed < 2.0, elapsed  # the head timer, not the 30 s idle timer
    assert s.fake.requests == 1


async def test_idle_keep_alive_outlives_the_head_timer_and_ends_at_idle_timeout(serve) -> None:
    s = await serve(limits=LimitsConfig(header_timeout=0.3, idle_timeout=1.5))
    reader, writer = await connect(s.port)
    try:
        writer.write(GET)
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(0.9)  # three head timeouts of silence between requests
        writer.write(GET)
        assert (await read_response(reader)).status == 200, "the idle connection was cut early"
        elapsed = await seconds_until_closed(reader)
    finally:
        await close(writer)
    assert 1.2 <= elapsed < 3.5, elapsed
    assert s.fake.requests == 2


async def test_excess_connections_wait_unread_and_are_served_when_a_slot_frees(serve) -> None:
    # header_timeout is shorter than the wait: a waiting connection's head timer
    # only starts once it is admitted.
    s = await serve(limits=LimitsConfig(max_connections=2, header_timeout=0.5, idle_timeout=30))
    conns = [await connect(s.port) for _ in range(2)]
    third = None
    try:
        for reader, writer in conns:
            writer.write(GET)
            assert (await read_response(reader)).status == 200
        third = await connect(s.port)  # accepted by the kernel, not read by the sidecar
        third[1].write(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
        await third[1].drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read_response(third[0]), 1.0)
        assert s.fake.requests == 2

        await close(conns[0][1])  # a slot frees
        started = time.monotonic()
        answer = await asyncio.wait_for(read_response(third[0]), 5)
        assert answer.status == 200
        assert answer.json()["path"] == "/third"
        assert time.monotonic() - started < 1.0
        # The other admitted connection kept its slot.
        conns[1][1].write(GET)
        assert (await read_response(conns[1][0])).status == 200
    finally:
        for _, writer in conns[1:]:
            await close(writer)
        if third is not None:
            await close(third[1])
    assert s.fake.requests == 4


async def test_a_connection_that_gives_up_while_waiting_frees_its_place(serve) -> None:
    s = await serve(limits=LimitsConfig(max_connections=1, header_timeout=0.5, idle_timeout=30))
    first_reader, first = await connect(s.port)
    waiting_reader, waiting = None, None
    try:
        first.write(GET)
        assert (await read_response(first_reader)).status == 200
        _, quitter = await connect(s.port)
        quitter.write(GET)
        await close(quitter)  # gave up while waiting: the sidecar has not read it yet
        waiting_reader, waiting = await connect(s.port)
        waiting.write(b"GET /waiting HTTP/1.1\r\nHost: x\r\n\r\n")
        await waiting.drain()
        await asyncio.sleep(0.2)
        await close(first)
        answer = await asyncio.wait_for(read_response(waiting_reader), 3)
        assert answer.status == 200
        assert answer.json()["path"] == "/waiting"
    finally:
        await close(first)
        if waiting is not None:
            await close(waiting)


def chunked_body(data: bytes, pieces: int = 3) -> bytes:
    size = -(-len(data) // pieces)
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("size, status", [(1000, 200), (1001, 413)], ids=["at-limit", "over"])
async def test_max_body(serve, framing: str, size: int, status: int) -> None:
    s = await serve(limits=LimitsConfig(max_body=1000))
    body = (bytes(range(256)) * 8)[:size]
    if framing == "content-length":
        request = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + body
    else:
        request = (
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked_body(body)
        )
    (answer,) = await raw(s.port, request)
    if status == 200:
        assert answer.status == 200, answer.body
        assert answer.json()["length"] == size
        return
    assert_raw_error(answer.status, answer.headers, answer.body, "request_too_large", 413)
    assert "limits.max_body" in answer.json()["error"]["message"]
    if framing == "content-length":
        assert s.fake.requests == 0, "a body known to be too large went upstream"
    # The sidecar is fine afterwards.
    (after,) = await raw(s.port, GET)
    assert after.status == 200


async def test_max_body_refuses_before_inviting_the_body(serve) -> None:
    """With ``Expect: 100-continue`` a too-large body is refused without a 100 Continue."""
    s = await serve(limits=LimitsConfig(max_body=1000))
    reader, writer = await connect(s.port)
    try:
        writer.write(
            b"PUT /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5000000\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(read_response(reader), 5)
    finally:
        await close(writer)
    assert answer.status == 413, answer
    assert answer.headers["X-Sidecar-Error"] == "request_too_large"
    assert s.fake.requests == 0


async def test_a_stalled_upload_is_cut_and_does_not_starve_the_upstream_pool(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that stops mid-way (slow POST) must not hold an upstream connection for good.

    Found while writing this file: no timer covered the body, so with timeouts.read=1 such
    a client held its connection and an upstream connection for 40 s and more, and a pool
    full of them (100 in production) made every other request of the route wait.
    """
    s = await serve(
        # upstream_connections=1: 100 stalled clients, scaled down
        limits=LimitsConfig(header_timeout=0.5, idle_timeout=1, upstream_connections=1),
        # connect=2: the wait for the one connection counts against it (about 0.7 s here)
        timeouts=Timeouts(connect=2, read=1, shutdown=1),
        session=NO_CSRF,  # else the body is read (kept for a CSRF resend) before connecting
    )
    reader, writer = await connect(s.port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.3)  # the upload holds the only upstream connection now
        assert s.running.sidecar.routes[0].client.open_connections() == 1
        other = await asyncio.wait_for(fetch(s.running.url + "/other"), 4)
        stalled = await asyncio.wait_for(read_response(reader), 4)
    finally:
        await close(writer)
    assert other.status == 200
    assert_raw_error(stalled.status, stalled.headers, stalled.body, "request_timeout", 408)
    assert stalled.headers["Connection"] == "close"


def test_limits_defaults_are_the_documented_ones() -> None:
    assert LimitsConfig() == LimitsConfig(
        max_connections=1000,
        max_header_size=16384,
        max_headers=100,
        header_timeout=10.0,
        idle_timeout=75.0,
        max_body=None,
    )


# ======================================================================= faults


def partial_response(framing: str, ending: str) -> Callable[[TLSServer, ssl.SSLSocket], None]:
    """A handler that answers 200 with 1000 bytes of a longer body, then resets or closes."""

    def handler(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        if framing == "content-length":
            head = b"Content-Length: 100000\r\n\r\n"
            body = b"x" * 1000
        elif framing == "chunked":
            head = b"Transfer-Encoding: chunked\r\n\r\n"
            body = b"3e8\r\n" + b"x" * 1000 + b"\r\n"  # a whole chunk, then no last chunk
        else:  # close-delimited: only a clean close would end it
            head = b"Connection: close\r\n\r\n"
            body = b"x" * 1000
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + head + body)
        time.sleep(0.1)  # let the sidecar relay what it got
        if ending == "reset":
            reset(conn)
        else:
            close_cleanly(conn)  # close_notify and FIN: a clean end, too early

    return handler


async def read_until_closed(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything until the connection ends; True when it ended with a reset."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2):
            data += chunk
    except ConnectionResetError:
        return data, True
    except TimeoutError:
        pass  # still open: judged by its framing
    return data, False


def looks_broken(data: bytes, was_reset: bool) -> bool:
    """Whether an HTTP/1.x client can tell that this response is incomplete."""
    head, _, body = data.partition(b"\r\n\r\n")
    headers = head.lower()
    if b"content-length:" in headers:
        length = int(headers.split(b"content-length:")[1].split(b"\r\n")[0])
        return len(body) < length or was_reset
    if b"transfer-encoding: chunked" in headers:
        return not body.endswith(b"0\r\n\r\n") or was_reset
    return was_reset  # close-delimited: only a reset tells a cut from the end


@pytest.mark.parametrize(
    "framing, ending, version",
    [
        ("content-length", "reset", "1.1"),
        ("content-length", "close", "1.1"),
        ("chunked", "reset", "1.1"),
        ("chunked", "close", "1.1"),
        ("content-length", "reset", "1.0"),
        ("chunked", "reset", "1.0"),
        ("close-delimited", "reset", "1.1"),
    ],
)
async def test_upstream_failing_mid_response_never_looks_complete(
    pki: PKI,
    bundle_file: Path,
    ca_file: Path,
    start_sidecar: Any,
    framing: str,
    ending: str,
    version: str,
) -> None:
    with TLSServer(server_context(pki), partial_response(framing, ending)) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        # Raw: what the client gets, byte for byte, until the sidecar ends the connection.
        reader, writer = await connect(port_of(running))
        try:
            writer.write(b"GET /x HTTP/%s\r\nHost: x\r\n\r\n" % version.encode())
            await writer.drain()
            data, was_reset = await read_until_closed(reader)
        finally:
            await close(writer)
        assert data.startswith(b"HTTP/%s 200 " % version.encode()), data[:300]
        assert b"x" * 1000 in data
        assert looks_broken(data, was_reset), data[:300] + b"..." + data[-30:]
        if version == "1.1":
            # aiohttp, as a client program uses it: reading the body fails.
            async with aiohttp.ClientSession() as session:
                async with session.get(running.url + "/x") as resp:
                    assert resp.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await resp.read()
    assert upstream.errors == []
    assert running.sidecar.routes[0].stats.upstream_errors >= 1


def reset_mid_request(server: TLSServer, conn: ssl.SSLSocket) -> None:
    """Read the head and 256 KiB of the body, then reset."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    server.requests.append(data.partition(b"\r\n\r\n")[0])
    got = len(data)
    while got < 256 * 1024:
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    reset(conn)


def answer_then_reset_mid_request(server: TLSServer, conn: ssl.SSLSocket) -> None:
    """Answer a first request (the connection is proven to accept us), then reset mid-upload.

    On a fresh TLS 1.3 connection a reset before any answer counts as a certificate
    refusal unless the server's session ticket was seen first, which a busy loop may
    not get to; a kept-alive connection leaves no doubt that it is a plain reset.
    """
    read_request(server, conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    reset_mid_request(server, conn)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_reset_mid_request_is_never_a_success(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any, framing: str
) -> None:
    size = 8 * MiB

    async def body() -> AsyncIterator[bytes]:
        for chunk in pattern_chunks(size):
            yield chunk

    headers = {"Content-Length": str(size)} if framing == "content-length" else {}
    with TLSServer(server_context(pki), answer_then_reset_mid_request) as upstream:
        running = await start_sidecar(
            route_config(upstream.url, bundle_file, ca_file, session=NO_CSRF)
        )
        assert (await fetch(running.url + "/warm-up")).status == 200
        outcome: Answer | BaseException
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    running.url + "/upload", data=body(), headers=headers
                ) as resp:
                    outcome = Answer(resp.status, resp.headers.copy(), await resp.read())
        except aiohttp.ClientError as exc:
            outcome = exc  # a broken connection is an acceptable answer
    assert len(upstream.requests) == 2, "the upload was retried"
    assert upstream.connections == 1  # the upload went on the kept-alive connection
    if isinstance(outcome, Answer):
        assert_sidecar_error(outcome, "upstream_connect_failed")


class Probe:
    """An upstream app whose handlers report how a request ended."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self.outcome = ""
        self.received = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/download", self.download)
        app.router.add_get("/wait", self.wait)
        app.router.add_get("/{tail:.*}", self.ok)
        return app

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def upload(self, request: web.Request) -> web.Response:
        try:
            async for chunk in request.content.iter_any():
                self.received += len(chunk)
                self.started.set()
            self.outcome = "complete" if self.received == request.content_length else "short"
        except (ConnectionError, aiohttp.ClientError, asyncio.CancelledError) as exc:
            self.outcome = f"disconnected: {type(exc).__name__}"
            raise
        finally:
            self.ended.set()
        return web.Response(text=f"got {self.received}")

    async def wait(self, request: web.Request) -> web.Response:
        """Answer after 10 s, unless the sidecar gives up on the request first."""
        self.started.set()
        try:
            for _ in range(200):
                if request.transport is None or request.transport.is_closing():
                    self.outcome = "disconnected: the sidecar closed the connection"
                    break
                await asyncio.sleep(0.05)
            else:
                self.outcome = "complete"
        finally:
            self.ended.set()
        return web.Response(text="too late")

    async def download(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 1024 * MiB
        await response.prepare(request)
        try:
            for _ in range(1024 * 16):
                await response.write(b"z" * 65536)
                self.started.set()
                await asyncio.sleep(0.001)
            self.outcome = "complete"
        except (ConnectionError, aiohttp.ClientError, asyncio.CancelledError) as exc:
            self.outcome = f"disconnected: {type(exc).__name__}"
            raise
        finally:
            self.ended.set()
        return response


@dataclass(frozen=True)
class Resources:
    connections: int
    tasks: int
    fds: int

    @classmethod
    def now(cls, running: Running) -> Resources:
        return cls(
            running.sidecar.routes[0].client.open_connections(),
            len(asyncio.all_tasks()),
            len(os.listdir("/proc/self/fd")),
        )

    def back_to(self, baseline: Resources) -> bool:
        return (
            self.connections <= baseline.connections
            and self.tasks <= baseline.tasks
            and self.fds <= baseline.fds + 2
        )


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
@pytest.mark.parametrize("leaving", ["mid-upload", "waiting-for-the-answer", "mid-download"])
async def test_client_leaving_cancels_the_upstream_request_and_leaks_nothing(
    tls_upstream: Any, start_sidecar: Any, bundle_file: Path, ca_file: Path, leaving: str
) -> None:
    probe = Probe()
    url = await tls_upstream(probe.app())
    running = await start_sidecar(route_config(url, bundle_file, ca_file))
    # Warm up: one pooled upstream connection, nothing else in flight.
    async with aiohttp.ClientSession() as session, session.get(running.url + "/warm") as resp:
        assert resp.status == 200
    await asyncio.sleep(0.1)
    baseline = Resources.now(running)

    reader, writer = await connect(port_of(running))
    try:
        if leaving == "mid-upload":
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (64 * MiB)
            )
            for chunk in pattern_chunks(MiB):
                writer.write(chunk)
            await writer.drain()
        elif leaving == "waiting-for-the-answer":
            writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
        else:
            writer.write(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(MiB)
        await asyncio.wait_for(probe.started.wait(), 5)
    finally:
        await close(writer)  # the client leaves, the rest unsent / unread

    await asyncio.wait_for(probe.ended.wait(), 5)
    print(f"{leaving}: upstream saw {probe.outcome!r} after {probe.received} body bytes")
    assert probe.outcome.startswith("disconnected"), probe.outcome
    # 499: nginx's "client closed request", in the metrics.
    exposition = running.sidecar.metrics.exposition().decode()
    assert 'code="499"' in exposition
    # The route still works, and once it pooled a connection again (as after the
    # warm-up) nothing is left over from the abandoned request.
    async with aiohttp.ClientSession() as session, session.get(running.url + "/after") as resp:
        assert resp.status == 200
    assert await eventually(
        lambda: Resources.now(running).back_to(baseline),
        within=5.0,
        what=f"the resources back to {baseline}",
    ), (
        baseline,
        Resources.now(running),
    )


def garbage_after_request(server: TLSServer, conn: ssl.SSLSocket) -> None:
    read_request(server, conn)
    conn.sendall(b"garbage\r\n\r\n")
    close_cleanly(conn)


class PlainGarbageServer(ThreadedServer):
    """Writes ``garbage`` to every TCP connection: not TLS, not HTTP."""

    def _serve(self, raw_sock: Any) -> None:
        raw_sock.settimeout(IO_TIMEOUT)
        try:
            raw_sock.sendall(b"garbage\r\n\r\n")
            raw_sock.shutdown(2)
        except OSError:
            pass
        finally:
            raw_sock.close()
            with self._lock:
                self._open.discard(raw_sock)


async def test_upstream_answering_garbage_instead_of_http_is_502(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    with TLSServer(server_context(pki), garbage_after_request) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, "upstream_bad_response")
    assert "malformed response head" in error["message"]
    assert len(upstream.requests) == 1


async def test_upstream_answering_garbage_instead_of_tls_is_502(
    bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    with PlainGarbageServer() as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/x")
    assert_sidecar_error(answer, "upstream_tls_failed")


# -- every TLS alert class of the error table
#
# A server can send any alert from its SNI callback (the sidecar always sends
# SNI for a host name), which covers the classes a test PKI cannot provoke
# naturally; the realistic causes follow below.

REJECTED = "client_certificate_rejected"
NOT_THE_CERT = "upstream_tls_failed"
CERTIFICATE_REQUIRED = 116  # TLS 1.3 only; the ssl module has no constant for it
ALERT_CASES = [
    ("bad_certificate", ssl.ALERT_DESCRIPTION_BAD_CERTIFICATE, REJECTED, None),
    ("unknown_ca", ssl.ALERT_DESCRIPTION_UNKNOWN_CA, REJECTED, None),
    ("certificate_unknown", ssl.ALERT_DESCRIPTION_CERTIFICATE_UNKNOWN, REJECTED, None),
    ("unsupported_certificate", ssl.ALERT_DESCRIPTION_UNSUPPORTED_CERTIFICATE, REJECTED, None),
    ("certificate_revoked", ssl.ALERT_DESCRIPTION_CERTIFICATE_REVOKED, REJECTED, None),
    ("certificate_expired", ssl.ALERT_DESCRIPTION_CERTIFICATE_EXPIRED, REJECTED, None),
    ("access_denied", ssl.ALERT_DESCRIPTION_ACCESS_DENIED, REJECTED, None),
    ("decrypt_error", ssl.ALERT_DESCRIPTION_DECRYPT_ERROR, REJECTED, None),
    ("certificate_required", CERTIFICATE_REQUIRED, REJECTED, ssl.TLSVersion.TLSv1_3),
    ("handshake_failure", ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE, NOT_THE_CERT, None),
    ("protocol_version", ssl.ALERT_DESCRIPTION_PROTOCOL_VERSION, NOT_THE_CERT, None),
    ("internal_error", ssl.ALERT_DESCRIPTION_INTERNAL_ERROR, NOT_THE_CERT, None),
    ("unrecognized_name", ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME, NOT_THE_CERT, None),
]


def test_alert_cases_cover_every_rejection_alert_of_the_table() -> None:
    tested = {name for name, _, code, _ in ALERT_CASES if code == REJECTED}
    table = {alert.removeprefix("ALERT_").lower() for alert in _REJECTION_ALERTS}
    assert tested == table


def _alert_params() -> list[Any]:
    params = []
    for name, number, code, only in ALERT_CASES:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            if only is None or only == version:
                tag = "1.3" if version == ssl.TLSVersion.TLSv1_3 else "1.2"
                params.append(pytest.param(name, number, code, version, id=f"{name}-tls{tag}"))
    return params


@pytest.mark.parametrize("name, number, code, version", _alert_params())
async def test_tls_alert_is_mapped(
    pki: PKI,
    bundle_file: Path,
    ca_file: Path,
    start_sidecar: Any,
    name: str,
    number: int,
    code: str,
    version: ssl.TLSVersion,
) -> None:
    ctx = server_context(pki, maximum_version=version)
    ctx.minimum_version = version
    ctx.sni_callback = lambda sslobj, server_name, context: number
    with TLSServer(ctx, respond) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, code)
    if code == REJECTED:
        assert f"TLS alert: {name}" in error["message"]
        assert "X.509" in error["hint"]
    assert upstream.handshake_errors, "the server never failed the handshake"
    assert upstream.requests == []


def _crl_revoking(pki: PKI, serial: int, path: Path) -> Path:
    now = dt.datetime.now(dt.UTC)
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(now - dt.timedelta(hours=1))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.intermediate.cert.subject)
        .last_update(now - dt.timedelta(hours=1))
        .next_update(now + dt.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .sign(pki.intermediate.issued.key, hashes.SHA256())
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(
    "cause, alert",
    [
        ("server-auth-only-certificate", "unsupported_certificate"),
        ("revoked-certificate", "certificate_revoked"),
        ("expired-intermediate", "certificate_expired"),
        ("intermediate-not-yet-valid", "bad_certificate"),
    ],
)
async def test_real_certificate_rejections_are_mapped(
    pki: PKI, tmp_path: Path, ca_file: Path, start_sidecar: Any, cause: str, alert: str
) -> None:
    """Causes a real server meets; the leaf itself is valid, so the sidecar loads it."""
    now = dt.datetime.now(dt.UTC)
    ctx = server_context(pki)
    if cause == "server-auth-only-certificate":
        client = pki.intermediate.client(client_auth=False)
    elif cause == "revoked-certificate":
        client = pki.intermediate.client()
        ctx.load_verify_locations(
            cafile=str(_crl_revoking(pki, client.cert.serial_number, tmp_path / "crl.pem"))
        )
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    elif cause == "expired-intermediate":
        inter = odd_intermediate(pki.root, now - dt.timedelta(days=30), now - dt.timedelta(days=1))
        client = inter.client()
    else:
        inter = odd_intermediate(pki.root, now + dt.timedelta(days=1), now + dt.timedelta(days=30))
        client = inter.client()
    bundle = write_bundle(tmp_path / "client.pem", client)
    with TLSServer(ctx, respond) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle, ca_file))
        answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, REJECTED)
    assert f"TLS alert: {alert}" in error["message"]
    assert upstream.requests == []


async def test_certificate_expiring_with_a_warm_pool_sends_nothing_upstream(
    pki: PKI, tmp_path: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    """The pooled connection still holds a TLS session made with the now expired
    certificate; the sidecar must not use it: ready 503, proxied 503."""
    not_after = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=3)
    bundle = write_bundle(tmp_path / "short.pem", pki.intermediate.client(not_after=not_after))
    fake = FakeUpstream()
    url = await tls_upstream(fake.app())
    running = await start_sidecar(route_config(url, bundle, ca_file))
    async with aiohttp.ClientSession() as session:
        async with session.get(running.url + "/warm") as resp:
            assert resp.status == 200, "the certificate should still be valid: the test is slow"
        assert running.sidecar.routes[0].client.open_connections() == 1
        while dt.datetime.now(dt.UTC) < not_after:
            await asyncio.sleep(0.1)
        async with session.get(running.url + "/-/ready") as resp:
            assert resp.status == 503
            assert "expired" in (await resp.json())["reason"]
        async with session.get(running.url + "/-/status") as resp:
            assert (await resp.json())["routes"][0]["ready"] is False
        answer = await fetch(running.url + "/after-expiry", "POST", data=b"payload")
    assert_sidecar_error(answer, "credentials_unavailable")
    assert fake.requests == 1, "a request went upstream with an expired certificate"


# ====================================================================== inbound


ROUTE_YAML = """\
routes:
  - listen: {listen}
    upstream: https://api.example.test
    credentials: {{pem: /etc/sidecar/client.pem}}
{inbound}"""


def _parse(listen: str, inbound: str = "") -> Config:
    return parse_config(ROUTE_YAML.format(listen=listen, inbound=inbound), env={})


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:8080", "'[::]:8080'", "192.0.2.10:8080", "sidecar.internal:8080", "'[fe80::1]:80'"],
)
def test_a_non_loopback_listen_needs_allow_remote(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.listen .*reachable from other"):
        _parse(listen)
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.inbound\.token_env .*is required"):
        _parse(listen, "    inbound: {allow_remote: true}\n")
    (route,) = _parse(listen, "    inbound: {allow_remote: true, token_env: TOK}\n").routes
    assert route.inbound == InboundConfig(allow_remote=True, token_env="TOK")


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "127.0.0.2:8080", "'[::1]:8080'", "localhost:8080", "8080"]
)
def test_a_loopback_listen_needs_no_allow_remote(listen: str) -> None:
    (route,) = _parse(listen).routes
    assert route.listen.is_loopback
    assert route.inbound == InboundConfig()


def test_route_flags_follow_the_same_rule() -> None:
    def flags(**kw: Any) -> RouteFlags:
        return RouteFlags(
            listen="0.0.0.0:8080", upstream="https://api.example.test", cert="/etc/client.pem", **kw
        )

    with pytest.raises(ConfigError, match=r"routes\[0\]\.listen"):
        config_from_flags(flags(), env={})
    with pytest.raises(ConfigError, match=r"routes\[0\]\.inbound\.token_env"):
        config_from_flags(flags(allow_remote=True), env={})
    config = config_from_flags(flags(allow_remote=True, token_env="TOK"), env={})
    assert config.routes[0].inbound.allow_remote


@pytest.mark.parametrize("value", [None, "", "short-token"])
async def test_a_missing_or_short_token_refuses_to_start(
    bundle_file: Path, ca_file: Path, value: str | None
) -> None:
    route = route_config(
        "https://localhost:1", bundle_file, ca_file, inbound=InboundConfig(token_env="TOK")
    )
    sidecar = Sidecar(Config(routes=(route,)), env={} if value is None else {"TOK": value})
    with pytest.raises(ConfigError, match=r"routes\[0\]\.inbound\.token_env: .*TOK"):
        await sidecar.start()


@pytest.fixture
def digest_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Every `hmac.compare_digest` call, recorded (the real one still decides)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return calls


async def test_a_remote_style_route_on_a_loopback_alias_demands_the_token(
    serve, digest_calls: list[tuple[bytes, bytes]]
) -> None:
    """allow_remote + token, bound to 127.0.0.2 (loopback: tests never bind beyond it)."""
    s = await serve(
        listen=ListenAddress("127.0.0.2", 0),
        inbound=InboundConfig(allow_remote=True, token_env="TOK"),
        env={"TOK": TOKEN},
    )
    base = s.running.url
    assert base.startswith("http://127.0.0.2:")
    for path in ("/x", "/-/status", "/-/metrics"):
        for headers in ({}, {"X-Sidecar-Token": TOKEN[:-1]}, {"X-Sidecar-Token": TOKEN + "x"}):
            answer = await fetch(base + path, headers=headers)
            assert_sidecar_error(answer, "inbound_auth_required")
            assert TOKEN.encode() not in answer.body
    for path in ("/-/health", "/-/ready"):
        assert (await fetch(base + path)).status == 200
    assert s.fake.requests == 0
    # Every refusal went through the constant-time comparison with the real token.
    assert len(digest_calls) == 9
    assert all(expected == TOKEN.encode() for _, expected in digest_calls)

    ok = await fetch(base + "/x", headers={"X-Sidecar-Token": TOKEN})
    assert ok.status == 200
    sent = json.loads(ok.body)["headers"]
    assert not [v for k, v in sent if k.lower() == "x-sidecar-token"]
    assert (await fetch(base + "/-/status", headers={"X-Sidecar-Token": TOKEN})).status == 200


def test_the_token_check_uses_compare_digest_only() -> None:
    source = inspect.getsource(RouteProxy.token_ok)
    assert "hmac.compare_digest(" in source
    assert "==" not in source and "!=" not in source


async def test_the_token_never_leaves_the_sidecar(serve, caplog: pytest.LogCaptureFixture) -> None:
    """Not forwarded however it is spelled or repeated, not echoed, not logged."""
    caplog.set_level(logging.DEBUG)
    s = await serve(inbound=InboundConfig(token_env="TOK"), env={"TOK": TOKEN})
    variants = [
        b"X-Sidecar-Token: " + TOKEN.encode(),
        b"x-sidecar-token: " + TOKEN.encode(),
        b"X-SIDECAR-TOKEN: " + TOKEN.encode() + b"\r\nX-Sidecar-Token: " + TOKEN.encode(),
        b"X-Sidecar-Token: " + TOKEN.encode() + b"\r\nConnection: keep-alive, X-Sidecar-Token",
    ]
    answers: list[RawResponse] = []
    for header in variants:
        answers += await raw(s.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    for answer in answers:
        assert answer.status == 200, answer.body
        assert TOKEN.encode() not in answer.body
        assert all(TOKEN not in v for v in answer.headers.values())
    async with aiohttp.ClientSession() as session:
        async with session.get(
            s.running.url + "/-/status", headers={"X-Sidecar-Token": TOKEN}
        ) as r:
            status = await r.read()
        async with session.get(
            s.running.url + "/-/metrics", headers={"X-Sidecar-Token": TOKEN}
        ) as r:
            metrics = await r.read()
    assert TOKEN.encode() not in status and TOKEN.encode() not in metrics
    assert TOKEN not in caplog.text


# ====================================================================== secrets


def key_secrets(*issued: Issued) -> list[bytes]:
    """Byte strings that only a copy of these private keys would hold."""
    out: list[bytes] = []
    for i in issued:
        key = i.key
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        out.append(pem.splitlines()[1])  # a base64 line of the unencrypted key
        out.append(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        if isinstance(key, ec.EllipticCurvePrivateKey):
            out.append(key.private_numbers().private_value.to_bytes(32, "big"))
    return out


class DiskWatch:
    """Records what could put key material on a file system while it is active."""

    def __init__(self, secrets: list[bytes]) -> None:
        self.secrets = secrets
        self.opened_for_writing: list[str] = []
        self.temp_files: list[str] = []
        self.secret_writes: list[str] = []  # fd targets that received key bytes
        self.cert_chain_paths: list[tuple[str, str]] = []  # (path, link) given to OpenSSL

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_write, real_os_open, real_open = os.write, os.open, builtins.open

        def write(fd: int, data: Any) -> int:
            if any(s in bytes(data) for s in self.secrets):
                self.secret_writes.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real_write(fd, data)

        def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
                self.opened_for_writing.append(str(path))
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if any(c in mode for c in "wax+"):
                self.opened_for_writing.append(str(file))
            return real_open(file, mode, *args, **kwargs)

        def temp(name: str, real: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.temp_files.append(name)
                return real(*args, **kwargs)

            return wrapper

        real_load = ssl.SSLContext.load_cert_chain

        def load_cert_chain(ctx: ssl.SSLContext, certfile: Any, *args: Any, **kwargs: Any) -> None:
            path = str(certfile)
            link = os.readlink(path) if path.startswith("/proc/self/fd/") else path
            self.cert_chain_paths.append((path, link))
            real_load(ctx, certfile, *args, **kwargs)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        for name in ("mkstemp", "NamedTemporaryFile", "TemporaryFile", "mkdtemp"):
            monkeypatch.setattr(tempfile, name, temp(name, getattr(tempfile, name)))
        monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", load_cert_chain)


def open_files_holding(secrets: list[bytes]) -> tuple[list[str], list[str]]:
    """(kinds of every open fd, regular files among them that hold a secret)."""
    kinds: list[str] = []
    holding: list[str] = []
    for name in os.listdir("/proc/self/fd"):
        path = f"/proc/self/fd/{name}"
        try:
            target = os.readlink(path)
            mode = os.stat(path).st_mode
        except OSError:
            continue  # the fd of the listing itself, or one closed meanwhile
        kinds.append(target.split(":", 1)[0] if ":" in target else "path")
        if not stat.S_ISREG(mode):
            continue
        try:
            with open(path, "rb") as f:
                content = f.read(64 * MiB)
        except OSError:
            continue
        if any(s in content for s in secrets):
            holding.append(target)
    return kinds, holding


def listing(*dirs: Path) -> dict[str, list[str]]:
    return {str(d): sorted(p.name for p in d.iterdir()) for d in dirs}


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux: memfd and /proc/self/fd")
async def test_the_key_never_touches_disk_while_starting_and_rotating(
    pki: PKI,
    tmp_path: Path,
    ca_file: Path,
    tls_upstream: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = pki.intermediate.client(), pki.intermediate.client("rotated-user")
    secrets = key_secrets(first, second)
    bundle = write_bundle(tmp_path / "client.pem", first)
    staged = write_bundle(tmp_path / "staged.pem", second)  # written before the watch
    fake = FakeUpstream()
    url = await tls_upstream(fake.app())
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    system_tmp = Path(tempfile.gettempdir())
    before = listing(tmp, cwd)

    watch = DiskWatch(secrets)
    watch.install(monkeypatch)
    sidecar = Sidecar(Config(routes=(route_config(url, bundle, ca_file),)), env={})
    try:
        await sidecar.start()
        rt = sidecar.routes[0]
        base = f"http://{sidecar.bound_address(rt)}"
        assert (await fetch(base + "/one")).status == 200
        os.replace(staged, bundle)  # the rotation: a rename, no bytes written
        sidecar.reload_all()
        assert await eventually(
            lambda: (
                rt.client.current is not None and rt.client.current.identity.leaf == second.cert
            ),
            within=5.0,
            what="the rotated certificate picked up",
        ), "the rotated certificate was not picked up"
        assert (await fetch(base + "/two")).status == 200
        kinds, holding = open_files_holding(secrets)  # while it runs
    finally:
        await sidecar.close()
        monkeypatch.undo()

    assert holding == [], f"open regular files holding the key: {holding}"
    assert "memfd" not in kinds, "a memory file outlived the context that loaded it"
    assert watch.secret_writes, "the key never reached OpenSSL?"
    assert all(t.startswith("/memfd:mtls-sidecar") for t in watch.secret_writes), (
        watch.secret_writes
    )
    assert len(watch.cert_chain_paths) == 2  # start and rotation
    assert all(link.startswith("/memfd:") for _, link in watch.cert_chain_paths)
    assert watch.opened_for_writing == []
    assert watch.temp_files == []
    assert listing(tmp, cwd) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "client.pem", "cwd", "tmp"]
    leftovers = [
        p
        for p in system_tmp.iterdir()
        if p.is_file()
        and p.stat().st_mtime >= time.time() - 60
        and p.stat().st_size < MiB
        and any(s in p.read_bytes() for s in secrets)
    ]
    assert leftovers == []


PASSWORD = "correct-horse-battery-staple-42"
WRONG = "wrong-password-guess-17"


def texts_of(exc: BaseException) -> str:
    """Everything an exception could show: str, repr, hint, causes and contexts."""
    parts: list[str] = []
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        parts += [str(current), repr(current), str(getattr(current, "hint", "") or "")]
        parts += [str(a) for a in current.args]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def assert_no_secret(text: str | bytes, pki: PKI, *passwords: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for password in passwords:
        assert password.encode() not in data, f"password {password!r} shown"
    for secret in key_secrets(pki.client):
        assert secret not in data
    assert b"PRIVATE KEY-----" not in data


@pytest.fixture
def bad_bundles(pki: PKI, tmp_path: Path) -> dict[str, Path]:
    """An encrypted bundle (read with the wrong password) and one with a foreign key."""
    encrypted = write_bundle(tmp_path / "encrypted.pem", pki.client, PASSWORD.encode())
    mismatched = tmp_path / "mismatched.pem"
    mismatched.write_bytes(pki.intermediate.client().key_pem() + pki.client.chain_pem())
    mismatched.chmod(0o600)
    return {"wrong-password": encrypted, "mismatched-key": mismatched}


@pytest.mark.parametrize("problem", ["wrong-password", "mismatched-key"])
async def test_credential_errors_never_show_the_password_or_key(
    pki: PKI, bad_bundles: dict[str, Path], ca_file: Path, problem: str
) -> None:
    env = {"KEY_PW": WRONG}
    creds = CredentialsConfig(pem=bad_bundles[problem], password_env="KEY_PW")
    expected = PasswordError if problem == "wrong-password" else CredentialError
    with pytest.raises(expected) as info:
        read_file_bundle(creds, where="routes[0].credentials", env=env).identity()
    assert_no_secret(texts_of(info.value), pki, PASSWORD, WRONG)
    assert str(bad_bundles[problem]) in str(info.value)  # it does name the file

    route = route_config("https://localhost:1", bad_bundles[problem], ca_file, credentials=creds)
    sidecar = Sidecar(Config(routes=(route,)), env=env)
    with pytest.raises(SidecarError) as info2:
        await sidecar.start()
    assert_no_secret(texts_of(info2.value), pki, PASSWORD, WRONG)


@pytest.mark.parametrize("problem", ["wrong-password", "mismatched-key"])
def test_cli_check_output_never_shows_the_password_or_key(
    pki: PKI,
    bad_bundles: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    problem: str,
) -> None:
    monkeypatch.setenv("KEY_PW", WRONG)
    result = CliRunner().invoke(
        cli,
        [
            "check",
            "--upstream",
            "https://api.example.test",
            "--cert",
            str(bad_bundles[problem]),
            "--password-env",
            "KEY_PW",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert_no_secret(result.output, pki, PASSWORD, WRONG)


async def test_a_failed_reload_leaks_the_password_nowhere(
    pki: PKI,
    tmp_path: Path,
    ca_file: Path,
    tls_upstream: Any,
    start_sidecar: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bundle = write_bundle(tmp_path / "client.pem", pki.client, PASSWORD.encode())
    fake = FakeUpstream()
    url = await tls_upstream(fake.app())
    creds = CredentialsConfig(pem=bundle, password_env="KEY_PW")
    env = {"KEY_PW": PASSWORD}
    running = await start_sidecar(route_config(url, bundle, ca_file, credentials=creds), env=env)
    rt = running.sidecar.routes[0]
    env["KEY_PW"] = WRONG  # the sidecar's mapping: the next read sees it
    assert not await rt.reload()
    assert rt.last_error and "wrong password" in rt.last_error

    proxied = await fetch(running.url + "/still-served")  # the last good identity
    status = await fetch(running.url + "/-/status")
    metrics = await fetch(running.url + "/-/metrics")
    assert proxied.status == 200
    assert "wrong password" in status.body.decode()
    for text in (status.body, metrics.body, proxied.body, caplog.text):
        assert_no_secret(text, pki, PASSWORD, WRONG)


async def test_the_password_variable_stays_set_and_is_read_again_on_every_reload(
    pki: PKI,
    tmp_path: Path,
    ca_file: Path,
    tls_upstream: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What happens to ``credentials.password_env`` after reading — current behaviour.

    The sidecar reads the variable from ``os.environ`` each time it loads the
    bundle, at start and on every reload, and never removes or overwrites it:
    the password stays in the process environment for the process's lifetime
    (a variable set at start is also in ``/proc/<pid>/environ``, readable by the
    same user and root, and every child process inherits it). The upside is
    that rotating to a bundle with a new password only needs the variable
    changed in the process environment; removing the variable makes the next
    reload fail, keeping the last good identity.
    """
    var = "SIDECAR_TEST_KEY_PASSWORD"
    monkeypatch.setenv(var, PASSWORD)
    bundle = write_bundle(tmp_path / "client.pem", pki.client, PASSWORD.encode())
    fake = FakeUpstream()
    url = await tls_upstream(fake.app())
    creds = CredentialsConfig(pem=bundle, password_env=var)
    sidecar = Sidecar(Config(routes=(route_config(url, bundle, ca_file, credentials=creds),)))
    try:
        await sidecar.start()
        rt = sidecar.routes[0]
        assert os.environ[var] == PASSWORD  # still there after reading

        rotated = pki.intermediate.client("rotated-user")
        new_password = "another-password-for-rotation"
        write_bundle(tmp_path / "staged.pem", rotated, new_password.encode())
        os.replace(tmp_path / "staged.pem", bundle)
        monkeypatch.setenv(var, new_password)
        assert await rt.reload()  # read again: the new value
        assert rt.client.current is not None
        assert rt.client.current.identity.leaf == rotated.cert
        assert os.environ[var] == new_password

        monkeypatch.delenv(var)
        assert not await rt.reload()
        assert rt.last_error is not None and f"{var} is not set" in rt.last_error
        assert rt.client.current is not None
        assert rt.client.current.identity.leaf == rotated.cert  # the last good one stays
    finally:
        await sidecar.close()
