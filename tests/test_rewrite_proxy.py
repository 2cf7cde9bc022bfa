"""Link rewriting through the running proxy (sidecar.rewrite wired into sidecar.proxy)."""

from __future__ import annotations

import gzip
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import route_config


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
