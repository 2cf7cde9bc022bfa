"""The admin endpoints: health, ready, status and metrics on a route's listener.

Each test starts a sidecar in front of a `FakeUpstream` over real mTLS on
loopback. Metrics are read with prometheus-client's own text parser, so what
is checked is what Prometheus would scrape. Where an upstream error is needed,
a second route points at a closed port of 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.config import CredentialsConfig, InboundConfig
from sidecar.credentials.sources import FileSource
from sidecar.demo.pki import Issued
from tests.conftest import PKI, Running, eventually, free_port, key_material, route_config
from tests.support.raw_http import assert_raw_error, raw
from tests.support.upstreams import FakeUpstream

TOKEN = "t" * 32
PASSWORD = "admin-test key password 7f3a"


# ------------------------------------------------------------------ helpers


@dataclass
class Setup:
    fake: FakeUpstream
    upstream: str  # https://localhost:PORT of ``fake``
    running: Running

    @property
    def url(self) -> str:
        return self.running.url

    def url_of(self, index: int) -> str:
        sidecar = self.running.sidecar
        return f"http://{sidecar.bound_address(sidecar.routes[index])}"


@pytest.fixture
async def serve(
    tls_upstream: Any, start_sidecar: Any, bundle_file: Path, ca_file: Path
) -> Callable[..., Awaitable[Setup]]:
    """``await serve(dead=True, env=..., **route_overrides)``.

    Route ``main`` forwards to a new `FakeUpstream`; with ``dead``, a second
    route ``dead`` forwards to a closed port.
    """

    async def start(
        *,
        dead: bool = False,
        env: dict[str, str] | None = None,
        bundle: Path | None = None,
        **overrides: Any,
    ) -> Setup:
        fake = FakeUpstream()
        upstream = await tls_upstream(fake.app())
        routes = [route_config(upstream, bundle or bundle_file, ca_file, name="main", **overrides)]
        if dead:
            routes.append(
                route_config(
                    f"https://127.0.0.1:{free_port()}",
                    bundle or bundle_file,
                    ca_file,
                    name="dead",
                    **overrides,
                )
            )
        running = await start_sidecar(*routes, env=env)
        return Setup(fake, upstream, running)

    return start


async def get_json(
    client: aiohttp.ClientSession, url: str, *, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with client.get(url, headers=headers) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def status(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    code, body = await get_json(client, f"{url}/-/status", headers=headers)
    assert code == 200, body
    assert isinstance(body, dict)
    return body


def route_entry(body: dict[str, Any], name: str) -> dict[str, Any]:
    entries = [r for r in body["routes"] if r["name"] == name]
    assert len(entries) == 1, body
    entry: dict[str, Any] = entries[0]
    return entry


@dataclass
class Metrics:
    text: str

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly ``labels``, or None when absent."""
        for family in text_string_to_metric_families(self.text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return None

    def family_type(self, name: str) -> str | None:
        for family in text_string_to_metric_families(self.text):
            if family.name == name:
                return str(family.type)
        return None


async def metrics(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> Metrics:
    async with client.get(f"{url}/-/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        return Metrics(await resp.text())


async def fetch(client: aiohttp.ClientSession, url: str, method: str = "GET") -> int:
    async with client.request(method, url) as resp:
        await resp.read()
        return resp.status


def hex_digits(fingerprint: str) -> str:
    return fingerprint.replace(":", "").lower()


# ------------------------------------------------------------------ status


async def test_status_describes_every_route(
    pki: PKI, serve: Any, client: aiohttp.ClientSession, bundle_file: Path
) -> None:
    setup = await serve(dead=True)

    body = await status(client, setup.url)
    lived = time.time() - setup.running.sidecar.started_at

    assert body["version"] == __version__
    assert isinstance(body["uptime_seconds"], int | float)
    assert lived - 1 <= body["uptime_seconds"] <= lived + 0.1  # rounded to 0.1 s
    assert [r["name"] for r in body["routes"]] == ["main", "dead"]
    leaf = pki.client.cert
    main = route_entry(body, "main")
    # As bound: the configured port 0 picked a free one.
    assert main["listen"] == setup.url.removeprefix("http://")
    assert route_entry(body, "dead")["listen"] == setup.url_of(1).removeprefix("http://")
    assert main["upstream"] == setup.upstream
    assert route_entry(body, "dead")["upstream"].startswith("https://127.0.0.1:")
    assert main["company_id"] == "ACME1234"
    assert str(bundle_file) in main["credential_source"]
    assert main["subject"] == leaf.subject.rfc4514_string()
    assert main["issuer"] == leaf.issuer.rfc4514_string()
    assert dt.datetime.fromisoformat(main["not_after"]) == leaf.not_valid_after_utc
    assert main["days_left"] in (364, 365)
    assert hex_digits(main["sha256"]) == leaf.fingerprint(hashes.SHA256()).hex()
    loaded_at = dt.datetime.fromisoformat(main["loaded_at"])
    assert abs((dt.datetime.now(dt.UTC) - loaded_at).total_seconds()) < 60
    assert main["last_refresh"]["result"] == "success"
    assert main["last_refresh"]["error"] is None
    assert main["counters"] == {"requests": 0, "upstream_errors": 0}
    assert main["last_upstream_error"] is None
    assert main["ready"] is True


async def test_status_finds_the_company_id_whatever_the_header_case(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    """A destination (or `headers`) may spell it ``SuccessFactors-CompanyId``."""
    setup = await serve(company_id=None, headers={"SuccessFactors-CompanyId": "CASED42"})
    assert route_entry(await status(client, setup.url), "main")["company_id"] == "CASED42"


async def test_uptime_grows(serve: Any, client: aiohttp.ClientSession) -> None:
    setup = await serve()
    first = (await status(client, setup.url))["uptime_seconds"]

    async def grew() -> bool:
        return bool((await status(client, setup.url))["uptime_seconds"] > first)

    await eventually(grew, within=2, what="uptime grows")


async def test_status_counters_grow_with_requests_and_upstream_errors(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve(dead=True)
    for path in ("/a", "/b", "/status/404"):
        await fetch(client, setup.url + path)
    assert await fetch(client, setup.url_of(1) + "/x") == 502
    assert await fetch(client, setup.url_of(1) + "/y") == 502

    body = await status(client, setup.url)

    main, dead = route_entry(body, "main"), route_entry(body, "dead")
    assert main["counters"] == {"requests": 3, "upstream_errors": 0}
    assert main["last_upstream_error"] is None
    assert dead["counters"] == {"requests": 2, "upstream_errors": 2}
    last = dead["last_upstream_error"]
    assert "cannot connect to https://127.0.0.1:" in last["message"]
    assert abs((dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(last["at"])).seconds) < 60
    # Admin requests are not proxied requests.
    assert route_entry(await status(client, setup.url), "main")["counters"]["requests"] == 3


def secrets_of(issued: Issued, encrypted_pem: bytes) -> list[str]:
    """Strings whose presence in any output would leak the key, its password or the token."""
    return [PASSWORD, TOKEN, *key_material(issued, encrypted_pem)]


async def test_status_and_metrics_never_show_a_key_password_or_token(
    pki: PKI, serve: Any, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    encrypted = pki.client.btp_bundle(PASSWORD.encode())
    bundle = tmp_path / "encrypted.pem"
    bundle.write_bytes(encrypted)
    bundle.chmod(0o600)
    creds = CredentialsConfig(pem=bundle, password_env="KEY_PASSWORD")
    setup = await serve(
        dead=True,
        bundle=bundle,
        credentials=creds,
        inbound=InboundConfig(token_env="TOK"),
        env={"TOK": TOKEN, "KEY_PASSWORD": PASSWORD},
    )
    auth = {"X-Sidecar-Token": TOKEN}
    for path in ("/x", "/status/500"):
        async with client.get(setup.url + path, headers=auth) as resp:
            await resp.read()
    async with client.get(setup.url_of(1) + "/x", headers=auth) as resp:
        assert resp.status == 502
    setup.running.sidecar.reload_all()

    outputs = [json.dumps(await status(client, setup.url, auth))]
    outputs.append((await metrics(client, setup.url, auth)).text)
    for path in ("health", "ready", "status", "metrics", "nothing"):
        async with client.get(f"{setup.url}/-/{path}") as resp:
            outputs.append(await resp.text())
            outputs.append(json.dumps(dict(resp.headers)))
    everything = "\n".join(outputs)

    assert "encrypted.pem" in everything  # the credential source is named, its content is not
    secrets = secrets_of(pki.client, encrypted)
    assert len(secrets) > 12  # password, token, and the lines of three key PEMs
    for secret in secrets:
        assert secret not in everything


# ------------------------------------------------------------------ metrics


async def test_metrics_count_requests_by_route_method_and_code(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    before = await metrics(client, setup.url)
    assert before.family_type("sidecar_requests") == "counter"
    assert before.value("sidecar_request_duration_seconds_count", route="main") in (None, 0.0)

    for _ in range(3):
        assert await fetch(client, setup.url + "/ok") == 200
    assert await fetch(client, setup.url + "/status/404") == 404
    assert await fetch(client, setup.url + "/status/201", "POST") == 201
    assert await fetch(client, setup.url + "/x", "PROPFIND") == 200

    m = await metrics(client, setup.url)
    assert m.value("sidecar_requests_total", route="main", method="GET", code="200") == 3
    assert m.value("sidecar_requests_total", route="main", method="GET", code="404") == 1
    assert m.value("sidecar_requests_total", route="main", method="POST", code="201") == 1
    assert m.value("sidecar_requests_total", route="main", method="OTHER", code="200") == 1
    assert m.family_type("sidecar_request_duration_seconds") == "histogram"
    assert m.value("sidecar_request_duration_seconds_count", route="main") == 6
    assert m.value("sidecar_request_duration_seconds_bucket", route="main", le="+Inf") == 6
    total = m.value("sidecar_request_duration_seconds_sum", route="main")
    assert total is not None and 0 < total < 60


async def test_metrics_count_upstream_errors_by_kind(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve(dead=True)
    for _ in range(2):
        assert await fetch(client, setup.url_of(1) + "/x") == 502

    m = await metrics(client, setup.url)
    assert m.value("sidecar_upstream_errors_total", route="dead", kind="connect") == 2
    assert m.value("sidecar_upstream_errors_total", route="main", kind="connect") is None
    assert m.value("sidecar_requests_total", route="dead", method="GET", code="502") == 2


async def test_metrics_show_the_certificate_expiry_and_reloads(
    pki: PKI, serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    m = await metrics(client, setup.url)
    assert m.family_type("sidecar_client_cert_not_after_seconds") == "gauge"
    assert m.value("sidecar_client_cert_not_after_seconds", route="main") == (
        pki.client.cert.not_valid_after_utc.timestamp()
    )
    assert m.value("sidecar_credential_reloads_total", route="main", result="success") == 1
    assert m.value("sidecar_credential_reloads_total", route="main", result="failure") == 0

    setup.running.sidecar.reload_all()

    async def reloaded() -> bool:
        m = await metrics(client, setup.url)
        return m.value("sidecar_credential_reloads_total", route="main", result="success") == 2

    await eventually(reloaded, within=2, what="a SIGHUP reload counted")


async def test_metrics_show_requests_in_flight_and_upstream_connections(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    m = await metrics(client, setup.url)
    assert m.value("sidecar_requests_in_flight", route="main") == 0
    assert m.value("sidecar_upstream_connections", route="main") == 0

    async with asyncio.TaskGroup() as tg:
        slow = tg.create_task(fetch(client, setup.url + "/slow?delay=10"), name="slow")
        await asyncio.wait_for(setup.fake.slow_started.wait(), 5)
        m = await metrics(client, setup.url)
        assert m.value("sidecar_requests_in_flight", route="main") == 1
        assert m.value("sidecar_upstream_connections", route="main") == 1
        setup.fake.release.set()
    assert slow.result() == 200

    m = await metrics(client, setup.url)
    assert m.value("sidecar_requests_in_flight", route="main") == 0
    # The connection stays in the pool, idle, for the next request.
    assert m.value("sidecar_upstream_connections", route="main") == 1


async def test_a_client_that_leaves_is_counted_as_499_and_leaves_no_request_in_flight(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    port = int(setup.url.rpartition(":")[2])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow?delay=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(setup.fake.slow_started.wait(), 5)
    assert (await metrics(client, setup.url)).value("sidecar_requests_in_flight", route="main") == 1
    writer.close()
    await writer.wait_closed()

    async def settled() -> bool:
        m = await metrics(client, setup.url)
        return (
            m.value("sidecar_requests_in_flight", route="main") == 0
            and m.value("sidecar_requests_total", route="main", method="GET", code="499") == 1
        )

    await eventually(settled, within=3, what="the abandoned request counted as 499")
    setup.fake.release.set()


# ------------------------------------------------------------------ the token


@pytest.fixture
async def guarded(serve: Any) -> Setup:
    setup: Setup = await serve(inbound=InboundConfig(token_env="TOK"), env={"TOK": TOKEN})
    return setup


@pytest.mark.parametrize("endpoint", ["status", "metrics"])
@pytest.mark.parametrize("sent", [None, "wrong", TOKEN + "x", TOKEN.upper()])
async def test_status_and_metrics_need_the_token(
    guarded: Setup, client: aiohttp.ClientSession, endpoint: str, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Sidecar-Token": sent}
    code, body = await get_json(client, f"{guarded.url}/-/{endpoint}", headers=headers)
    assert code == 401
    assert body["error"]["code"] == "inbound_auth_required"
    assert "X-Sidecar-Token" in body["error"]["message"]


@pytest.mark.parametrize("endpoint", ["status", "metrics"])
async def test_status_and_metrics_answer_with_the_token(
    guarded: Setup, client: aiohttp.ClientSession, endpoint: str
) -> None:
    async with client.get(
        f"{guarded.url}/-/{endpoint}", headers={"X-Sidecar-Token": TOKEN}
    ) as resp:
        assert resp.status == 200
        assert resp.headers.get("X-Sidecar-Error") is None


@pytest.mark.parametrize("endpoint", ["health", "ready"])
async def test_probes_never_need_the_token(
    guarded: Setup, client: aiohttp.ClientSession, endpoint: str
) -> None:
    for headers in ({}, {"X-Sidecar-Token": "wrong"}):
        code, body = await get_json(client, f"{guarded.url}/-/{endpoint}", headers=headers)
        assert code == 200, body


async def test_the_401_carries_the_error_header(
    guarded: Setup, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{guarded.url}/-/status") as resp:
        assert resp.status == 401
        assert resp.headers["X-Sidecar-Error"] == "inbound_auth_required"


# ------------------------------------------------------------------ routing


async def test_an_unknown_admin_endpoint_is_a_json_404(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    async with client.get(f"{setup.url}/-/foo") as resp:
        assert_raw_error(resp.status, resp.headers, await resp.read(), "not_found", 404)
        assert "/-/foo" in (await resp.json())["error"]["message"]
    assert setup.fake.requests == 0  # never forwarded


@pytest.mark.parametrize("endpoint", ["health", "ready", "status", "metrics"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_admin_endpoints_answer_get_only(
    serve: Any, client: aiohttp.ClientSession, endpoint: str, method: str
) -> None:
    setup = await serve()
    async with client.request(method, f"{setup.url}/-/{endpoint}") as resp:
        body = await resp.read()
        assert_raw_error(resp.status, resp.headers, body, "method_not_allowed", 405)
        assert resp.headers["Allow"] == "GET, HEAD"
    assert setup.fake.requests == 0


@pytest.mark.parametrize("endpoint", ["health", "status", "nothing-here"])
async def test_an_absolute_form_admin_request_for_another_host_is_forbidden(
    serve: Any, endpoint: str
) -> None:
    """`GET http://other.host/-/status` (a client using the sidecar as its proxy) is
    meant for another server: refused before anything else, as the proxy refuses it."""
    setup = await serve()
    port = int(setup.url.rsplit(":", 1)[1])
    request = f"GET http://other.host/-/{endpoint} HTTP/1.1\r\nHost: other.host\r\n\r\n"
    (answer,) = await raw(port, request.encode())
    assert_raw_error(answer.status, answer.headers, answer.body, "forbidden_target", 403)
    assert b"other.host" in answer.body
    # The route's own upstream host in absolute form is still this sidecar's to answer.
    own = setup.upstream.removeprefix("https://")
    (answer,) = await raw(
        port, f"GET http://{own}/-/health HTTP/1.1\r\nHost: {own}\r\n\r\n".encode()
    )
    assert answer.status == 200, answer.body
    assert setup.fake.requests == 0


async def test_health_answers_ok(serve: Any, client: aiohttp.ClientSession) -> None:
    setup = await serve()
    assert await get_json(client, f"{setup.url}/-/health") == (200, {"status": "ok"})


# ------------------------------------------------------------------ readiness


async def test_ready_turns_503_once_the_certificate_expires_and_200_after_renewal(
    pki: PKI,
    serve: Any,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(FileSource, "poll_interval", 0.1)
    # X.509 times have whole seconds: this one expires 2 to 3 s from now.
    short = pki.intermediate.client(not_after=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3))
    bundle = tmp_path / "short.pem"
    bundle.write_bytes(short.btp_bundle())
    bundle.chmod(0o600)
    setup = await serve(bundle=bundle)
    code, body = await get_json(client, f"{setup.url}/-/ready")
    assert code == 200, body

    async def expired() -> bool:
        return (await get_json(client, f"{setup.url}/-/ready"))[0] == 503

    await eventually(expired, within=5, what="ready answers 503")
    code, body = await get_json(client, f"{setup.url}/-/ready")
    assert body["status"] == "unavailable"
    assert "expired" in body["reason"]
    entry = route_entry(await status(client, setup.url), "main")
    assert entry["ready"] is False
    assert "expired" in entry["not_ready_reason"]
    assert entry["days_left"] < 0
    code, body = await get_json(client, f"{setup.url}/anything")
    assert code == 503
    assert body["error"]["code"] == "credentials_unavailable"
    assert setup.fake.requests == 0

    renewed = bundle.with_name("renewed.pem")
    renewed.write_bytes(pki.intermediate.client().btp_bundle())
    renewed.chmod(0o600)
    renewed.replace(bundle)

    async def ready_again() -> bool:
        return (await get_json(client, f"{setup.url}/-/ready"))[0] == 200

    await eventually(ready_again, within=5, what="ready again after renewal")
    code, body = await get_json(client, f"{setup.url}/anything")
    assert code == 200, body
