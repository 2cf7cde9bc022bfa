"""The forwarding handler end to end: a client, the sidecar and a fake mTLS upstream.

Everything runs on loopback in the test's event loop with real TLS: the
upstream (`tests.support.upstreams.FakeUpstream`) demands the client certificate, the
sidecar presents it. Where aiohttp's client would tidy up what we want to send
(absolute-form targets, CONNECT, ``Expect``, exact percent-encoding), the
tests talk raw HTTP/1.1 over a socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from sidecar.config import InboundConfig
from tests.conftest import NO_CSRF, Running, route_config
from tests.support.raw_http import assert_raw_error, raw, read_response
from tests.support.upstreams import (
    COOKIES,
    GZIP_BODY,
    HOP_BY_HOP_RESPONSE,
    FakeUpstream,
    header_values,
    pattern_chunks,
    pattern_sha256,
)

MiB = 1024 * 1024
TOKEN = "t" * 32


def memory_bound(size: int) -> int:
    """The RSS growth allowed while ``size`` bytes stream through this process.

    The process holds the client, the sidecar and the upstream; buffering the
    body once anywhere costs at least ``size`` (a join, twice that), so half
    of it, capped at 64 MiB, tells streaming from buffering.
    """
    return min(64 * MiB, size // 2)


# --------------------------------------------------------------------- helpers


@dataclass
class Setup:
    """A fake upstream and the sidecar in front of it."""

    fake: FakeUpstream
    upstream: str  # https://localhost:PORT (without any prefix)
    url: str  # http://127.0.0.1:PORT of the sidecar
    running: Running

    @property
    def upstream_port(self) -> int:
        port = URL(self.upstream).port
        assert port is not None
        return port

    @property
    def port(self) -> int:
        port = URL(self.url).port
        assert port is not None
        return port


@pytest.fixture
async def serve(
    tls_upstream: Any, start_sidecar: Any, bundle_file: Path, ca_file: Path
) -> Callable[..., Awaitable[Setup]]:
    """``await serve(prefix="/base", env={...}, **route_overrides)`` → a `Setup`.

    The upstream is a new `FakeUpstream` unless ``upstream`` names another.
    """

    async def start(
        *,
        upstream: str | None = None,
        prefix: str = "",
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Setup:
        fake = FakeUpstream()
        if upstream is None:
            upstream = await tls_upstream(fake.app())
        route = route_config(upstream + prefix, bundle_file, ca_file, **overrides)
        running = await start_sidecar(route, env=env)
        return Setup(fake, upstream, running.url, running)

    return start


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that sends only what a test asks for and leaves bodies alone."""
    async with aiohttp.ClientSession(
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        connector=aiohttp.TCPConnector(limit=0),
    ) as session:
        yield session


@pytest.fixture
async def canned_upstream(pki: Any) -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """An mTLS upstream that answers every request with the same raw bytes.

    For answers an aiohttp server would not send (no Content-Type, a body
    delimited by closing the connection). A request body is not read.
    """
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(answer)
                    await writer.drain()
                    if b"Connection: close" in answer.partition(b"\r\n\r\n")[0]:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_context())
        servers.append(server)
        return f"https://localhost:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def echo(session: aiohttp.ClientSession, method: str, url: str | URL, **kw: Any) -> Any:
    async with session.request(method, url, **kw) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


class PeakRSS:
    """Growth of this process's resident set while a block runs (Linux /proc).

    The kernel's high-water mark (VmHWM) is reset first when it can be;
    otherwise the tests' `sample()` calls keep the maximum seen.
    """

    def __init__(self) -> None:
        self.baseline = 0
        self.peak = 0
        self._hwm_reset = False

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise LookupError(field)

    def __enter__(self) -> PeakRSS:
        if not os.path.exists("/proc/self/status"):
            pytest.skip("needs /proc/self/status to measure memory")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self.baseline = self.peak = self._status("VmRSS")
        return self

    def sample(self) -> None:
        self.peak = max(self.peak, self._status("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self.sample()
        if self._hwm_reset:
            self.peak = max(self.peak, self._status("VmHWM"))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


# ------------------------------------------------------------ method, path, query


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_path_and_query_are_forwarded(serve, client, method):
    s = await serve()
    body = b'{"x": 1}' if method in ("POST", "PUT", "PATCH") else None
    got = await echo(client, method, f"{s.url}/odata/v2/User?$top=2&x=y", data=body)
    assert got["method"] == method
    assert got["path"] == "/odata/v2/User?$top=2&x=y"
    if body is not None:
        assert got["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_upstream_path_prefix_is_kept_in_front(serve, client):
    s = await serve(prefix="/base/api")
    got = await echo(client, "GET", f"{s.url}/odata/v2/User?$top=1")
    assert got["path"] == "/base/api/odata/v2/User?$top=1"


async def test_percent_encoding_is_preserved_byte_for_byte(serve):
    s = await serve(prefix="/base")
    target = b"/a%2Fb/c%20d/%7e%C3%A9?q=%2F%3F%26&r=a+b&s=%2b"
    (answer,) = await raw(s.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 200
    assert answer.json()["path"] == "/base" + target.decode()


async def test_route_query_is_added_when_the_client_did_not_send_it(serve, client):
    s = await serve(query={"$format": "json", "lang": "en"})
    got = await echo(client, "GET", URL(f"{s.url}/p", encoded=True))
    assert parse_qsl(urlsplit(got["path"]).query) == [("$format", "json"), ("lang", "en")]

    got = await echo(client, "GET", URL(f"{s.url}/p?x=1", encoded=True))
    assert parse_qsl(urlsplit(got["path"]).query) == [
        ("x", "1"),
        ("$format", "json"),
        ("lang", "en"),
    ]


async def test_a_client_query_value_wins_over_the_routes(serve, client):
    s = await serve(query={"$format": "json", "lang": "en"})
    # %24 is "$": the same name, however it is spelled.
    got = await echo(client, "GET", URL(f"{s.url}/p?lang=de&%24format=xml", encoded=True))
    path, _, query = got["path"].partition("?")
    assert path == "/p"
    assert query == "lang=de&%24format=xml"  # kept as sent, nothing added


async def test_route_query_name_is_compared_after_one_decoding_only(serve, client):
    s = await serve(query={"$top": "5"})
    got = await echo(client, "GET", URL(f"{s.url}/p?%2524top=1", encoded=True))
    assert got["path"] == "/p?%2524top=1&$top=5"


# --------------------------------------------------------------------- headers


async def test_hop_by_hop_request_headers_are_dropped(serve):
    s = await serve()
    (answer,) = await raw(
        s.port,
        b"GET /h HTTP/1.1\r\nHost: x\r\n"
        b"Connection: keep-alive, X-Foo\r\n"
        b"X-Foo: named by Connection\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Multi: 1\r\nX-Multi: 2\r\n"
        b"\r\n",
    )
    assert answer.status == 200
    got = answer.json()
    names = {k.lower() for k, _ in got["headers"]}
    for dropped in (
        "x-foo",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ):
        assert dropped not in names, got["headers"]
    assert all("x-foo" not in v.lower() for v in header_values(got, "Connection"))
    assert header_values(got, "X-Multi") == ["1", "2"]


async def test_hop_by_hop_response_headers_are_dropped(serve, client):
    s = await serve()
    async with client.get(f"{s.url}/hop-by-hop") as resp:
        assert resp.status == 200
        assert await resp.read() == b"ok"
        headers = resp.headers
    for name, _ in HOP_BY_HOP_RESPONSE:
        if name != "Connection":
            assert name not in headers, dict(headers)
    assert "Transfer-Encoding" not in headers  # the upstream sent a Content-Length
    assert all("x-hop" not in v.lower() for v in headers.getall("Connection", []))
    assert headers["X-Kept"] == "yes"


async def test_host_becomes_the_upstreams(serve, client):
    s = await serve(prefix="/base")
    got = await echo(client, "GET", f"{s.url}/h", headers={"Host": "evil.example"})
    assert header_values(got, "Host") == [f"localhost:{s.upstream_port}"]


async def test_company_id_from_the_route_replaces_the_clients(serve, client):
    s = await serve(company_id="ACME1234")
    headers = CIMultiDict(
        [("successfactors-companyid", "EVIL"), ("SuccessFactors-CompanyID", "EVIL2")]
    )
    got = await echo(client, "GET", f"{s.url}/h", headers=headers)
    assert header_values(got, "successfactors-companyid") == ["ACME1234"]


async def test_route_headers_are_set_replacing_the_clients(serve, client):
    s = await serve(headers={"X-Extra": "from-route", "Accept-Language": "en-US"})
    got = await echo(
        client, "GET", f"{s.url}/h", headers={"x-extra": "from-client", "X-Other": "kept"}
    )
    assert header_values(got, "X-Extra") == ["from-route"]
    assert header_values(got, "Accept-Language") == ["en-US"]
    assert header_values(got, "X-Other") == ["kept"]


async def test_sidecar_token_header_is_not_forwarded(serve, client):
    s = await serve()
    got = await echo(client, "GET", f"{s.url}/h", headers={"X-Sidecar-Token": TOKEN})
    assert header_values(got, "X-Sidecar-Token") == []


async def test_request_id_is_passed_on_and_returned(serve, client):
    s = await serve()
    async with client.get(f"{s.url}/h", headers={"X-Request-ID": "abc-123"}) as resp:
        got = await resp.json()
        assert resp.headers["X-Request-ID"] == "abc-123"
    assert header_values(got, "X-Request-ID") == ["abc-123"]


async def test_request_id_is_generated_and_returned_when_missing(serve, client):
    s = await serve()
    seen = set()
    for _ in range(2):
        async with client.get(f"{s.url}/h") as resp:
            got = await resp.json()
            returned = resp.headers["X-Request-ID"]
        assert header_values(got, "X-Request-ID") == [returned]
        assert len(returned) >= 16
        seen.add(returned)
    assert len(seen) == 2


async def test_every_set_cookie_header_reaches_the_client(serve, client):
    s = await serve()
    async with client.get(f"{s.url}/cookies") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == list(COOKIES)


async def test_no_headers_are_added_that_the_client_did_not_send(serve, client):
    s = await serve(company_id=None, rewrite_links=False)
    got = await echo(client, "GET", f"{s.url}/h")
    names = {k.lower() for k, _ in got["headers"]}
    assert names <= {"host", "x-request-id", "connection"}, got["headers"]

    got = await echo(
        client, "GET", f"{s.url}/h", headers={"User-Agent": "curl/8.5", "Accept-Encoding": "br"}
    )
    assert header_values(got, "User-Agent") == ["curl/8.5"]
    assert header_values(got, "Accept-Encoding") == ["br"]


async def test_rewriting_asks_only_for_encodings_it_can_decode(serve, client):
    s = await serve()  # rewrite_links is on by default
    got = await echo(client, "GET", f"{s.url}/h", headers={"Accept-Encoding": "gzip, deflate, br"})
    assert header_values(got, "Accept-Encoding") == ["gzip, deflate"]


async def test_a_header_value_that_is_not_utf8_is_not_altered_silently(serve):
    s = await serve()
    (answer,) = await raw(s.port, b"GET /h HTTP/1.1\r\nHost: x\r\nX-Name: Jos\xe9\r\n\r\n")
    if answer.status == 400:
        assert_raw_error(answer.status, answer.headers, answer.body, "bad_request", 400)
        return
    assert answer.status == 200
    # The echo decodes header bytes as UTF-8 with surrogateescape, like the sidecar.
    assert header_values(answer.json(), "X-Name") == ["Jos\udce9"]


# ---------------------------------------------------------------------- bodies


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_50_mib_download_streams_in_bounded_memory(serve, client, framing):
    size = 50 * MiB
    expected = pattern_sha256(size)
    s = await serve()
    query = "?chunked=1" if framing == "chunked" else ""
    digest = hashlib.sha256()
    received = 0
    with PeakRSS() as rss:
        async with client.get(f"{s.url}/bytes/{size}{query}") as resp:
            assert resp.status == 200
            if framing == "chunked":
                assert resp.headers["Transfer-Encoding"] == "chunked"
                assert "Content-Length" not in resp.headers
            else:
                assert resp.headers["Content-Length"] == str(size)
            async for chunk in resp.content.iter_chunked(256 * 1024):
                digest.update(chunk)
                received += len(chunk)
                if received % (4 * MiB) < len(chunk):
                    rss.sample()
    assert received == size
    assert digest.hexdigest() == expected
    print(f"download {framing}: {size} bytes, RSS growth {rss.growth / MiB:.1f} MiB")
    assert rss.growth < memory_bound(size)


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_20_mib_upload_streams_in_bounded_memory(serve, client, framing):
    size = 20 * MiB
    expected = pattern_sha256(size)
    s = await serve()

    async def body() -> AsyncIterator[bytes]:
        for i, chunk in enumerate(pattern_chunks(size)):
            if i % 64 == 0:
                rss.sample()
            yield chunk

    headers = {"Content-Length": str(size)} if framing == "content-length" else {}
    with PeakRSS() as rss:
        got = await echo(client, "POST", f"{s.url}/upload", data=body(), headers=headers)
    assert got["length"] == size
    assert got["sha256"] == expected
    if framing == "chunked":
        assert got["transfer_encoding"] == "chunked"
    else:
        assert got["content_length"] == str(size)
    print(f"upload {framing}: {size} bytes, RSS growth {rss.growth / MiB:.1f} MiB")
    assert rss.growth < memory_bound(size)


async def test_gzip_body_passes_through_byte_identical(serve, client):
    s = await serve()
    async with client.get(f"{s.url}/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == GZIP_BODY


async def test_head_keeps_the_content_length_and_sends_no_body(serve):
    s = await serve()
    head, get = await raw(
        s.port,
        b"HEAD /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert head.status == 200
    assert head.headers["Content-Length"] == "1000"
    assert "Transfer-Encoding" not in head.headers
    # Had the HEAD answer carried a body, it would be read as this answer.
    assert get.status == 200
    assert get.body == b"".join(pattern_chunks(10))


@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses_are_answered_without_a_body(serve, code):
    s = await serve()
    answer, after = await raw(
        s.port,
        f"GET /status/{code} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert answer.status == code
    assert "Transfer-Encoding" not in answer.headers
    assert answer.headers.get("Content-Length", "0") == "0"
    if code == 304:
        assert answer.headers["ETag"] == '"v1"'
    assert after.status == 200
    assert after.json()["path"] == "/after"


async def test_expect_100_continue_upload(serve):
    s = await serve()
    body = b"".join(pattern_chunks(100_000))
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    try:
        async with asyncio.timeout(20):
            writer.write(
                b"PUT /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            await writer.drain()
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(body)
            await writer.drain()
            answer = await read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.status == 200
    assert answer.json()["sha256"] == hashlib.sha256(body).hexdigest()


async def test_expect_100_continue_is_not_forwarded(serve, client):
    s = await serve()
    got = await echo(client, "POST", f"{s.url}/e", data=b"x" * 1000, expect100=True)
    assert got["body_length"] == 1000
    assert header_values(got, "Expect") == []


async def test_http10_client_gets_a_chunked_upstream_body_complete(serve):
    s = await serve()
    (answer,) = await raw(s.port, b"GET /bytes/300000?chunked=1 HTTP/1.0\r\n\r\n")
    assert answer.status == 200
    assert "chunked" not in answer.headers.get("Transfer-Encoding", "")
    assert hashlib.sha256(answer.body).hexdigest() == pattern_sha256(300_000)


async def test_close_delimited_upstream_body_reaches_the_client_complete(serve, canned_upstream):
    body = b"".join(pattern_chunks(MiB))
    upstream = await canned_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Connection: close\r\n\r\n" + body
    )
    s = await serve(upstream=upstream)
    for _ in range(2):  # the sidecar's connection to the client survives it
        async with aiohttp.ClientSession() as session, session.get(f"{s.url}/eof") as resp:
            assert resp.status == 200
            assert await resp.read() == body


async def test_no_content_type_is_invented_for_the_client(serve, canned_upstream):
    upstream = await canned_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    s = await serve(upstream=upstream)
    (answer,) = await raw(s.port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.body == b"ok"
    assert "Content-Type" not in answer.headers
    assert "Server" not in answer.headers  # nor a Server the upstream did not send


async def test_a_client_leaving_mid_download_does_not_disturb_the_next(serve, client):
    s = await serve()
    size = 50 * MiB
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(20):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(MiB)
    writer.close()
    await writer.wait_closed()
    for i in range(3):
        got = await echo(client, "GET", f"{s.url}/next/{i}")
        assert got["path"] == f"/next/{i}"


# ----------------------------------------------------------------- concurrency


async def test_200_concurrent_requests_each_get_their_own_answer(serve, client):
    s = await serve(session=NO_CSRF)

    async def one(i: int) -> None:
        rid = f"req-{i}-{uuid.uuid4().hex}"
        async with client.post(
            f"{s.url}/c/{i}?i={i}", data=rid.encode(), headers={"X-Request-ID": rid}
        ) as resp:
            got = await resp.json()
            assert resp.headers["X-Request-ID"] == rid
        assert got["path"] == f"/c/{i}?i={i}"
        assert header_values(got, "X-Request-ID") == [rid]
        assert got["body_sha256"] == hashlib.sha256(rid.encode()).hexdigest()

    await asyncio.gather(*(one(i) for i in range(200)))
    assert s.fake.requests == 200


async def test_new_client_connections_reuse_a_few_upstream_connections(serve):
    s = await serve()
    for i in range(50):
        # A new session (and so a new TCP connection to the sidecar) every time,
        # the way curl or a script calls it.
        async with aiohttp.ClientSession() as session:
            got = await echo(session, "GET", f"{s.url}/n/{i}", headers={"Connection": "close"})
            assert got["path"] == f"/n/{i}"
    resumed = sum(s.fake.connections.values())
    print(f"50 requests over {len(s.fake.connections)} upstream connection(s), {resumed} resumed")
    assert s.fake.requests == 50
    assert len(s.fake.connections) <= 3


async def test_new_upstream_connections_resume_the_tls_session(
    tls_upstream, start_sidecar, bundle_file, ca_file, client
):
    fake = FakeUpstream(keep_alive=False)
    upstream = await tls_upstream(fake.app())
    running = await start_sidecar(route_config(upstream, bundle_file, ca_file))
    for i in range(5):
        got = await echo(client, "GET", f"{running.url}/r/{i}")
        assert got["path"] == f"/r/{i}"
    resumed = list(fake.connections.values())
    print(f"5 requests, upstream closing each: {len(resumed)} connections, {sum(resumed)} resumed")
    assert len(resumed) == 5
    assert resumed[1:] == [True] * 4, resumed


# --------------------------------------------------------- absolute-form targets


async def test_absolute_form_target_for_the_upstream_host_is_forwarded(serve):
    s = await serve(prefix="/base")
    authority = f"localhost:{s.upstream_port}".encode()
    (answer,) = await raw(
        s.port,
        b"GET http://" + authority + b"/x/a%2Fb?y=1 HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n",
    )
    assert answer.status == 200, answer.body
    assert answer.json()["path"] == "/base/x/a%2Fb?y=1"


async def test_absolute_form_target_with_an_empty_path_is_forwarded_as_root(serve):
    s = await serve()
    authority = f"localhost:{s.upstream_port}".encode()
    (answer,) = await raw(
        s.port, b"GET http://" + authority + b"?a=1 HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n"
    )
    assert answer.status == 200, answer.body
    assert answer.json()["path"] == "/?a=1"


@pytest.mark.parametrize(
    "target, host",
    [
        ("http://example.com/x", "example.com"),
        ("https://example.com:443/x", "example.com"),
        ("http://localhost:{other}/x", "localhost:{other}"),
        # the Host header must not launder another target
        ("http://example.com/x", "localhost:{upstream}"),
        ("http://example.com", "example.com"),
    ],
)
async def test_absolute_form_target_for_another_host_is_forbidden(serve, target, host):
    s = await serve()
    ports = {"upstream": s.upstream_port, "other": s.upstream_port + 1}
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".format(**ports).encode()
    (answer,) = await raw(s.port, request)
    assert_raw_error(answer.status, answer.headers, answer.body, "forbidden_target", 403)
    assert s.fake.requests == 0


@pytest.mark.parametrize("authority", ["example.com:443", "localhost:{upstream}"])
async def test_connect_is_forbidden(serve, authority):
    s = await serve()
    authority = authority.format(upstream=s.upstream_port)
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    (answer,) = await raw(s.port, request)
    assert_raw_error(answer.status, answer.headers, answer.body, "forbidden_target", 403)
    assert s.fake.requests == 0


# --------------------------------------------------------------- inbound token


@pytest.mark.parametrize("sent", [None, "", "wrong", TOKEN[:-1], TOKEN + "x"])
async def test_inbound_token_missing_or_wrong_is_refused(serve, client, sent):
    s = await serve(inbound=InboundConfig(token_env="TOK"), env={"TOK": TOKEN})
    headers = {} if sent is None else {"X-Sidecar-Token": sent}
    async with client.get(f"{s.url}/h", headers=headers) as resp:
        body = await resp.read()
        assert_raw_error(resp.status, resp.headers, body, "inbound_auth_required", 401)
    assert TOKEN.encode() not in body
    assert s.fake.requests == 0


async def test_inbound_token_right_is_forwarded_without_it(serve, client):
    s = await serve(inbound=InboundConfig(token_env="TOK"), env={"TOK": TOKEN})
    got = await echo(client, "GET", f"{s.url}/h", headers={"X-Sidecar-Token": TOKEN})
    assert got["path"] == "/h"
    assert header_values(got, "X-Sidecar-Token") == []


@pytest.mark.parametrize("endpoint", ["health", "ready"])
async def test_health_and_ready_need_no_token(serve, client, endpoint):
    s = await serve(inbound=InboundConfig(token_env="TOK"), env={"TOK": TOKEN})
    async with client.get(f"{s.url}/-/{endpoint}") as resp:
        assert resp.status == 200


# ----------------------------------------------------------------------- admin


async def test_health_answers_ok(serve, client):
    s = await serve()
    async with client.get(f"{s.url}/-/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    assert s.fake.requests == 0


async def test_ready_answers_200_while_the_certificate_is_valid(serve, client):
    s = await serve()
    async with client.get(f"{s.url}/-/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    assert s.fake.requests == 0


# ---------------------------------------------------------------------- errors


async def test_asterisk_form_target_is_a_bad_request(serve):
    s = await serve()
    (answer,) = await raw(s.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert_raw_error(answer.status, answer.headers, answer.body, "bad_request", 400)
    assert s.fake.requests == 0


MALFORMED = [
    b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET //evil.example/x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://localhost:99999/x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http:///x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: [bad\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nX-Request-ID: \x01\x02\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + b"r" * 5000 + b"\r\n\r\n",
    b"GET /x HTTP/1.0\r\n\r\n",
    b"NOTAMETHOD /x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n",
]


async def test_no_answer_ever_carries_a_traceback(serve):
    # aiohttp puts the traceback of an unhandled error in its 500 page when
    # the loop runs in debug mode, so run the sidecar like that.
    asyncio.get_running_loop().set_debug(True)
    try:
        s = await serve()
        statuses = {}
        for request in MALFORMED:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(request)
            await writer.drain()
            async with asyncio.timeout(10):
                answer = await read_response(reader)
            writer.close()
            await writer.wait_closed()
            assert b"Traceback" not in answer.body, (request, answer.body)
            statuses[request[:60]] = answer.status
        print(statuses)
        assert 500 not in statuses.values(), statuses
    finally:
        asyncio.get_running_loop().set_debug(False)


async def test_a_malformed_request_is_answered_with_the_json_bad_request(serve):
    s = await serve()
    (answer,) = await raw(s.port, b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert_raw_error(answer.status, answer.headers, answer.body, "bad_request", 400)


async def test_a_token_that_is_not_utf8_is_refused_not_crashed(serve):
    asyncio.get_running_loop().set_debug(True)
    try:
        s = await serve(inbound=InboundConfig(token_env="TOK"), env={"TOK": TOKEN})
        (answer,) = await raw(
            s.port, b"GET /x HTTP/1.1\r\nHost: x\r\nX-Sidecar-Token: t\xff\r\n\r\n"
        )
    finally:
        asyncio.get_running_loop().set_debug(False)
    assert b"Traceback" not in answer.body
    assert_raw_error(answer.status, answer.headers, answer.body, "inbound_auth_required", 401)
    assert s.fake.requests == 0
