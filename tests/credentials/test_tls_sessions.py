"""TLS session resumption towards the upstream (sidecar.credentials.tls_sessions)."""

from __future__ import annotations

import ssl

import aiohttp
import pytest
from aiohttp import web

from sidecar.forward.listener import bound_port
from tests.conftest import PKI, route_config


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_new_upstream_connections_resume_the_session(
    version, pki: PKI, start_sidecar, bundle_file, ca_file
):
    seen: list[tuple[bool, str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        peer = ssl_object.getpeercert()
        subject = dict(x[0] for x in peer["subject"])["commonName"] if peer else ""
        seen.append((ssl_object.session_reused, ssl_object.version(), subject))
        # Closing after each answer forces a new upstream connection per request.
        return web.json_response({}, headers={"Connection": "close"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = pki.server_context()
    ctx.maximum_version = version
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        running = await start_sidecar(
            route_config(f"https://localhost:{bound_port(site)}", bundle_file, ca_file)
        )
        async with aiohttp.ClientSession() as client:
            for _ in range(5):
                async with client.get(running.url + "/x") as resp:
                    assert resp.status == 200
    finally:
        await runner.cleanup()
    assert len(seen) == 5
    assert [reused for reused, _, _ in seen] == [False, True, True, True, True]
    assert {v for _, v, _ in seen} == {version.name.replace("v1_", "v1.")}
    # The client certificate is known to the server on resumed sessions too.
    assert {s for _, _, s in seen} == {"sidecar-technical-user"}
