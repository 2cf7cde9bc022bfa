"""Live rotation of file credentials, observed where it matters: at the upstream.

The fake upstream (`SerialUpstream`) demands a client certificate and answers
with the serial number of the one it saw, so every test can tell which
identity a request really travelled with. Rotation is done the way operators
and Kubernetes do it: a new file renamed over the old one (``os.replace``),
or the secret volume's ``..data`` symlink swapped to a new directory.

The poll interval of `FileSource` is lowered to 0.1 s where the test is about
what happens after a change is noticed; one test keeps the real 2 s interval
to hold the contract "files: within 5 s". Nothing waits on a bare sleep: every
wait is a poll with a deadline, or an event the upstream sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import CredentialsConfig, Timeouts
from sidecar.credentials.certinfo import fingerprint
from sidecar.credentials.sources import FILE_POLL_INTERVAL, FileSource
from sidecar.demo.pki import Issued
from tests.conftest import PKI, Running, eventually, free_port, route_config, sidecar_env

FAST_POLL = 0.1  # seconds; for tests about what happens once a change is noticed
FILES_WITHIN = 5.0  # DESIGN/issue 4: a replaced file is in use within 5 s
SIGHUP_WITHIN = 1.0  # "at once"
HELD_BODY = b"x" * 200_000  # the body of a held answer, long enough to span many chunks


# ------------------------------------------------------------------ the upstream


def peer_serial(request: web.BaseRequest) -> int:
    """The serial number of the client certificate presented on this request's connection."""
    assert request.transport is not None
    ssl_object = request.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    assert der, "the upstream demands a client certificate; the handshake cannot lack one"
    return x509.load_der_x509_certificate(der).serial_number


class SerialUpstream:
    """An mTLS upstream that reports the client-certificate serial it saw.

    ``GET /serial`` answers ``{"serial": "<decimal>"}`` at once. ``GET /hold``
    sets ``held`` and waits for ``release``: with ``?phase=headers`` before
    answering at all, with ``?phase=body`` after the headers and the first
    half of the body; the body is ``<serial>\\n`` followed by `HELD_BODY`.
    ``GET /trickle`` sets ``held``, then sends ``<serial>\\n`` and one line
    ``tick\\n`` every 0.1 s until ``release`` (a long download that is never idle).
    """

    def __init__(self) -> None:
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self._transports: list[asyncio.BaseTransport] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/serial", self._serial)
        app.router.add_get("/hold", self._hold)
        app.router.add_get("/trickle", self._trickle)
        return app

    def open_connections(self) -> int:
        """Client connections to this upstream that are still open."""
        return sum(not t.is_closing() for t in self._transports)

    def _seen(self, request: web.BaseRequest) -> int:
        if request.transport is not None and request.transport not in self._transports:
            self._transports.append(request.transport)
        return peer_serial(request)

    async def _serial(self, request: web.Request) -> web.Response:
        return web.json_response({"serial": str(self._seen(request))})

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"%d\n" % self._seen(request))
        self.held.set()
        # The sidecar may cut the connection (a bug a test shows): stop quietly then.
        with contextlib.suppress(ConnectionResetError):
            while not self.release.is_set():
                await response.write(b"tick\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), 0.1)
            await response.write(b"end\n")
            await response.write_eof()
        return response

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        body = b"%d\n" % self._seen(request) + HELD_BODY
        half = len(body) // 2
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.content_length = len(body)
        if request.query.get("phase") == "body":
            await response.prepare(request)
            await response.write(body[:half])
            self.held.set()
            await self.release.wait()
            await response.write(body[half:])
        else:
            self.held.set()
            await self.release.wait()
            await response.prepare(request)
            await response.write(body)
        await response.write_eof()
        return response


# ------------------------------------------------------------------ credentials


def write_bundle(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, as an operator (or a config-management tool) would."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    os.replace(tmp, path)


class SecretVolume:
    """The layout kubelet gives a secret volume, and its update.

    ``NAME -> ..data/NAME`` for every file and ``..data -> ..<timestamp>/``;
    an update writes a new timestamped directory, points a temporary link at
    it, renames that link over ``..data`` and removes the old directory.
    """

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        self.root = root
        self.generation = 0
        self.current = self._write_dir(files)
        (root / "..data").symlink_to(self.current.name)
        for name in files:
            (root / name).symlink_to(f"..data/{name}")

    def _write_dir(self, files: dict[str, bytes]) -> Path:
        self.generation += 1
        directory = self.root / f"..2024_06_01_12_00_{self.generation:02d}.{os.getpid()}"
        directory.mkdir()
        for name, data in files.items():
            (directory / name).write_bytes(data)
            (directory / name).chmod(0o600)
        return directory

    def update(self, files: dict[str, bytes]) -> None:
        old, self.current = self.current, self._write_dir(files)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(self.current.name)
        os.replace(tmp, self.root / "..data")
        for name in files:
            (old / name).unlink()
        old.rmdir()


def new_client(pki: PKI, **kwargs: Any) -> Issued:
    return pki.intermediate.client(**kwargs)


# ------------------------------------------------------------------ helpers


@pytest.fixture
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FileSource, "poll_interval", FAST_POLL)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


@dataclass
class Setup:
    upstream: SerialUpstream
    running: Running
    bundle: Path

    @property
    def url(self) -> str:
        return self.running.url


@pytest.fixture
async def serve(
    pki: PKI, tls_upstream: Any, start_sidecar: Any, ca_file: Path, tmp_path: Path
) -> Callable[..., Awaitable[Setup]]:
    """``await serve(bundle=PATH)`` → a sidecar presenting ``bundle`` to a `SerialUpstream`."""

    async def start(*, bundle: Path | None = None, **overrides: Any) -> Setup:
        if bundle is None:
            bundle = tmp_path / "client-bundle.pem"
            write_bundle(bundle, pki.client.btp_bundle())
        fake = SerialUpstream()
        url = await tls_upstream(fake.app())
        running = await start_sidecar(route_config(url, bundle, ca_file, **overrides))
        return Setup(fake, running, bundle)

    return start


async def serial_via(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(f"{url}/serial") as resp:
        assert resp.status == 200, await resp.text()
        return int((await resp.json())["serial"])


async def wait_for_serial(
    client: aiohttp.ClientSession, url: str, serial: int, *, within: float
) -> float:
    """Seconds until a new request through the sidecar arrives with ``serial``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen = None
    while loop.time() - start < within:
        seen = await serial_via(client, url)
        if seen == serial:
            return loop.time() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"serial {serial:x} not seen within {within}s (still {seen:x})")


async def admin_json(client: aiohttp.ClientSession, url: str, path: str) -> dict[str, Any]:
    async with client.get(f"{url}/-/{path}") as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def metric(client: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``, from ``/-/metrics``."""
    async with client.get(f"{url}/-/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"no {name}{labels} in\n{text}")


async def reloads(client: aiohttp.ClientSession, url: str, result: str) -> float:
    """``sidecar_credential_reloads_total{result=...}`` of the route ``test``."""
    return await metric(
        client, url, "sidecar_credential_reloads_total", route="test", result=result
    )


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None
    serial: int | None
    error: str | None = None


@dataclass
class SteadyStream:
    """Request loops that run until ``stop`` and record every outcome."""

    client: aiohttp.ClientSession
    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def loop(self) -> None:
        clock = asyncio.get_running_loop().time
        while not self.stop.is_set():
            started = clock()
            try:
                async with self.client.get(f"{self.url}/serial") as resp:
                    body = await resp.read()
                    serial = int(json.loads(body)["serial"]) if resp.status == 200 else None
                    self.outcomes.append(Outcome(started, clock(), resp.status, serial))
            except (aiohttp.ClientError, ValueError, KeyError) as exc:
                self.outcomes.append(Outcome(started, clock(), None, None, repr(exc)))

    async def count_at_least(self, n: int, *, within: float) -> None:
        async def enough() -> bool:
            return len(self.outcomes) >= n

        await eventually(enough, within=within, what=f"{n} requests completed")

    async def first_with(self, serial: int, *, within: float) -> Outcome:
        found: list[Outcome] = []

        async def seen() -> bool:
            found[:] = [o for o in self.outcomes if o.serial == serial][:1]
            return bool(found)

        await eventually(seen, within=within, what=f"serial {serial:x} seen by the stream")
        return found[0]


async def rotate_under_load(
    client: aiohttp.ClientSession, setup: Setup, old: int, new: int, swap: Callable[[], None]
) -> tuple[float, list[Outcome]]:
    """Run two request loops, ``swap()`` mid-stream; (seconds to the new serial, outcomes)."""
    stream = SteadyStream(client, setup.url)
    clock = asyncio.get_running_loop().time
    async with asyncio.TaskGroup() as tg:
        for i in range(2):
            tg.create_task(stream.loop(), name=f"steady-{i}")
        try:
            await stream.count_at_least(20, within=5)
            swapped_at = clock()
            swap()
            first = await stream.first_with(new, within=FILES_WITHIN + 1)
            await stream.count_at_least(len(stream.outcomes) + 40, within=5)
        finally:
            stream.stop.set()
    latency = first.ended - swapped_at
    failures = [o for o in stream.outcomes if o.status != 200]
    assert not failures, f"{len(failures)} failed requests during the swap: {failures[:5]}"
    assert {o.serial for o in stream.outcomes} == {old, new}
    # New requests use the new certificate: nothing started after the first new
    # answer arrived may still travel with the old one.
    late_old = [o for o in stream.outcomes if o.started > first.ended and o.serial == old]
    assert not late_old, f"{len(late_old)} requests used the old certificate after the swap"
    return latency, stream.outcomes


# ------------------------------------------------------------------ file rotation


async def test_replaced_file_is_used_within_5s_at_the_real_poll_interval_without_failures(
    pki: PKI, serve: Any, client: aiohttp.ClientSession
) -> None:
    assert FileSource.poll_interval == FILE_POLL_INTERVAL == 2.0
    setup = await serve()
    old = pki.client.cert.serial_number
    assert await serial_via(client, setup.url) == old
    fresh = new_client(pki)

    latency, outcomes = await rotate_under_load(
        client,
        setup,
        old,
        fresh.cert.serial_number,
        lambda: write_bundle(setup.bundle, fresh.btp_bundle()),
    )

    print(f"\nrotation seen after {latency:.2f}s; {len(outcomes)} requests, 0 failed")
    assert latency < FILES_WITHIN


async def test_kubernetes_secret_volume_symlink_swap_is_followed(
    pki: PKI, serve: Any, client: aiohttp.ClientSession, tmp_path: Path, fast_poll: None
) -> None:
    volume = SecretVolume(tmp_path, {"client.pem": pki.client.btp_bundle()})
    setup = await serve(bundle=tmp_path / "client.pem")
    runtime = setup.running.sidecar.routes[0]
    old = pki.client.cert.serial_number
    assert await serial_via(client, setup.url) == old

    for _ in range(2):  # a second update proves the watch survives the first one
        fresh = new_client(pki)
        latency, outcomes = await rotate_under_load(
            client,
            setup,
            old,
            fresh.cert.serial_number,
            functools.partial(volume.update, {"client.pem": fresh.btp_bundle()}),
        )
        print(f"\n..data swap seen after {latency:.2f}s; {len(outcomes)} requests, 0 failed")
        assert latency < FILES_WITHIN
        old = fresh.cert.serial_number

    async def pools_drained() -> bool:
        # Two request loops keep at most two connections busy in the current pool.
        return bool(runtime.client.open_connections() <= 2 >= setup.upstream.open_connections())

    await eventually(pools_drained, within=3, what="retired pools closed their connections")


async def test_kubernetes_tls_secret_with_separate_key_rotates_without_a_failed_load(
    pki: PKI, serve: Any, client: aiohttp.ClientSession, tmp_path: Path, fast_poll: None
) -> None:
    def tls_secret(issued: Issued) -> dict[str, bytes]:
        return {"tls.crt": issued.chain_pem(), "tls.key": issued.key_pem()}

    volume = SecretVolume(tmp_path, tls_secret(pki.client))
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    setup = await serve(bundle=crt, credentials=CredentialsConfig(pem=crt, key=key))
    old = pki.client.cert.serial_number
    assert await serial_via(client, setup.url) == old
    fresh = new_client(pki)

    await rotate_under_load(
        client, setup, old, fresh.cert.serial_number, lambda: volume.update(tls_secret(fresh))
    )

    # Both files change in one rename, so no load ever sees a new certificate
    # with the old key.
    assert await reloads(client, setup.url, "failure") == 0
    assert await reloads(client, setup.url, "success") == 2


async def test_status_and_metrics_follow_a_rotation(
    pki: PKI, serve: Any, client: aiohttp.ClientSession, fast_poll: None
) -> None:
    setup = await serve()
    fresh = new_client(pki, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=100))
    write_bundle(setup.bundle, fresh.btp_bundle())
    await wait_for_serial(client, setup.url, fresh.cert.serial_number, within=FILES_WITHIN)

    route = (await admin_json(client, setup.url, "status"))["routes"][0]
    assert route["sha256"] == fingerprint(fresh.cert)
    assert route["days_left"] in (99, 100)
    assert route["last_refresh"]["result"] == "success"
    assert route["last_refresh"]["error"] is None
    assert await reloads(client, setup.url, "success") == 2  # the start, the rotation
    assert await reloads(client, setup.url, "failure") == 0
    not_after = await metric(
        client, setup.url, "sidecar_client_cert_not_after_seconds", route="test"
    )
    assert not_after == fresh.cert.not_valid_after_utc.timestamp()


async def test_a_new_certificate_expiring_soon_is_warned_about_once(
    pki: PKI,
    serve: Any,
    client: aiohttp.ClientSession,
    fast_poll: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    polls = 0
    polled_enough = asyncio.Event()
    changed = FileSource.changed

    async def counting(self: FileSource) -> bool:
        nonlocal polls
        polls += 1
        if polls >= 5:
            polled_enough.set()
        return await changed(self)

    setup = await serve()
    soon = new_client(pki, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=10, hours=1))
    write_bundle(setup.bundle, soon.btp_bundle())
    await wait_for_serial(client, setup.url, soon.cert.serial_number, within=FILES_WITHIN)
    monkeypatch.setattr(FileSource, "changed", counting)
    await asyncio.wait_for(polled_enough.wait(), 5)  # five more looks at the file

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "expires in 10 days" in warnings[0]
    assert "route test" in warnings[0]


# ------------------------------------------------------------------ SIGHUP


async def test_reload_all_loads_a_changed_file_at_once(
    pki: PKI,
    serve: Any,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Polling an hour apart: only the SIGHUP path can bring the new file in.
    monkeypatch.setattr(FileSource, "poll_interval", 3600.0)
    setup = await serve()
    assert await serial_via(client, setup.url) == pki.client.cert.serial_number
    fresh = new_client(pki)
    write_bundle(setup.bundle, fresh.btp_bundle())
    assert await serial_via(client, setup.url) == pki.client.cert.serial_number

    setup.running.sidecar.reload_all()
    latency = await wait_for_serial(
        client, setup.url, fresh.cert.serial_number, within=SIGHUP_WITHIN
    )
    print(f"\nreload_all: new serial seen after {latency:.3f}s")


class GatedSource:
    """A route's source whose loads wait for ``gate``; ``changed()`` never says yes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.description = inner.description
        self.poll_interval = inner.poll_interval
        self.loads = 0
        self.load_started = asyncio.Event()
        self.gate = asyncio.Event()

    async def changed(self) -> bool:
        return False

    async def load(self) -> Any:
        self.loads += 1
        self.load_started.set()
        await self.gate.wait()
        return await self.inner.load()

    async def close(self) -> None:
        await self.inner.close()


async def test_a_sighup_during_a_reload_is_followed_by_another_reload(serve: Any) -> None:
    """Each SIGHUP leads to a load that starts after it, even when one is running:
    the files may have changed again since that load read them."""
    setup = await serve()
    sidecar = setup.running.sidecar
    (rt,) = sidecar.routes
    source = GatedSource(rt.source)
    rt.source = source

    sidecar.reload_all()
    await asyncio.wait_for(source.load_started.wait(), SIGHUP_WITHIN)
    source.load_started.clear()
    sidecar.reload_all()  # while the first reload waits at the gate
    await asyncio.sleep(0)  # the loop turns at least once before the load goes on
    source.gate.set()
    await asyncio.wait_for(source.load_started.wait(), SIGHUP_WITHIN)
    assert source.loads == 2
    assert rt.last_error is None


def padded(data: bytes, size: int) -> bytes:
    """``data`` with trailing newlines up to ``size`` bytes (PEM allows them)."""
    assert len(data) <= size
    return data + b"\n" * (size - len(data))


def rewrite_in_place_keeping_stat(path: Path, data: bytes) -> None:
    """Put ``data`` (as long as the file) into ``path``; inode, size and mtime stay.

    Polling compares exactly those three, so only a SIGHUP can notice this change.
    """
    before = path.stat()
    assert len(data) == before.st_size
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


async def test_sighup_to_a_running_process_loads_the_file_at_once(
    pki: PKI,
    tls_upstream: Any,
    ca_file: Path,
    bundle_file: Path,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fresh = new_client(pki)
    first, second = pki.client.btp_bundle(), fresh.btp_bundle()
    size = max(len(first), len(second))
    write_bundle(bundle_file, padded(first, size))
    fake = SerialUpstream()
    upstream = await tls_upstream(fake.app())
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"""\
routes:
  - name: hup
    listen: 127.0.0.1:{port}
    upstream: {upstream}
    credentials:
      pem: {bundle_file.name}
    tls:
      ca_file: {ca_file.name}
    timeouts: {{shutdown: 2s}}
""",
        encoding="utf-8",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "-c",
        str(config),
        cwd=tmp_path,
        env=sidecar_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        url = f"http://127.0.0.1:{port}"
        async with asyncio.timeout(20):
            while "listening on" not in (lines or [""])[-1]:
                line = (await proc.stdout.readline()).decode()
                assert line, "the sidecar exited:\n" + "".join(lines)
                lines.append(line)
        assert await serial_via(client, url) == pki.client.cert.serial_number

        rewrite_in_place_keeping_stat(bundle_file, padded(second, size))
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        latency = await wait_for_serial(client, url, fresh.cert.serial_number, within=SIGHUP_WITHIN)
        print(f"\nSIGHUP: new serial seen {time.monotonic() - sent:.3f}s after the signal")
        assert latency < SIGHUP_WITHIN
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
        lines.append(out.decode())
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "SIGHUP: reloading credentials" in output
    assert "client certificate loaded" in output


# ------------------------------------------------------------------ a broken new file


def garbage(pki: PKI, path: Path) -> str:
    write_bundle(path, b"this is not a certificate\n" * 20)
    return "not a certificate bundle"


def expired(pki: PKI, path: Path) -> str:
    now = dt.datetime.now(dt.UTC)
    old = new_client(pki, not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(1))
    write_bundle(path, old.btp_bundle())
    return "expired on"


def mismatched_key(pki: PKI, path: Path) -> str:
    one, other = new_client(pki), new_client(pki)
    write_bundle(path, other.key_pem() + one.chain_pem())
    return "does not match"


def truncated(pki: PKI, path: Path) -> str:
    data = new_client(pki).btp_bundle()
    write_bundle(path, data[: len(data) // 2])
    return str(path)


def deleted(pki: PKI, path: Path) -> str:
    path.unlink()  # e.g. a tool that removes the file before writing the new one
    return "file not found"


@pytest.mark.parametrize("broken", [garbage, expired, mismatched_key, truncated, deleted])
async def test_a_broken_new_file_keeps_the_last_good_identity(
    pki: PKI,
    serve: Any,
    client: aiohttp.ClientSession,
    fast_poll: None,
    caplog: pytest.LogCaptureFixture,
    broken: Callable[[PKI, Path], str],
) -> None:
    setup = await serve()
    old = pki.client.cert.serial_number
    assert await serial_via(client, setup.url) == old

    message = broken(pki, setup.bundle)

    async def refresh_failed() -> bool:
        route = (await admin_json(client, setup.url, "status"))["routes"][0]
        return bool(route["last_refresh"]["result"] == "failure")

    await eventually(refresh_failed, within=FILES_WITHIN, what="a failed refresh")
    route = (await admin_json(client, setup.url, "status"))["routes"][0]
    assert message in route["last_refresh"]["error"]
    assert str(setup.bundle) in route["last_refresh"]["error"]
    assert route["sha256"] == fingerprint(pki.client.cert)  # still the old identity
    assert route["ready"] is True
    assert await reloads(client, setup.url, "failure") == 1
    for _ in range(5):
        assert await serial_via(client, setup.url) == old
    async with client.get(f"{setup.url}/-/ready") as resp:
        assert resp.status == 200

    # A later good file is picked up, and the broken one was reported once.
    fresh = new_client(pki)
    write_bundle(setup.bundle, fresh.btp_bundle())
    await wait_for_serial(client, setup.url, fresh.cert.serial_number, within=FILES_WITHIN)
    route = (await admin_json(client, setup.url, "status"))["routes"][0]
    assert route["last_refresh"]["result"] == "success"
    assert route["sha256"] == fingerprint(fresh.cert)
    assert await reloads(client, setup.url, "failure") == 1
    assert await reloads(client, setup.url, "success") == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "keeping the last good certificate" in errors[0].getMessage()
    assert message in errors[0].getMessage()


# ------------------------------------------------------------------ in flight across a swap


@pytest.mark.parametrize("phase", ["headers", "body"])
async def test_a_request_in_flight_across_a_swap_completes_and_the_old_pool_closes(
    pki: PKI, serve: Any, client: aiohttp.ClientSession, fast_poll: None, phase: str
) -> None:
    setup = await serve()
    runtime = setup.running.sidecar.routes[0]
    old = pki.client.cert.serial_number
    assert await serial_via(client, setup.url) == old
    old_generation = runtime.client.current
    assert old_generation is not None

    async def held_request() -> tuple[int, bytes]:
        async with client.get(f"{setup.url}/hold?phase={phase}") as resp:
            return resp.status, await resp.read()

    async with asyncio.TaskGroup() as tg:
        held = tg.create_task(held_request(), name="held")
        await asyncio.wait_for(setup.upstream.held.wait(), 5)

        fresh = new_client(pki)
        write_bundle(setup.bundle, fresh.btp_bundle())
        await wait_for_serial(client, setup.url, fresh.cert.serial_number, within=FILES_WITHIN)
        assert runtime.client.current is not old_generation
        assert not old_generation.pool.closed, "the old pool closed under a request"
        assert not held.done()
        setup.upstream.release.set()

    status, body = held.result()
    assert status == 200
    assert body == b"%d\n" % old + HELD_BODY  # complete, and on the old identity

    async def old_pool_closed() -> bool:
        return bool(old_generation.pool.closed)

    await eventually(old_pool_closed, within=2, what="the old pool closed once idle")

    async def few_connections() -> bool:
        return bool(runtime.client.open_connections() <= 1 >= setup.upstream.open_connections())

    await eventually(few_connections, within=2, what="old upstream connections closed")
    assert await serial_via(client, setup.url) == fresh.cert.serial_number


async def test_a_long_download_across_a_swap_is_not_cut_by_the_retirement(
    pki: PKI, serve: Any, client: aiohttp.ClientSession, fast_poll: None
) -> None:
    # The download below is never idle for the 0.5 s read timeout, but goes on
    # well beyond 0.5 s after the swap.
    setup = await serve(timeouts=Timeouts(connect=5, read=0.5, shutdown=0.5))
    old = pki.client.cert.serial_number

    async def download() -> tuple[int, bytes | str]:
        try:
            async with client.get(f"{setup.url}/trickle") as resp:
                return resp.status, await resp.read()
        except aiohttp.ClientError as exc:
            return 0, repr(exc)

    async with asyncio.TaskGroup() as tg:
        held = tg.create_task(download(), name="download")
        try:
            await asyncio.wait_for(setup.upstream.held.wait(), 5)
            fresh = new_client(pki)
            write_bundle(setup.bundle, fresh.btp_bundle())
            await wait_for_serial(client, setup.url, fresh.cert.serial_number, within=FILES_WITHIN)

            async def cut() -> bool:
                return held.done()

            # Stream on for two read timeouts after the swap (unless cut before).
            with contextlib.suppress(AssertionError):
                await eventually(cut, within=1.0, what="the download cut")
        finally:
            setup.upstream.release.set()
        # Released, a healthy download ends at once.
        done, _ = await asyncio.wait({held}, timeout=1)
        if not done:
            held.cancel()

    assert not held.cancelled(), "the download never ended: no EOF, no error"
    status, body = held.result()
    assert status == 200, body
    assert isinstance(body, bytes)
    assert body.startswith(b"%d\n" % old)
    assert body.endswith(b"tick\nend\n")
