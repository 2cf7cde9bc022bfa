"""Renewing the client certificate without an outage (DESIGN.md, "Renewing the certificate").

A renewed certificate is probed before the switch; while the upstream refuses
it (its chain not yet in the X.509 mapping) the current one stays and the new
one is *pending*, tried again every ``pending_retry`` s, and used by itself
once accepted. Each test runs a real sidecar in this event loop in front of a
`MappedUpstream` (tests/support/mapping.py), which answers with the serial of
the client certificate it saw, so the tests see which certificate the traffic
really travelled with. ``pending_retry`` is set to `RETRY` on the route, and
files are looked at every `FAST_POLL` s.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import CredentialsConfig, DestinationRef, ListenAddress, RouteConfig, TLSConfig
from sidecar.credentials.certinfo import fingerprint
from sidecar.credentials.sources import FileSource
from sidecar.demo.pki import Issued
from tests.conftest import PKI, Running, eventually, free_port, route_config
from tests.support.admin import metric, route_status
from tests.support.answers import assert_sidecar_error, fetch
from tests.support.fake_btp import FakeBTP, destination_json, serve, write_service_key
from tests.support.mapping import Load, MappedUpstream, Refusal
from tests.support.process import SidecarProcess, write_config, write_files
from tests.support.tls_servers import ResetServer

FAST_POLL = 0.1  # seconds between looks at the credential files
RETRY = 0.3  # seconds between probes of a pending certificate
SWITCH_WITHIN = RETRY + 1.0  # the retry interval, and room for a busy machine
ROUTE = "test"  # route_config's name
PROBE_PATH = "/odata/v2/"  # credentials.probe_path's default
API = "/odata/v2/User"  # what the traffic asks for: never the probe's path
RELOADS = "sidecar_credential_reloads_total"
PENDING = "sidecar_client_cert_pending"
NOT_AFTER = "sidecar_client_cert_not_after_seconds"
REFUSAL_SAYS = {
    "alert": "(TLS alert: unknown_ca)",
    "http400": "No required SSL certificate was sent",
}


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FileSource, "poll_interval", FAST_POLL)


def install(path: Path, issued: Issued) -> None:
    """Put ``issued``'s BTP bundle in place atomically, as an operator would."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(issued.btp_bundle())
    tmp.chmod(0o600)
    os.replace(tmp, path)


async def start_route(start_sidecar: Any, route: RouteConfig) -> Running:
    running: Running = await start_sidecar(route)
    running.sidecar.routes[0].pending_retry = RETRY
    return running


async def file_route(
    start_sidecar: Any, upstream: str, bundle: Path, ca_file: Path, **credentials: Any
) -> Running:
    creds = CredentialsConfig(pem=bundle, **credentials)
    return await start_route(
        start_sidecar, route_config(upstream, bundle, ca_file, credentials=creds)
    )


async def in_use(url: str, issued: Issued, route: str = ROUTE) -> bool:
    """Whether ``issued`` is the route's certificate now, as ``/-/status`` says."""
    return bool((await route_status(url, route))["sha256"] == fingerprint(issued.cert))


async def until_pending(url: str, result: str, route: str = ROUTE) -> dict[str, Any]:
    """The route's status once its pending certificate's last probe says ``result``."""
    found: dict[str, Any] = {}

    async def held() -> bool:
        found.update(await route_status(url, route))
        pending = found["pending"]
        return pending is not None and pending["last_probe"]["result"] == result

    await eventually(held, within=5.0, what=f"a pending certificate, last probe {result}")
    return found


def warnings_naming(caplog: pytest.LogCaptureFixture, level: int, *words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and all(w in r.getMessage() for w in words)
    ]


def renewal(pki: PKI, refuse: Refusal) -> Issued:
    """A renewed certificate: by another CA where the refusal is by TLS alert (see mapping.py)."""
    ca = pki.other_ca if refuse == "alert" else pki.intermediate
    return ca.client("renewed-technical-user")


async def staged_then_mapped(
    url: str, upstream: MappedUpstream, old: Issued, new: Issued, stage: Callable[[], None]
) -> Load:
    """The whole sequence under load: ``stage()`` the renewal, see it held back while
    the upstream refuses it, map it, see the switch. Returns the traffic, stopped."""
    loop = asyncio.get_running_loop()
    async with Load(f"{url}{API}") as traffic:
        stage()
        status = await until_pending(url, "rejected")
        pending = status["pending"]
        assert pending["sha256"] == fingerprint(new.cert)
        assert pending["subject"] == new.cert.subject.rfc4514_string()
        assert pending["next_probe_in_seconds"] <= 1  # RETRY, rounded
        assert REFUSAL_SAYS[upstream.refuse] in pending["last_probe"]["message"], pending
        assert status["sha256"] == fingerprint(old.cert)  # the current one stays
        assert status["ready"]
        assert await metric(url, PENDING, route=ROUTE) == 1.0
        # An expiry alert keeps watching the certificate in use, not the pending one.
        assert await metric(url, NOT_AFTER, route=ROUTE) == old.cert.not_valid_after_utc.timestamp()
        # Retries probe again but load nothing: no reload is counted for them.
        reloads = await metric(url, RELOADS, route=ROUTE, result="success")
        await asyncio.sleep(RETRY * 3)
        assert await metric(url, RELOADS, route=ROUTE, result="success") == reloads
        await traffic.more()
        assert new.cert.serial_number not in upstream.serials(API)  # traffic: the old one

        upstream.map(new)
        mapped_at = loop.time()
        await eventually(
            lambda: traffic.serials()[-1:] == [new.cert.serial_number],
            within=SWITCH_WITHIN,
            what="traffic on the renewed certificate once mapped",
        )
        switched_after = loop.time() - mapped_at
        await traffic.more()
    print(f"\nswitched {switched_after:.2f}s after the mapping (retry every {RETRY}s)")
    status = await route_status(url, ROUTE)
    assert status["pending"] is None
    assert status["sha256"] == fingerprint(new.cert)
    assert await metric(url, PENDING, route=ROUTE) == 0.0
    assert await metric(url, NOT_AFTER, route=ROUTE) == new.cert.not_valid_after_utc.timestamp()
    assert traffic.failures() == [], f"{len(traffic.failures())} of {len(traffic.answers)} failed"
    assert traffic.serials() == [old.cert.serial_number, new.cert.serial_number]
    return traffic


# ------------------------------------------------------------------ file source


@pytest.mark.parametrize("refuse", ["alert", "http400"])
async def test_a_renewal_is_held_until_mapped_then_switches_by_itself_without_a_failure(
    pki: PKI,
    refuse: Refusal,
    tmp_path: Path,
    ca_file: Path,
    bundle_file: Path,
    start_sidecar: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old, new = pki.client, renewal(pki, refuse)
    with MappedUpstream(pki, [old], refuse=refuse) as upstream:
        running = await file_route(start_sidecar, upstream.url, bundle_file, ca_file)
        traffic = await staged_then_mapped(
            running.url, upstream, old, new, lambda: install(bundle_file, new)
        )
    warned = warnings_naming(caplog, logging.WARNING, "refused by the upstream")
    assert len(warned) == 1, warned  # once, not at every retry
    assert "mtls-sidecar cert export-public" in warned[0]
    assert "X.509 certificate mapping" in warned[0]
    assert "renewed-technical-user" in warned[0]
    if refuse == "http400":  # the probes reached the upstream, with the new certificate
        assert set(upstream.serials(PROBE_PATH)) == {new.cert.serial_number}
        assert len(upstream.serials(PROBE_PATH)) >= 2  # the first, and the accepted retry
    else:
        assert upstream.handshake_errors  # refused by an alert, before any request
    assert len(traffic.answers) > 50


@pytest.mark.parametrize("staged", ["after the expiry", "before the expiry"])
async def test_expired_current_and_refused_renewal_the_renewal_is_used_and_reported(
    pki: PKI,
    staged: str,
    ca_file: Path,
    bundle_file: Path,
    start_sidecar: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Whole seconds: expires one to two seconds from now, after the sidecar started.
    old = pki.intermediate.client(not_after=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2))
    new = renewal(pki, "http400")
    install(bundle_file, old)
    with MappedUpstream(pki, [old], refuse="http400") as upstream:
        running = await file_route(start_sidecar, upstream.url, bundle_file, ca_file)

        async def expired() -> bool:
            return not (await route_status(running.url, ROUTE))["ready"]

        if staged == "before the expiry":  # pending, then tried again once it expired
            install(bundle_file, new)
            status = await until_pending(running.url, "rejected")
            assert status["sha256"] == fingerprint(old.cert)
            await eventually(
                lambda: in_use(running.url, new), within=3.0, what="the refused renewal in use"
            )
            assert dt.datetime.now(dt.UTC) >= old.cert.not_valid_after_utc  # not before
        else:
            await eventually(expired, within=3.0, what="the current certificate expired")
            install(bundle_file, new)
            await eventually(
                lambda: in_use(running.url, new), within=3.0, what="the refused renewal in use"
            )
        status = await route_status(running.url, ROUTE)
        answer = await fetch(f"{running.url}{API}")
    assert status["pending"] is None and status["ready"]
    assert assert_sidecar_error(answer, "client_certificate_rejected")
    assert upstream.serials(API) == [new.cert.serial_number]
    probes = upstream.serials(PROBE_PATH)  # refused each time: once, or once per retry
    assert set(probes) == {new.cert.serial_number}
    assert len(probes) == 1 if staged == "after the expiry" else len(probes) >= 2
    assert await metric(running.url, PENDING, route=ROUTE) == 0.0
    errors = warnings_naming(caplog, logging.ERROR, "the upstream refused it")
    assert len(errors) == 1, errors
    assert "No required SSL certificate was sent" in errors[0]
    assert "cert export-public" in errors[0]


@pytest.mark.parametrize("down", ["nothing listening", "connection reset", "no answer"])
async def test_an_unreachable_upstream_leaves_the_renewal_untested_never_rejected(
    pki: PKI,
    down: str,
    monkeypatch: pytest.MonkeyPatch,
    ca_file: Path,
    bundle_file: Path,
    start_sidecar: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("sidecar.runtime.PROBE_TIMEOUT", RETRY / 2)
    new = renewal(pki, "http400")
    # "no answer": the kernel completes the TCP handshake, the TLS one never starts.
    with ResetServer() as resetting, socket.create_server(("127.0.0.1", 0)) as silent:
        upstream = {
            "nothing listening": f"https://localhost:{free_port()}",
            "connection reset": resetting.url,
            "no answer": f"https://localhost:{silent.getsockname()[1]}",
        }[down]
        running = await file_route(start_sidecar, upstream, bundle_file, ca_file)
        install(bundle_file, new)
        status = await until_pending(running.url, "inconclusive")
        results = set()
        for _ in range(3):  # across several retries (every RETRY s)
            await asyncio.sleep(RETRY)
            results.add((await route_status(running.url, ROUTE))["pending"]["last_probe"]["result"])
        assert await metric(running.url, PENDING, route=ROUTE) == 1.0
        final = await route_status(running.url, ROUTE)
    assert results == {"inconclusive"}
    assert status["sha256"] == final["sha256"] == fingerprint(pki.client.cert)  # no switch
    assert final["pending"]["sha256"] == fingerprint(new.cert)
    why = {"nothing listening": "cannot connect", "connection reset": "cannot connect",
           "no answer": "timed out"}[down]  # fmt: skip
    warned = warnings_naming(caplog, logging.WARNING, "could not be tested", why)
    assert len(warned) == 1, warned  # once, not at every retry
    assert why in final["pending"]["last_probe"]["message"]
    assert not warnings_naming(caplog, logging.WARNING, "refused by the upstream")


async def test_without_probe_before_switch_a_renewal_is_used_at_once_unprobed(
    pki: PKI, ca_file: Path, bundle_file: Path, start_sidecar: Any
) -> None:
    new = renewal(pki, "http400")
    with MappedUpstream(pki, [pki.client], refuse="http400") as upstream:
        running = await file_route(
            start_sidecar, upstream.url, bundle_file, ca_file, probe_before_switch=False
        )
        install(bundle_file, new)

        await eventually(lambda: in_use(running.url, new), within=2.0, what="the renewal in use")
        answer = await fetch(f"{running.url}{API}")
        status = await route_status(running.url, ROUTE)
        pending = await metric(running.url, PENDING, route=ROUTE)
    assert_sidecar_error(answer, "client_certificate_rejected")  # today's behaviour: blind
    assert upstream.serials(API) == [new.cert.serial_number]
    assert upstream.serials(PROBE_PATH) == []  # never probed
    assert status["pending"] is None and pending == 0.0


@pytest.mark.parametrize("again", ["sighup", "touch"])
async def test_sighup_or_touch_while_pending_probes_again_and_a_reverted_file_clears_it(
    pki: PKI, again: str, ca_file: Path, bundle_file: Path, start_sidecar: Any
) -> None:
    new = renewal(pki, "http400")
    with MappedUpstream(pki, [pki.client], refuse="http400") as upstream:
        running = await file_route(start_sidecar, upstream.url, bundle_file, ca_file)
        running.sidecar.routes[0].pending_retry = 60.0  # only `again` probes again
        install(bundle_file, new)
        first = (await until_pending(running.url, "rejected"))["pending"]
        assert len(upstream.serials(PROBE_PATH)) == 1

        if again == "sighup":
            running.sidecar.reload_all()  # what the SIGHUP handler calls
        else:
            later = bundle_file.stat().st_mtime_ns + 1_000_000_000
            os.utime(bundle_file, ns=(later, later))  # the same content, touched
        await eventually(
            lambda: len(upstream.serials(PROBE_PATH)) == 2, within=2.0, what="a second probe"
        )
        second = (await until_pending(running.url, "rejected"))["pending"]
        assert second["sha256"] == first["sha256"] == fingerprint(new.cert)
        assert second["since"] == first["since"]  # the same renewal, still held back

        install(bundle_file, pki.client)  # the operator puts the current one back

        async def cleared() -> bool:
            return (await route_status(running.url, ROUTE))["pending"] is None

        await eventually(cleared, within=2.0, what="the pending certificate forgotten")
        status = await route_status(running.url, ROUTE)
        pending = await metric(running.url, PENDING, route=ROUTE)
        answer = await fetch(f"{running.url}{API}")
    assert status["sha256"] == fingerprint(pki.client.cert)
    assert pending == 0.0
    assert answer.status == 200
    assert len(upstream.serials(PROBE_PATH)) == 2  # the current one is not probed


async def test_a_retry_that_cannot_build_its_tls_context_keeps_the_refresh_loop_alive(
    pki: PKI,
    ca_file: Path,
    bundle_file: Path,
    start_sidecar: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """tls.ca_file is read again for each probe; missing for a while, it must not end the
    loop that retries, re-reads the files and answers SIGHUP."""
    new = renewal(pki, "http400")
    with MappedUpstream(pki, [pki.client], refuse="http400") as upstream:
        running = await file_route(start_sidecar, upstream.url, bundle_file, ca_file)
        install(bundle_file, new)
        await until_pending(running.url, "rejected")
        probes = len(upstream.serials(PROBE_PATH))
        ca = ca_file.read_bytes()
        ca_file.unlink()  # e.g. a config-management run replacing it

        async def retry_failed() -> bool:
            return "CA file not found" in str(
                (await route_status(running.url, ROUTE))["last_refresh"]
            )

        await eventually(retry_failed, within=2.0, what="a retry failing for the CA file")
        await asyncio.sleep(2 * RETRY)
        assert len(upstream.serials(PROBE_PATH)) == probes  # nothing could be tried
        ca_file.write_bytes(ca)
        upstream.map(new)

        await eventually(
            lambda: in_use(running.url, new),
            within=SWITCH_WITHIN,
            what="the renewal in use once mapped",
        )
        answer = await fetch(f"{running.url}{API}")
    assert answer.status == 200
    assert upstream.serials(API) == [new.cert.serial_number]
    failed = warnings_naming(caplog, logging.ERROR, "CA file not found")
    assert 1 <= len(failed) <= 6, failed  # once per retry (every RETRY s), no spinning
    assert not warnings_naming(caplog, logging.ERROR, "background task")


async def test_sighup_to_a_running_process_holds_a_refused_renewal_and_switches_once_mapped(
    pki: PKI, tmp_path: Path
) -> None:
    """As operators run it: `run -c FILE`, the renewal dropped in place, `kill -HUP`."""
    bundle, _ = write_files(tmp_path, pki)
    new = renewal(pki, "http400")
    with MappedUpstream(pki, [pki.client], refuse="http400") as upstream:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = write_config(tmp_path, upstream=upstream.url, port=port)
        process = SidecarProcess("run", "-c", str(config), cwd=tmp_path)
        try:
            await asyncio.to_thread(process.wait_listening)
            # `run` installs its SIGHUP handler only after the "listening" line: a SIGHUP
            # in between ends the process (reported). Once it answers, the handler is in.
            assert (await fetch(f"{url}/-/ready")).status == 200
            install(bundle, new)
            process.proc.send_signal(signal.SIGHUP)
            status = await until_pending(url, "rejected", "cli")
            assert status["sha256"] == fingerprint(pki.client.cert)
            assert (await fetch(f"{url}{API}")).status == 200

            upstream.map(new)
            process.proc.send_signal(signal.SIGHUP)  # no need to wait for the retry

            await eventually(lambda: in_use(url, new, "cli"), within=3.0, what="the renewal in use")
            answer = await fetch(f"{url}{API}")
        finally:
            process.stop()
    assert answer.status == 200
    assert upstream.serials(API) == [pki.client.cert.serial_number, new.cert.serial_number]
    assert upstream.serials(PROBE_PATH) == [new.cert.serial_number] * 2
    output = process.output
    assert "was refused by the upstream" in output
    assert "mtls-sidecar cert export-public" in output
    assert "the upstream accepted the renewed client certificate" in output
    assert "Traceback" not in output


# ------------------------------------------------------------------ destination source


async def test_a_renewed_destination_certificate_is_held_until_mapped_then_used(
    pki: PKI, tmp_path: Path, ca_file: Path, start_sidecar: Any
) -> None:
    name = "sap_hcmcloud_core_odata"
    old, new = pki.client, renewal(pki, "alert")
    fake = FakeBTP()
    with MappedUpstream(pki, [old], refuse="alert") as upstream:

        def keystore(issued: Issued) -> None:
            bundle = ("client.pem", issued.btp_bundle())
            fake.destinations[name] = destination_json(name, url=upstream.url, keystore=bundle)

        keystore(old)
        btp = await serve(fake)
        try:
            key = write_service_key(tmp_path / "key.json", btp.url)
            route = RouteConfig(
                name=ROUTE,
                listen=ListenAddress("127.0.0.1", 0),
                credentials=CredentialsConfig(
                    destination=DestinationRef(name, service_key=key, refresh=FAST_POLL)
                ),
                tls=TLSConfig(ca_file=ca_file),
            )
            running = await start_route(start_sidecar, route)
            clock = asyncio.get_running_loop().time
            calls, started = fake.destination_calls, clock()
            await staged_then_mapped(running.url, upstream, old, new, lambda: keystore(new))
            calls, seconds = fake.destination_calls - calls, clock() - started
        finally:
            await btp.runner.cleanup()
    # Fetched every `refresh` while pending too, never in a tight loop.
    assert calls <= seconds / FAST_POLL + 5, f"{calls} fetches in {seconds:.1f}s"
