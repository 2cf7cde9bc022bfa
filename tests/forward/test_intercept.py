"""Interception on a route's listener: ``/-/intercept.pem``, CONNECT, TLS inside the tunnel.

Each test starts the sidecar in front of the demo's fake SuccessFactors
(sidecar.demo.app.fake_successfactors, over real mTLS) with interception on
and its certificate kept in the test's folder. Clients verify that
certificate: nothing here turns verification off.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from multidict import CIMultiDict

from sidecar.config import InboundConfig, InterceptConfig, LimitsConfig, RouteConfig
from sidecar.demo.app import FakeUpstream, demo_config, fake_successfactors
from sidecar.intercept.certificate import route_certificates
from tests.conftest import Running, free_port
from tests.support.answers import assert_sidecar_error, fetch
from tests.support.raw_http import RawResponse, assert_raw_error, read_response

TOKEN = "i" * 32
USERS = 45  # what the fake SuccessFactors serves, 20 a page


@dataclass
class Intercepting:
    running: Running
    route: RouteConfig
    upstream: FakeUpstream

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])

    @property
    def cert_file(self) -> Path:
        return route_certificates(self.route, 0).current().cert_path


@pytest.fixture
async def fake_sf(tmp_path: Path) -> AsyncIterator[FakeUpstream]:
    async with fake_successfactors(tmp_path / "sf") as upstream:
        yield upstream


@pytest.fixture
def intercepting(
    fake_sf: FakeUpstream, start_sidecar: Any, tmp_path: Path
) -> Callable[..., Awaitable[Intercepting]]:
    """``await intercepting(enabled=True, token=False, **route_overrides)``."""

    async def start(*, enabled: bool = True, token: bool = False, **overrides: Any) -> Intercepting:
        (demo_route,) = demo_config(fake_sf, 0).routes
        if token:
            overrides["inbound"] = InboundConfig(token_env="SIDECAR_TEST_TOKEN")
        route = dataclasses.replace(
            demo_route,
            name="sf",
            intercept=InterceptConfig(enabled=enabled, cert_dir=tmp_path / "state"),
            **overrides,
        )
        env = {"SIDECAR_TEST_TOKEN": TOKEN} if token else {}
        running = await start_sidecar(route, env=env)
        return Intercepting(running, route, fake_sf)

    return start


# ------------------------------------------------------------ /-/intercept.pem


async def test_intercept_pem_is_the_certificate_without_a_token(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting(token=True)
    answer = await fetch(f"{setup.url}/-/intercept.pem")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/x-pem-file"
    assert answer.body == setup.cert_file.read_bytes()
    (cert,) = x509.load_pem_x509_certificates(answer.body)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert b"PRIVATE KEY" not in answer.body
    head = await fetch(f"{setup.url}/-/intercept.pem", "HEAD")
    assert head.status == 200 and head.body == b""
    # status still needs the token
    assert_sidecar_error(await fetch(f"{setup.url}/-/status"), "inbound_auth_required")


async def test_intercept_pem_is_404_when_interception_is_off(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting(enabled=False)
    error = assert_sidecar_error(await fetch(f"{setup.url}/-/intercept.pem"), "not_found")
    assert "interception is off for route sf" in error["message"]
    assert "intercept" in error["hint"]
    assert setup.route.intercept.cert_dir is not None
    assert not setup.route.intercept.cert_dir.exists()  # nothing made when off


# ------------------------------------------------------------------ helpers


def trusting(cert_file: Path) -> ssl.SSLContext:
    """A client context that trusts the interception certificate (and verifies names)."""
    return ssl.create_default_context(cafile=str(cert_file))


@dataclass
class Connected:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answer: RawResponse

    async def close(self) -> None:
        self.writer.close()
        with _quietly():
            await self.writer.wait_closed()


def _quietly() -> Any:
    import contextlib

    return contextlib.suppress(ConnectionError, ssl.SSLError)


async def connect(port: int, target: str, headers: str = "") -> Connected:
    """Send ``CONNECT target`` and read the answer (a 200 has no body: RFC 9110 9.3.6)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            fields.add(name.strip(), value.strip())
    status = int(status_line.split()[1])
    body = b"" if status == 200 else await reader.readexactly(int(fields["Content-Length"]))
    return Connected(reader, writer, RawResponse(status, fields, body))


async def closed(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """The sidecar closed the connection (EOF or reset), within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


def get(path: str, host: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def basic(password: str) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(f"me:{password}".encode()).decode()


# ------------------------------------------------------------------ serving


async def test_an_https_client_pages_through_the_upstream_with_its_own_links(
    intercepting: Callable[..., Awaitable[Intercepting]], caplog: pytest.LogCaptureFixture
) -> None:
    setup = await intercepting()
    upstream = setup.upstream.url  # https://localhost:PORT, the upstream's own name
    ctx = trusting(setup.cert_file)
    seen: list[str] = []
    url: str | None = f"{upstream}/odata/v2/User?$format=json"
    with caplog.at_level(logging.INFO, logger="sidecar.access"):
        async with aiohttp.ClientSession() as session:
            while url is not None:
                async with session.get(url, proxy=setup.url, ssl=ctx) as resp:
                    assert resp.status == 200, await resp.text()
                    assert resp.headers["X-Request-ID"]
                    d = (await resp.json())["d"]
                seen += [u["userId"] for u in d["results"]]
                for user in d["results"]:  # no link rewriting inside the tunnel
                    assert user["__metadata"]["uri"].startswith(f"{upstream}/odata/v2/User(")
                url = d.get("__next")
                assert url is None or url.startswith(f"{upstream}/odata/v2/User?")
    assert len(seen) == len(set(seen)) == USERS
    lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.access"]
    connects = [line for line in lines if " CONNECT " in line]
    assert len(connects) == 1 and f"localhost:{setup.upstream.port} 200" in connects[0]
    assert len([line for line in lines if " GET /odata/v2/User" in line]) == 3  # keep-alive
    assert setup.running.sidecar.routes[0].stats.requests == 4


async def test_tls_inside_offers_http11_only_and_serves_keep_alive(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting()
    target = f"localhost:{setup.upstream.port}"
    tunnel = await connect(setup.port, target)
    assert tunnel.answer.status == 200 and tunnel.answer.headers == CIMultiDict()
    ctx = trusting(setup.cert_file)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    await tunnel.writer.start_tls(ctx, server_hostname="localhost")
    tls = tunnel.writer.get_extra_info("ssl_object")
    assert tls.selected_alpn_protocol() == "http/1.1"
    for _ in range(3):
        tunnel.writer.write(get("/odata/v2/User?$top=1&$format=json", target))
        answer = await read_response(tunnel.reader)
        assert answer.status == 200 and len(answer.json()["d"]["results"]) == 1
    # a CONNECT inside the tunnel is never served
    tunnel.writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    refused = await read_response(tunnel.reader)
    assert_raw_error(refused.status, refused.headers, refused.body, "forbidden_target", 403)
    await tunnel.close()


# ------------------------------------------------------------------ refusals


async def test_connect_to_anything_but_an_upstream_name_is_403(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting(rewrite_hosts=("extra.example.com",))
    port = setup.upstream.port
    for target in (
        "example.com:443",
        f"localhost:{free_port()}",  # the upstream's host, another port
        f"127.0.0.1:{port}",  # an IP literal that is not the upstream's name
        f"[::1]:{port}",
        "extra.example.com:8443",  # a rewrite_hosts name on another port than its own
        "localhost",  # no port
        f"localhost.:{port}",
        f"localhost:{port}@example.com:443",
    ):
        tunnel = await connect(setup.port, target)
        answer = tunnel.answer
        assert_raw_error(answer.status, answer.headers, answer.body, "forbidden_target", 403)
        message = json.loads(answer.body)["error"]["message"]
        assert "is not served: only the route's upstream names are" in message, target
        assert f"localhost:{port}, extra.example.com:443" in message
        assert await closed(tunnel.reader), target
        await tunnel.close()
    for target in (f"LOCALHOST:{port}", "extra.example.com:443"):
        tunnel = await connect(setup.port, target)
        assert tunnel.answer.status == 200, target
        await tunnel.close()


async def test_connect_is_403_when_interception_is_off(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting(enabled=False)
    tunnel = await connect(setup.port, f"localhost:{setup.upstream.port}")
    answer = tunnel.answer
    assert_raw_error(answer.status, answer.headers, answer.body, "forbidden_target", 403)
    error = json.loads(answer.body)["error"]
    assert "CONNECT tunnels are not served" in error["message"]
    assert "intercept.enabled" in error["hint"] and "--intercept" in error["hint"]
    assert await closed(tunnel.reader)
    await tunnel.close()


async def test_connect_needs_the_token_as_header_or_proxy_password(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting(token=True)
    target = f"localhost:{setup.upstream.port}"
    for headers in ("", f"X-Sidecar-Token: {'x' * 32}\r\n", basic("x" * 32) + "\r\n",
                    f"Proxy-Authorization: Bearer {TOKEN}\r\n"):  # fmt: skip
        tunnel = await connect(setup.port, target, headers)
        answer = tunnel.answer
        assert_raw_error(answer.status, answer.headers, answer.body, "inbound_auth_required", 401)
        assert "Proxy-Authorization: Basic" in json.loads(answer.body)["error"]["message"]
        assert await closed(tunnel.reader)
        await tunnel.close()
    for headers in (f"X-Sidecar-Token: {TOKEN}\r\n", basic(TOKEN) + "\r\n"):
        tunnel = await connect(setup.port, target, headers)
        assert tunnel.answer.status == 200
        await tunnel.writer.start_tls(trusting(setup.cert_file), server_hostname="localhost")
        # inside, requests need no token: the tunnel had it
        tunnel.writer.write(get("/odata/v2/User?$top=1&$format=json", target))
        assert (await read_response(tunnel.reader)).status == 200
        await tunnel.close()
    # the same through aiohttp's proxy support, the token in the proxy URL
    proxy = setup.url.replace("http://", f"http://me:{TOKEN}@")
    async with aiohttp.ClientSession() as session:
        url = f"{setup.upstream.url}/odata/v2/User?$top=2&$format=json"
        async with session.get(url, proxy=proxy, ssl=trusting(setup.cert_file)) as resp:
            assert resp.status == 200


async def test_plain_http_inside_the_tunnel_is_refused_and_closed(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting()
    target = f"localhost:{setup.upstream.port}"
    tunnel = await connect(setup.port, target)
    tunnel.writer.write(get("/odata/v2/User", target))
    answer = await read_response(tunnel.reader)
    assert_raw_error(answer.status, answer.headers, answer.body, "bad_request", 400)
    error = json.loads(answer.body)["error"]
    assert (
        error["message"] == f"the CONNECT tunnel to {target} carries TLS only, and this is not TLS"
    )
    assert "http_proxy" in error["hint"]
    assert answer.headers["Connection"] == "close"
    assert await closed(tunnel.reader)
    await tunnel.close()


async def test_tls_for_another_name_inside_the_tunnel_is_refused(
    intercepting: Callable[..., Awaitable[Intercepting]], caplog: pytest.LogCaptureFixture
) -> None:
    setup = await intercepting()
    target = f"localhost:{setup.upstream.port}"
    # a client that verifies refuses the certificate: it does not name www.example.com
    tunnel = await connect(setup.port, target)
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await tunnel.writer.start_tls(trusting(setup.cert_file), server_hostname="www.example.com")
    await tunnel.close()
    # one that does not verify gets the connection closed before any request is served
    tunnel = await connect(setup.port, target)
    blind = ssl.create_default_context()
    blind.check_hostname = False
    blind.verify_mode = ssl.CERT_NONE
    with caplog.at_level(logging.INFO, logger="sidecar.listener"):
        await tunnel.writer.start_tls(blind, server_hostname="www.example.com")
        tunnel.writer.write(get("/odata/v2/User", "www.example.com"))
        assert await closed(tunnel.reader)
    assert "the TLS inside is for 'www.example.com'" in caplog.text
    await tunnel.close()


async def test_a_slow_or_missing_handshake_is_cut_at_the_header_timeout(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting(limits=LimitsConfig(header_timeout=0.3))
    target = f"localhost:{setup.upstream.port}"
    loop = asyncio.get_running_loop()
    for first in (b"", b"\x16\x03\x01\x02\x00\x01"):  # nothing; a ClientHello that stalls
        tunnel = await connect(setup.port, target)
        assert tunnel.answer.status == 200
        started = loop.time()
        tunnel.writer.write(first)
        assert await closed(tunnel.reader, within=3.0)
        assert loop.time() - started < 2.0
        await tunnel.close()


async def test_bytes_before_the_200_close_the_tunnel(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting()
    target = f"localhost:{setup.upstream.port}"
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n\x16\x03\x01".encode())
    assert await closed(reader)
    writer.close()
    await writer.wait_closed()
