"""Link rewriting through the running proxy (sidecar.forward.rewrite in sidecar.forward.handler)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

import sidecar.forward.pool
from sidecar.config import TLSConfig
from tests.conftest import ROOT, route_config


@pytest.fixture
async def upstream_app(tls_upstream: Any) -> Any:
    """Start an upstream whose handlers know their own public origin."""

    async def start(routes: dict[str, Any]) -> str:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        return str(await tls_upstream(app))

    return start


def origin_of(request: web.Request) -> str:
    return f"https://{request.host}"


async def test_gzip_json_is_rewritten_and_still_valid(
    upstream_app, start_sidecar, bundle_file, ca_file
):
    async def handler(request: web.Request) -> web.Response:
        port = request.host.rsplit(":", 1)[1]
        doc = {
            "d": {
                "results": [
                    {"__metadata": {"uri": f"https://localhost:{port}/odata/v2/User('1')"}}
                ],
                "__next": f"https://localhost:{port}/odata/v2/User?$skiptoken=20",
            }
        }
        body = gzip.compress(json.dumps(doc).encode())
        return web.Response(
            body=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    up = await upstream_app({"/odata/v2/User": handler})
    running = await start_sidecar(route_config(up, bundle_file, ca_file))
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(
            f"{running.url}/odata/v2/User", headers={"Accept-Encoding": "gzip"}
        ) as resp:
            raw = await resp.read()
            headers = resp.headers
    assert resp.status == 200
    # Rewritten bodies go out identity-encoded, with headers to match; a compressed one
    # streams chunked however small (its inflated size is unknown until decoded).
    assert "Content-Encoding" not in headers
    assert "Content-Length" not in headers
    assert headers["Transfer-Encoding"] == "chunked"
    doc = json.loads(raw)
    assert doc["d"]["__next"] == f"{running.url}/odata/v2/User?$skiptoken=20"
    assert doc["d"]["results"][0]["__metadata"]["uri"] == f"{running.url}/odata/v2/User('1')"


@pytest.mark.parametrize("status", [201, 302])
async def test_location_is_rewritten(status, upstream_app, start_sidecar, bundle_file, ca_file):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            status=status,
            headers={
                "Location": f"{origin_of(request)}/odata/v2/User('new')?x=1#f",
                "Content-Location": f"{origin_of(request)}/odata/v2/User('new')",
            },
        )

    up = await upstream_app({"/odata/v2/User": handler})
    running = await start_sidecar(route_config(up, bundle_file, ca_file))
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"{running.url}/odata/v2/User", json={"userId": "new"}, allow_redirects=False
        ) as resp:
            assert resp.status == status
            assert resp.headers["Location"] == f"{running.url}/odata/v2/User('new')?x=1#f"
            assert resp.headers["Content-Location"] == f"{running.url}/odata/v2/User('new')"


async def test_batch_multipart_passes_byte_identical(
    upstream_app, start_sidecar, bundle_file, ca_file
):
    holder: dict[str, bytes] = {}

    async def handler(request: web.Request) -> web.Response:
        body = (
            b"--batch_1\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 200 OK\r\n"
            b"Content-Type: application/json\r\n\r\n"
            + json.dumps({"uri": f"{origin_of(request)}/odata/v2/User('1')"}).encode()
            + b"\r\n--batch_1--\r\n"
        )
        holder["body"] = body
        return web.Response(body=body, content_type="multipart/mixed", charset=None)

    up = await upstream_app({"/odata/v2/$batch": handler})
    running = await start_sidecar(route_config(up, bundle_file, ca_file))
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{running.url}/odata/v2/$batch", data=b"--batch_1--") as resp:
            assert resp.status == 200
            assert await resp.read() == holder["body"]


async def test_set_cookie_is_usable_on_plain_http_localhost(
    upstream_app, start_sidecar, bundle_file, ca_file
):
    async def handler(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "JSESSIONID=abc; Path=/; Secure; HttpOnly")
        response.headers.add("Set-Cookie", "route=xyz; Domain=.sapsf.eu; Path=/; SameSite=Lax")
        return response

    up = await upstream_app({"/x": handler})
    running = await start_sidecar(route_config(up, bundle_file, ca_file))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{running.url}/x") as resp:
            cookies = resp.headers.getall("Set-Cookie")
    assert cookies == ["JSESSIONID=abc; Path=/; HttpOnly", "route=xyz; Path=/; SameSite=Lax"]


async def test_rewrite_links_false_passes_everything_unchanged(
    upstream_app, start_sidecar, bundle_file, ca_file
):
    sent: dict[str, bytes] = {}

    async def handler(request: web.Request) -> web.Response:
        sent["body"] = json.dumps({"uri": f"{origin_of(request)}/x"}).encode()
        return web.Response(
            body=sent["body"],
            content_type="application/json",
            headers={"Location": f"{origin_of(request)}/y"},
        )

    up = await upstream_app({"/x": handler})
    running = await start_sidecar(route_config(up, bundle_file, ca_file, rewrite_links=False))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{running.url}/x", allow_redirects=False) as resp:
            assert await resp.read() == sent["body"]
            assert resp.headers["Location"] == f"{up}/y"
            assert resp.headers["Content-Length"] == str(len(sent["body"]))


# ------------------------------------------------------ compressed bodies, bounded

MiB = 1024 * 1024
BOMB_HOST = "api.bomb.example"  # a rewrite_hosts entry: the bomb's links need no port
BOMB_LINK = f"https://{BOMB_HOST}/odata/v2/User?$skiptoken=1"
BOMB_RSS_BOUND = 16 * MiB
# The sidecar runs in a process of its own, so its memory is measured apart from the
# client and the upstream that share the test's process.
SIDECAR_CHILD = """
import asyncio, sys
from pathlib import Path
from sidecar.config import Config
from sidecar.server import Sidecar
from tests.conftest import route_config

async def main() -> None:
    upstream, bundle, ca, host = sys.argv[1:5]
    route = route_config(upstream, Path(bundle), Path(ca), rewrite_hosts=(host,))
    sidecar = Sidecar(Config(routes=(route,)), env={})
    await sidecar.start()
    print(sidecar.bound_address(sidecar.routes[0]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until closed
    await sidecar.close()

asyncio.run(main())
"""


@functools.lru_cache(maxsize=4)
def json_bomb(size: int) -> bytes:
    """gzip of a JSON document of ``size`` bytes: padding, then one link to rewrite."""
    compressor = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    tail = f'","__next":"{BOMB_LINK}"}}'.encode()
    parts = [compressor.compress(b'{"pad":"')]
    block = b"0" * MiB
    left = size - 8 - len(tail)
    while left > 0:
        parts.append(compressor.compress(block[: min(left, MiB)]))
        left -= MiB
    parts += [compressor.compress(tail), compressor.flush()]
    return b"".join(parts)


class ChildSidecar:
    """The sidecar in a child process; its peak RSS from /proc/PID/status."""

    def __init__(self, upstream: str, bundle: Path, ca: Path) -> None:
        root = ROOT
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SIDECAR_CHILD, upstream, str(bundle), str(ca), BOMB_HOST],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
        )
        assert self.proc.stdout is not None
        self.url = "http://" + self.proc.stdout.readline().decode().strip()

    def status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise LookupError(field)

    def reset_peak(self) -> int:
        """The RSS now, with the high-water mark reset to it when the kernel allows.

        If it cannot be reset, the peak since start counts: a larger growth, never a
        smaller one.
        """
        with contextlib.suppress(OSError):
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
                f.write("5")
        return self.status("VmRSS")

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


async def inflate_through_sidecar(
    upstream_app: Any, bundle_file: Path, ca_file: Path, size: int, framing: str
) -> tuple[int, float]:
    """Send a gzip bomb of ``size`` bytes through a child sidecar: (RSS growth, seconds)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to measure the sidecar's memory")
    bomb = json_bomb(size)

    async def warm(request: web.Request) -> web.Response:
        # small: a large warm-up would leave freed memory that the measured request reuses
        body = gzip.compress(json.dumps({"__next": BOMB_LINK}).encode())
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return web.Response(body=body, headers=headers)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
        if framing == "chunked":
            response.enable_chunked_encoding()
        else:
            response.content_length = len(bomb)
        await response.prepare(request)
        for i in range(0, len(bomb), 64 * 1024):
            await response.write(bomb[i : i + 64 * 1024])
        await response.write_eof()
        return response

    up = await upstream_app({"/bomb": handler, "/warm": warm})
    child = await asyncio.to_thread(ChildSidecar, up, bundle_file, ca_file)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as client:
            # a first request loads every code path the measured one takes
            async with client.get(f"{child.url}/warm") as resp:
                assert await resp.json() == {"__next": f"{child.url}/odata/v2/User?$skiptoken=1"}
            baseline = child.reset_peak()
            started = time.perf_counter()
            received = 0
            tail = b""
            async with client.get(f"{child.url}/bomb") as resp:
                assert resp.status == 200
                assert "Content-Encoding" not in resp.headers
                async for chunk in resp.content.iter_chunked(MiB):
                    received += len(chunk)
                    tail = (tail + chunk)[-200:]
            seconds = time.perf_counter() - started
            growth = child.status("VmHWM") - baseline
    finally:
        await asyncio.to_thread(child.close)
    # the answer is whole, and the link at its very end was rewritten
    local = f'"__next":"{child.url}/odata/v2/User?$skiptoken=1"}}'.encode()
    assert tail.endswith(local), tail
    assert received == size - len(BOMB_LINK) + len(child.url) + len("/odata/v2/User?$skiptoken=1")
    return growth, seconds


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_gzip_bomb_is_inflated_in_bounded_memory(
    upstream_app, bundle_file, ca_file, framing
):
    # 64 MiB from a ~65 KB body: the case (it once peaked at 189 MiB).
    growth, seconds = await inflate_through_sidecar(
        upstream_app, bundle_file, ca_file, 64 * MiB, framing
    )
    print(f"64 MiB bomb ({framing}): sidecar RSS growth {growth / MiB:.1f} MiB, {seconds:.1f}s")
    assert growth <= BOMB_RSS_BOUND


@pytest.mark.slow
async def test_a_1_gib_gzip_bomb_is_inflated_in_bounded_memory(upstream_app, bundle_file, ca_file):
    growth, seconds = await inflate_through_sidecar(
        upstream_app, bundle_file, ca_file, 1024 * MiB, "content-length"
    )
    print(f"1 GiB bomb: sidecar RSS growth {growth / MiB:.1f} MiB, {seconds:.1f}s")
    assert growth <= BOMB_RSS_BOUND


def odata_page(origin: str, n: int) -> bytes:
    """A JSON page of ``n`` entries, each with links to ``origin``."""
    results = [
        {
            "__metadata": {"uri": f"{origin}/odata/v2/User('u{i}')"},
            "manager": {"__deferred": {"uri": f"{origin}/odata/v2/User('u{i}')/manager"}},
        }
        for i in range(n)
    ]
    return json.dumps({"d": {"results": results, "__next": f"{origin}/odata/v2/User?p=2"}}).encode()


@pytest.mark.parametrize(
    "coding, compress",
    [
        ("gzip", gzip.compress),
        ("gzip", lambda b: gzip.compress(b[:70_000]) + gzip.compress(b[70_000:])),  # 2 members
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS)),  # raw, as some send
    ],
    ids=["gzip", "gzip-2-members", "deflate", "raw-deflate"],
)
async def test_compressed_bodies_larger_than_a_piece_are_rewritten_whole(
    upstream_app, start_sidecar, bundle_file, ca_file, coding, compress
):
    # ~400 KB inflated: several decoded pieces, so links straddle piece boundaries.
    sent: dict[str, bytes] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        plain = odata_page(origin_of(request), 2500)
        sent["plain"] = plain
        body = compress(plain)
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Encoding": coding}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(body), 1000):  # small upstream chunks too
            await response.write(body[i : i + 1000])
        await response.write_eof()
        return response

    up = await upstream_app({"/odata/v2/User": handler})
    running = await start_sidecar(route_config(up, bundle_file, ca_file))
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"{running.url}/odata/v2/User") as resp:
            assert resp.status == 200
            got = await resp.read()
    assert len(sent["plain"]) > 6 * 64 * 1024
    assert got == sent["plain"].replace(up.encode(), running.url.encode())


# ------------------------------------------- the origin the client used, port included

UP_HOST = "api.cert.sidecar.test"  # resolved to 127.0.0.1 below; plain twin api.sidecar.test
UP_TWIN = "api.sidecar.test"


class LoopbackResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1, without asking DNS."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["reverse", "reverse-by-name", "http_proxy"])
async def test_links_keep_the_origin_the_client_used_with_its_port(
    upstream_app, start_sidecar, bundle_file, ca_file, monkeypatch, mode
):
    # An upstream on a port other than 443, and links to it spelled every way.
    monkeypatch.setattr(sidecar.forward.pool, "DefaultResolver", LoopbackResolver)
    port: dict[str, int] = {}

    async def handler(request: web.Request) -> web.Response:
        p = port["up"]
        links = {
            "origin": f"https://{UP_HOST}:{p}/odata/v2/User('1')",
            "twin": f"https://{UP_TWIN}:{p}/odata/v2/User('2')",
            # another port is another origin: left alone
            "default_port": f"https://{UP_HOST}:443/odata/v2/User('3')",
            "no_port": f"https://{UP_HOST}/odata/v2/User('4')",
            "host_seen": request.headers["Host"],
        }
        return web.json_response(
            links, headers={"Location": f"https://{UP_HOST}:{p}/odata/v2/User('5')"}
        )

    up = await upstream_app({"/odata/v2/User": handler})
    port["up"] = URL(up).port or 0
    route = route_config(
        f"https://{UP_HOST}:{port['up']}",
        bundle_file,
        ca_file,
        tls=TLSConfig(ca_file=ca_file, server_name="localhost"),
    )
    running = await start_sidecar(route)
    sidecar_port = URL(running.url).port
    async with aiohttp.ClientSession() as client:
        if mode == "http_proxy":
            # absolute-form target: GET http://api.cert.sidecar.test:PORT/... via the proxy
            local = f"http://{UP_HOST}:{port['up']}"
            kwargs: dict[str, Any] = {"proxy": running.url}
        else:
            host = "127.0.0.1" if mode == "reverse" else "localhost"
            local = f"http://{host}:{sidecar_port}"
            kwargs = {}
        async with client.get(f"{local}/odata/v2/User", allow_redirects=False, **kwargs) as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
            location = resp.headers["Location"]
    assert doc["host_seen"] == f"{UP_HOST}:{port['up']}"
    assert doc["origin"] == f"{local}/odata/v2/User('1')"
    assert doc["twin"] == f"{local}/odata/v2/User('2')"
    assert doc["default_port"] == f"https://{UP_HOST}:443/odata/v2/User('3')"
    assert doc["no_port"] == f"https://{UP_HOST}/odata/v2/User('4')"
    assert location == f"{local}/odata/v2/User('5')"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_absolute_form_links_keep_the_targets_port(
    upstream_app, start_sidecar, bundle_file, ca_file, host
):
    # The case, raw: the target names the port, the Host header does not.
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"__next": f"{upstream}/odata/v2/User?$skiptoken=1"})

    up_port = URL(await upstream_app({"/odata/v2/User": handler})).port
    upstream = f"https://{host}:{up_port}"
    running = await start_sidecar(route_config(upstream, bundle_file, ca_file))
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(running.url).port)
    try:
        writer.write(
            f"GET http://{host}:{up_port}/odata/v2/User HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    doc = json.loads(body)
    assert doc["__next"] == f"http://{host}:{up_port}/odata/v2/User?$skiptoken=1"
