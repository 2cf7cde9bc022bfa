"""The sidecar with credentials from the (fake) SAP BTP Destination Service, end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.config import (
    CredentialsConfig,
    DestinationRef,
    ListenAddress,
    RouteConfig,
    TLSConfig,
)
from sidecar.demo.app import FakeUpstream, fake_successfactors
from tests.conftest import PKI, eventually, free_port
from tests.support.fake_btp import CLIENT_ID, CLIENT_SECRET, FakeBTP, destination_json, serve

NAME = "sap_hcmcloud_core_odata"
COMPANY = "DEMO1234"


def service_key(path: Path, url: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "uri": url,
                "url": url,
                "clientid": CLIENT_ID,
                "clientsecret": CLIENT_SECRET,
                "credential-type": "binding-secret",
            }  # fmt: skip
        )
    )
    return path


def destination_route(
    key: Path, ca: Path, *, refresh: float = 900, **overrides: Any
) -> RouteConfig:
    fields: dict[str, Any] = {
        "name": "dest",
        "listen": ListenAddress("127.0.0.1", 0),
        "credentials": CredentialsConfig(
            destination=DestinationRef(NAME, service_key=key, refresh=refresh)
        ),
        "tls": TLSConfig(ca_file=ca),
    }
    fields.update(overrides)
    return RouteConfig(**fields)


@asynccontextmanager
async def sf_behind_destination(
    tmp_path: Path, fake: FakeBTP
) -> AsyncIterator[tuple[FakeUpstream, Path]]:
    """The fake SuccessFactors, and ``fake`` serving a destination for it: (upstream, key)."""
    async with fake_successfactors(tmp_path / "sf") as sf:
        fake.destinations[NAME] = destination_json(
            NAME,
            url=sf.url,
            keystore=("client.pem", sf.pki.client_bundle.read_bytes()),
            headers={"successfactors-companyid": COMPANY},
        )
        btp = await serve(fake)
        try:
            yield sf, service_key(tmp_path / "key.json", btp.url)
        finally:
            await btp.runner.cleanup()


async def test_users_through_a_destination_with_its_company_id_header(tmp_path, start_sidecar):
    async with sf_behind_destination(tmp_path, FakeBTP()) as (sf, key):
        running = await start_sidecar(destination_route(key, sf.pki.ca_file))
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{running.url}/odata/v2/User?$top=2") as resp:
                assert resp.status == 200, await resp.text()
                users = (await resp.json())["d"]["results"]
            async with client.get(f"{running.url}/-/status") as resp:
                status = await resp.json()
    assert [u["userId"] for u in users] == ["u0001", "u0002"]
    route = status["routes"][0]
    assert route["company_id"] == COMPANY
    assert route["upstream"] == sf.url
    assert route["credential_source"].startswith(f"destination {NAME}")
    assert CLIENT_SECRET not in json.dumps(status)


async def test_service_down_at_start_then_up(tmp_path, start_sidecar, monkeypatch):
    monkeypatch.setattr("sidecar.server.BACKOFF_START", 0.2)
    fake = FakeBTP(fail_with=503)
    async with sf_behind_destination(tmp_path, fake) as (sf, key):
        running = await start_sidecar(destination_route(key, sf.pki.ca_file))
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{running.url}/-/ready") as resp:
                assert resp.status == 503
                assert "503" in (await resp.json())["reason"]
            async with client.get(f"{running.url}/odata/v2/User") as resp:
                assert resp.status == 503
                assert resp.headers["X-Sidecar-Error"] == "credentials_unavailable"
            calls = fake.destination_calls + fake.token_calls
            fake.fail_with = None

            async def ready() -> bool:
                async with client.get(f"{running.url}/-/ready") as resp:
                    return resp.status == 200

            await eventually(ready, within=10.0, what="the route ready once the service is up")
            assert fake.destination_calls + fake.token_calls > calls
            async with client.get(f"{running.url}/odata/v2/User?$top=1") as resp:
                assert resp.status == 200


async def test_a_rotated_destination_certificate_reaches_the_upstream(
    pki: PKI, tmp_path, start_sidecar, tls_upstream, ca_file
):
    seen: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        seen.append(int(ssl_object.getpeercert()["serialNumber"], 16))
        return web.json_response({"serial": seen[-1]})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    upstream = await tls_upstream(app)
    old, new = pki.intermediate.client(), pki.intermediate.client()
    fake = FakeBTP()
    fake.destinations[NAME] = destination_json(
        NAME, url=upstream, keystore=("client.pem", old.btp_bundle())
    )
    btp = await serve(fake)
    try:
        key = service_key(tmp_path / "key.json", btp.url)
        running = await start_sidecar(destination_route(key, ca_file, refresh=1.0))
        failures = 0
        async with aiohttp.ClientSession() as client:

            async def serial() -> int:
                nonlocal failures
                async with client.get(f"{running.url}/x") as resp:
                    failures += resp.status != 200
                    return int((await resp.json())["serial"])

            assert await serial() == old.cert.serial_number

            async def revalidated() -> bool:
                return fake.not_modified_answers > 0

            # The refresh asks with If-None-Match: an unchanged destination is a 304.
            await eventually(revalidated, within=5.0, what="a refresh answered 304")
            fake.destinations[NAME] = destination_json(
                NAME, url=upstream, keystore=("client.pem", new.btp_bundle())
            )

            async def rotated() -> bool:
                return await serial() == new.cert.serial_number

            started = time.monotonic()
            await eventually(rotated, within=5.0, what="the rotated certificate upstream")
            elapsed = time.monotonic() - started
        assert failures == 0
        assert elapsed < 3, elapsed  # refresh is 1 s
    finally:
        await btp.runner.cleanup()


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        (None, "not found"),
        ({"authentication": "BasicAuthentication"}, "BasicAuthentication"),
    ],
)
async def test_permanent_destination_errors_stop_the_start(
    tmp_path, destination, message, start_sidecar
):
    from sidecar.errors import SidecarError

    fake = FakeBTP()
    if destination is not None:
        fake.destinations[NAME] = destination_json(NAME, **destination)
    btp = await serve(fake)
    try:
        key = service_key(tmp_path / "key.json", btp.url)
        with pytest.raises(SidecarError, match=message):
            await start_sidecar(destination_route(key, tmp_path / "unused-ca.pem"))
    finally:
        await btp.runner.cleanup()


async def test_destination_show_prints_no_secret(tmp_path, pki: PKI):
    fake = FakeBTP()
    fake.destinations[NAME] = destination_json(
        NAME,
        keystore=("client.pem", pki.client.btp_bundle(b"keystore-pw")),
        password="keystore-pw",
        headers={"successfactors-companyid": COMPANY},
    )
    btp = await serve(fake)
    try:
        key = service_key(tmp_path / "key.json", btp.url)
        runner = CliRunner()
        text = await asyncio.to_thread(
            runner.invoke, main, ["destination", "show", NAME, "--service-key", str(key)]
        )
        as_json = await asyncio.to_thread(
            runner.invoke,
            main,
            ["destination", "show", NAME, "--service-key", str(key), "--json"],
        )
    finally:
        await btp.runner.cleanup()
    assert text.exit_code == 0, text.output
    assert as_json.exit_code == 0, as_json.output
    info = json.loads(as_json.stdout)
    assert info["authentication"] == "ClientCertificateAuthentication"
    assert info["headers"] == {"successfactors-companyid": COMPANY}
    assert info["certificate"]["key_matches_leaf"] is True
    for out in (text.output, as_json.output):
        assert "keystore-pw" not in out
        assert CLIENT_SECRET not in out
        assert "PRIVATE KEY" not in out
    assert "ClientCertificateAuthentication" in text.stdout
    assert COMPANY in text.stdout


async def test_run_with_destination_flags_in_a_subprocess(tmp_path):
    """The issue's "done when": run --destination NAME --service-key key.json."""
    async with sf_behind_destination(tmp_path, FakeBTP()) as (sf, key):
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", "--destination", NAME,
            "--service-key", str(key), "--ca-file", str(sf.pki.ca_file),
            "--listen", f"127.0.0.1:{port}",
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            while b"listening on" not in (
                line := await asyncio.wait_for(proc.stderr.readline(), 20)
            ):
                assert line, "the sidecar exited before listening"
            async with aiohttp.ClientSession() as client:
                async with client.get(f"http://127.0.0.1:{port}/odata/v2/User?$top=3") as resp:
                    assert resp.status == 200, await resp.text()
                    assert len((await resp.json())["d"]["results"]) == 3
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_check_probe_through_a_destination(tmp_path):
    """The URL and the company id come from the destination, as `run` would use them."""
    async with sf_behind_destination(tmp_path, FakeBTP()) as (sf, key):
        result = await asyncio.to_thread(
            CliRunner().invoke,
            main,
            ["check", "--probe", "--destination", NAME, "--service-key", str(key),
             "--ca-file", str(sf.pki.ca_file)],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "certificate:  ACCEPTED" in result.output  # the fake answers 401 without the id
    assert "probe:        handshake TLSv1" in result.output
