"""``mtls-sidecar demo``: the fake SuccessFactors API behind the sidecar.

In process, the fake (sidecar.demo.app.fake_successfactors) and the sidecar with
the demo's config answer OData paging through mTLS; the fake alone demands
the client certificate and the company id. One real ``python -m sidecar
demo`` process shows the command a new user runs first. ``run_demo`` with
``renewal`` (in process) stages a renewed certificate the fake does not map yet,
and says how to upload it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from yarl import URL

from sidecar.credentials.certinfo import fingerprint
from sidecar.demo.app import (
    DEMO_COMPANY_ID,
    FakeUpstream,
    demo_config,
    fake_successfactors,
    run_demo,
)
from sidecar.runtime import RouteRuntime
from sidecar.server import Sidecar
from tests.conftest import Demo, eventually, free_port

START_TIMEOUT = 20.0


async def get_json(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> Any:
    async with session.get(url, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()


def client_context(upstream: FakeUpstream, *, with_certificate: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(upstream.pki.ca_file))
    if with_certificate:
        # The BTP-style bundle holds the key and the chain; OpenSSL picks both out.
        ctx.load_cert_chain(str(upstream.pki.client_bundle))
    return ctx


# ------------------------------------------------------------------ in process


async def test_users_page_through_the_sidecar(demo: Demo) -> None:
    # The demo rewrites links (rewrite_links defaults to true): every link names the sidecar.
    local_origin = URL(demo.url).origin()
    seen: list[str] = []
    async with aiohttp.ClientSession() as session:
        first = await get_json(session, demo.url + "/odata/v2/User")
        page = first["d"]
        assert len(page["results"]) == 20
        while True:
            for user in page["results"]:
                uri = URL(user["__metadata"]["uri"])
                assert uri.origin() == local_origin, uri
                assert uri.path == f"/odata/v2/User('{user['userId']}')"
                seen.append(user["userId"])
            next_link = page.get("__next")
            if next_link is None:
                break
            link = URL(next_link)
            assert link.origin() == local_origin, link
            assert len(seen) < 45, "paging does not end"
            page = (await get_json(session, str(link)))["d"]
    assert seen == [f"u{i:04d}" for i in range(1, 46)]


async def test_metadata_and_one_user_through_the_sidecar(demo: Demo) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(demo.url + "/odata/v2/$metadata") as resp:
            assert resp.status == 200
            assert '<EntitySet Name="User"' in await resp.text()
        user = await get_json(session, demo.url + "/odata/v2/User('u0007')")
        assert user["d"]["userId"] == "u0007"
        async with session.get(demo.url + "/-/ready") as resp:
            assert resp.status == 200


async def test_a_plain_post_through_the_demo_creates_a_user(demo: Demo) -> None:
    # curl's way: no cookie kept, no CSRF token fetched. The sidecar keeps the
    # SuccessFactors session and supplies the token the write needs.
    new = {"userId": "demo1", "firstName": "Hedy", "lastName": "Lamarr"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.post(demo.url + "/odata/v2/User", json=new) as resp:
            assert resp.status == 201, await resp.text()
            created = (await resp.json())["d"]
        assert created["__metadata"]["uri"] == demo.url + "/odata/v2/User('demo1')"
        user = await get_json(session, demo.url + "/odata/v2/User('demo1')")
        assert user["d"]["lastName"] == "Lamarr"
        sessions = await get_json(session, demo.url + "/fake/sessions")
    assert sessions["sessions_opened"] == demo.upstream.state.sessions_opened == 1


async def test_fake_without_the_company_id_answers_authentication_failed(demo: Demo) -> None:
    ctx = client_context(demo.upstream)
    async with aiohttp.ClientSession() as session:
        async with session.get(demo.upstream.url + "/odata/v2/User", ssl=ctx) as resp:
            assert resp.status == 401
            body = await resp.json()
        assert body["error"]["code"] == "AuthenticationFailed"
        assert "X.509" in body["error"]["message"]["value"]

        # The same request with the header is served: the certificate was fine.
        headers = {"successfactors-companyid": DEMO_COMPANY_ID}
        users = await get_json(
            session, demo.upstream.url + "/odata/v2/User?$top=2", ssl=ctx, headers=headers
        )
        assert len(users["d"]["results"]) == 2


async def test_fake_demands_a_client_certificate(demo: Demo) -> None:
    ctx = client_context(demo.upstream, with_certificate=False)
    headers = {"successfactors-companyid": DEMO_COMPANY_ID}
    async with aiohttp.ClientSession() as session:
        # The aiohttp server hides the alert: the client sees the connection drop.
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(
                demo.upstream.url + "/odata/v2/User", ssl=ctx, headers=headers
            ) as resp:
                await resp.read()
        # With the certificate, the very same request is served.
        ctx = client_context(demo.upstream)
        await get_json(session, demo.upstream.url + "/odata/v2/User", ssl=ctx, headers=headers)


async def test_authentication_failed_passes_through_with_a_helpful_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with fake_successfactors(tmp_path) as upstream:
        config = demo_config(upstream, 0)
        route = dataclasses.replace(config.routes[0], company_id="WRONG123")
        sidecar = Sidecar(dataclasses.replace(config, routes=(route,)), env={})
        await sidecar.start()
        try:
            url = f"http://{sidecar.bound_address(sidecar.routes[0])}/odata/v2/User"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                assert resp.status == 401
                assert "X-Sidecar-Error" not in resp.headers
                body = await resp.json()
        finally:
            await sidecar.close()
    assert body["error"]["code"] == "AuthenticationFailed"
    warning = next(r.getMessage() for r in caplog.records if r.name == "sidecar.proxy")
    assert "WRONG123" in warning and "login name" in warning


# ----------------------------------------------------------------- the command


def test_demo_command_serves_users_and_stops_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    banner = threading.Event()
    out: list[str] = []
    err: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if f"mtls-sidecar listening on http://127.0.0.1:{port}" in line:
                banner.set()

    def read_stderr() -> None:
        assert proc.stderr is not None
        err.extend(proc.stderr)

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for t in readers:
        t.start()
    try:
        assert banner.wait(START_TIMEOUT), "".join(out + err)
        banner_text = "".join(out)
        assert f"curl 'http://127.0.0.1:{port}/odata/v2/User" in banner_text
        assert f"curl 'http://127.0.0.1:{port}/odata/v2/User' -H 'Content-Type: appl" in banner_text
        assert f"curl 'http://127.0.0.1:{port}/fake/sessions'" in banner_text
        url = f"http://127.0.0.1:{port}/odata/v2/User?$top=3"
        with urllib.request.urlopen(url, timeout=15) as resp:
            assert resp.status == 200
            users = json.load(resp)["d"]["results"]
        assert [u["userId"] for u in users] == ["u0001", "u0002", "u0003"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fake/sessions", timeout=15) as resp:
            counts = json.load(resp)
        assert counts["requests"] >= 1 and counts["sessions_opened"] >= 1, counts

        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0, "".join(out + err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for t in readers:
            t.join(10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert "Traceback" not in "".join(out + err)
    closing = re.search(
        r"The fake SuccessFactors opened (\d+) session\(s\) for (\d+) request", out[-1]
    )
    assert closing is not None, out[-3:]
    assert 1 <= int(closing[1]) <= int(closing[2]), closing[0]


# ----------------------------------------------------------------- the renewal


@dataclasses.dataclass(frozen=True)
class RenewalDemo:
    url: str  # the sidecar, http://127.0.0.1:PORT
    banner: str
    bundle: Path  # the sidecar's client bundle, the renewed one written over it
    chain: Path  # the renewed public chain, to upload


@contextlib.asynccontextmanager
async def renewal_demo() -> AsyncIterator[RenewalDemo]:
    """``run_demo(renewal=True)`` in this loop, stopped (cancelled) on the way out."""
    said: list[str] = []
    task = asyncio.get_running_loop().create_task(
        run_demo(0, said.append, renewal=True), name="renewal-demo"
    )
    try:
        await eventually(lambda: bool(said) or task.done(), within=START_TIMEOUT, what="the banner")
        if task.done():
            task.result()  # the demo failed to start: its error, not a missing banner
        banner = said[0]
        url = re.search(r"mtls-sidecar listening on (http://127\.0\.0\.1:\d+)", banner)
        bundle = re.search(r"replaces the\nsidecar's bundle, (\S+)\.\n", banner)
        upload = re.search(r"curl -X POST --data-binary @(\S+) '(\S+)/fake/x509-mapping'", banner)
        assert url and bundle and upload, banner
        assert upload[2] == url[1], banner
        yield RenewalDemo(url[1], banner, Path(bundle[1]), Path(upload[1]))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def leaf_sha256(pem: Path) -> str:
    return fingerprint(x509.load_pem_x509_certificates(pem.read_bytes())[0])


async def test_the_renewal_demo_stages_a_certificate_and_says_how_to_upload_it() -> None:
    async with renewal_demo() as demo, aiohttp.ClientSession() as session:
        assert demo.bundle.is_file() and demo.chain.is_file()
        assert demo.chain.name == "client-chain-renewed.pem"
        assert b"PRIVATE KEY" not in demo.chain.read_bytes()
        # The sidecar's bundle file now holds the renewed certificate, private as before.
        assert leaf_sha256(demo.bundle) == leaf_sha256(demo.chain)
        assert os.stat(demo.bundle).st_mode & 0o777 == 0o600
        for command in (f"curl '{demo.url}/-/status'", f"curl '{demo.url}/fake/x509-mapping'"):
            assert command in demo.banner
        assert "within a minute" in demo.banner

        # The upload the banner prints works as printed: through the sidecar.
        async with session.post(
            demo.url + "/fake/x509-mapping", data=demo.chain.read_bytes()
        ) as resp:
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["mapped"]["sha256"] == leaf_sha256(demo.chain)
        mapped = await get_json(session, demo.url + "/fake/x509-mapping")
        assert leaf_sha256(demo.chain) in [c["sha256"] for c in mapped["certificates"]]
        assert len(mapped["certificates"]) == 2  # the demo's first one, and the renewed one
    assert not demo.bundle.parent.exists()  # the private directory goes with the demo


async def test_the_renewal_demo_switches_by_itself_once_the_chain_is_uploaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The whole story the banner tells, with the pending certificate probed every 0.2 s
    # instead of every minute (pending_retry is per route; the demo builds the routes).
    build = RouteRuntime.__init__

    def quick_retry(self: RouteRuntime, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **kwargs)
        self.pending_retry = 0.2

    monkeypatch.setattr(RouteRuntime, "__init__", quick_retry)
    failures: list[int] = []

    async def users(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url + "/odata/v2/User?$top=1") as resp:
            await resp.read()
            if resp.status != 200:
                failures.append(resp.status)

    async with renewal_demo() as demo, aiohttp.ClientSession() as session:
        new = leaf_sha256(demo.chain)
        first = (await get_json(session, demo.url + "/-/status"))["routes"][0]
        assert first["sha256"] != new

        async def pending() -> dict[str, Any] | None:
            await users(session, demo.url)
            route = (await get_json(session, demo.url + "/-/status"))["routes"][0]
            held: dict[str, Any] | None = route["pending"]
            return held if held and held["last_probe"]["result"] == "rejected" else None

        async def rejected() -> bool:
            return await pending() is not None

        await eventually(rejected, within=START_TIMEOUT, what="the renewed certificate pending")
        held = await pending()
        assert held is not None and held["sha256"] == new
        assert "answered 401" in held["last_probe"]["message"]
        route = (await get_json(session, demo.url + "/-/status"))["routes"][0]
        assert route["sha256"] == first["sha256"]  # the current one still serves
        async with session.get(demo.url + "/-/metrics") as resp:
            assert 'sidecar_client_cert_pending{route="demo"} 1' in await resp.text()

        async with session.post(
            demo.url + "/fake/x509-mapping", data=demo.chain.read_bytes()
        ) as resp:
            assert resp.status == 201, await resp.text()

        async def switched() -> bool:
            await users(session, demo.url)
            route = (await get_json(session, demo.url + "/-/status"))["routes"][0]
            return route["pending"] is None and route["sha256"] == new

        await eventually(switched, within=START_TIMEOUT, what="the switch to the renewed one")
        async with session.get(demo.url + "/-/metrics") as resp:
            assert 'sidecar_client_cert_pending{route="demo"} 0' in await resp.text()
    assert failures == []  # not one request refused across the whole renewal
