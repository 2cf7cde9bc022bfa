"""Soak: many connections, mixed requests and a certificate rotation, zero failures.

The short version runs in CI (SIDECAR_SOAK_SECONDS, default 12 s); the long one
is marked ``slow`` (``pytest -m slow``, SIDECAR_SOAK_LONG_SECONDS, default 300 s).
The sidecar runs as its own process; bounds: no failed request; after the
load, its open file descriptors within 10 of the level before it plus the
pooled keep-alive upstream connections (at most one per client connection),
and its RSS grown by less than 64 MiB.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import PKI, free_port

LARGE = 1024 * 1024
CONNECTIONS = 50
WARM_UP = 3.0  # seconds of the same load before the measured soak
LARGE_BODY = bytes(range(256)) * (LARGE // 256)
LARGE_SHA = hashlib.sha256(LARGE_BODY).hexdigest()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soak_app(serials: list[int]) -> web.Application:
    def note(request: web.Request) -> None:
        ssl_object = request.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        serials.append(int(ssl_object.getpeercert()["serialNumber"], 16))

    async def small(request: web.Request) -> web.Response:
        note(request)
        return web.json_response({"d": {"results": [{"userId": "u1", "pad": "x" * 200}]}})

    async def large(request: web.Request) -> web.StreamResponse:
        note(request)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = LARGE
        await response.prepare(request)
        for i in range(0, LARGE, 64 * 1024):
            await response.write(LARGE_BODY[i : i + 64 * 1024])
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.Response:
        note(request)
        await asyncio.sleep(0.3)
        return web.json_response({"slow": True})

    async def upload(request: web.Request) -> web.Response:
        note(request)
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        return web.json_response({"sha256": digest.hexdigest()})

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/large", large)
    app.router.add_get("/slow", slow)
    app.router.add_post("/upload", upload)
    return app


async def soak(seconds: float, pki: PKI, tmp_path: Path, tls_upstream) -> None:
    """The sidecar runs as its own process (`mtls-sidecar run`), so its fds and RSS are its own."""
    serials: list[int] = []
    upstream = await tls_upstream(soak_app(serials))
    bundle = tmp_path / "client-bundle.pem"
    bundle.write_bytes(pki.client.btp_bundle())
    bundle.chmod(0o600)
    (tmp_path / "ca.pem").write_bytes(pki.root.cert_pem())
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"log: {{level: warning, access_log: false}}\n"
        f"routes:\n  - listen: 127.0.0.1:{port}\n    upstream: {upstream}\n"
        f"    credentials: {{pem: client-bundle.pem}}\n    tls: {{ca_file: ca.pem}}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "-c", str(config), "--log-level", "info",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    while b"listening on" not in (line := await asyncio.wait_for(proc.stderr.readline(), 20)):
        assert line, "the sidecar exited before listening"
    drain = asyncio.ensure_future(proc.stderr.read())  # keep its stderr pipe from filling
    url = f"http://127.0.0.1:{port}"
    rotated = pki.intermediate.client("rotated-technical-user")

    outcomes: Counter[str] = Counter()
    failures: list[str] = []

    async def worker(session: aiohttp.ClientSession, rng: random.Random, deadline: float) -> None:
        while time.monotonic() < deadline:
            kind = rng.choices(["small", "large", "slow", "upload"], [70, 10, 10, 10])[0]
            try:
                if kind == "upload":
                    async with session.post(f"{url}/upload", data=LARGE_BODY) as resp:
                        ok = resp.status == 200 and (await resp.json())["sha256"] == LARGE_SHA
                else:
                    async with session.get(f"{url}/{kind}") as resp:
                        body = await resp.read()
                        ok = resp.status == 200
                        if kind == "large":
                            ok = ok and hashlib.sha256(body).hexdigest() == LARGE_SHA
            except (aiohttp.ClientError, TimeoutError) as exc:
                ok = False
                failures.append(f"{kind}: {type(exc).__name__}: {exc}")
            outcomes[f"{kind} {'ok' if ok else 'failed'}"] += 1
            if not ok and len(failures) < 5:
                failures.append(kind)

    async def rotate() -> None:
        await asyncio.sleep(seconds / 2)
        new = tmp_path / "client-bundle.pem.new"
        new.write_bytes(rotated.btp_bundle())
        new.chmod(0o600)
        os.replace(new, bundle)
        proc.send_signal(signal.SIGHUP)

    try:
        connector = aiohttp.TCPConnector(limit=CONNECTIONS)
        async with aiohttp.ClientSession(connector=connector) as session:
            rng = random.Random(1234)
            # Warm up with the same load first: the allocator's high-water mark at this
            # concurrency is not growth; what comes after it would be.
            warm = time.monotonic() + WARM_UP
            await asyncio.gather(*(worker(session, rng, warm) for _ in range(CONNECTIONS)))
            fds_before, rss_before = open_fds(proc.pid), rss_mib(proc.pid)
            end = time.monotonic() + seconds
            await asyncio.gather(
                rotate(),
                *(worker(session, random.Random(rng.random()), end) for _ in range(CONNECTIONS)),
            )
        await asyncio.sleep(0.5)  # let closed client connections settle
        fds_after, rss_after = open_fds(proc.pid), rss_mib(proc.pid)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/-/status") as resp:
                pooled = (await resp.json())["routes"][0]["counters"]["requests"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await drain
    total = sum(outcomes.values())
    failed = sum(n for k, n in outcomes.items() if k.endswith("failed"))
    print(
        f"soak {seconds:.0f}s: {total} requests ({pooled} counted by the sidecar), {failed} "
        f"failed, {dict(outcomes)}; sidecar fds {fds_before} -> {fds_after}, "
        f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB"
    )
    assert failed == 0, failures
    assert total > CONNECTIONS * 4
    assert rotated.cert.serial_number in serials, "the rotated certificate never reached upstream"
    assert serials[-1] == rotated.cert.serial_number
    # Pooled keep-alive upstream connections (at most one per client connection) stay open
    # by design; nothing else may remain.
    assert fds_after <= fds_before + CONNECTIONS + 10
    assert rss_after - rss_before < 64


async def test_soak_short(pki, tmp_path, tls_upstream):
    seconds = float(os.environ.get("SIDECAR_SOAK_SECONDS", "12"))
    await soak(seconds, pki, tmp_path, tls_upstream)


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_soak_long(pki, tmp_path, tls_upstream):
    seconds = float(os.environ.get("SIDECAR_SOAK_LONG_SECONDS", "300"))
    await soak(seconds, pki, tmp_path, tls_upstream)
