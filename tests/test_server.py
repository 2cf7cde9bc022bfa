"""`server.run` where the platform lacks what Linux has: no SIGHUP, no loop signal handlers.

macOS and Windows users run the sidecar next to Postman. Windows has no
SIGHUP, and its asyncio loops raise NotImplementedError from
``add_signal_handler``. Each is simulated here on Linux by taking the feature
away; `run` must serve, stop on SIGTERM, and leave the process's signal
handlers as it found them. SIGTERM is sent to this very process only once a
handler is known to be in place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from sidecar import server
from sidecar.config import Config
from tests.conftest import route_config
from tests.support.upstreams import FakeUpstream


async def run_then_terminate(config: Config) -> None:
    """Start `server.run`, wait until it serves, SIGTERM this process, wait for the end."""
    ready = asyncio.Event()
    running = asyncio.ensure_future(server.run(config, on_ready=ready))
    serving = asyncio.ensure_future(ready.wait())
    try:
        await asyncio.wait({running, serving}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            running.result()  # it failed to start: its error is the test's failure
        assert ready.is_set(), "not serving within 10 s"
        handler = signal.getsignal(signal.SIGTERM)
        assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None), "SIGTERM not handled"
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(running, 10)
    finally:
        serving.cancel()
        running.cancel()


@pytest.fixture
async def config(tls_upstream: Any, bundle_file: Path, ca_file: Path) -> Config:
    url = await tls_upstream(FakeUpstream().app())
    return Config(routes=(route_config(url, bundle_file, ca_file),))


async def test_run_serves_and_stops_without_sighup(
    config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(signal, "SIGHUP")
    caplog.set_level(logging.DEBUG, logger="sidecar")
    before = signal.getsignal(signal.SIGTERM)

    await run_then_terminate(config)

    hints = [r.getMessage() for r in caplog.records if "no SIGHUP" in r.getMessage()]
    assert len(hints) == 1, hints  # once, at debug, saying how to reload instead
    assert "restart" in hints[0] and "every 2 s" in hints[0]
    assert {r.levelno for r in caplog.records if "no SIGHUP" in r.getMessage()} == {logging.DEBUG}
    assert "stopped at" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == before


async def test_run_falls_back_to_signal_signal_where_the_loop_has_no_signal_handlers(
    config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As on Windows' asyncio loops: ``add_signal_handler`` raises NotImplementedError."""
    loop = asyncio.get_running_loop()

    def unsupported(*args: Any) -> None:
        raise NotImplementedError

    monkeypatch.setattr(loop, "add_signal_handler", unsupported)
    caplog.set_level(logging.DEBUG, logger="sidecar")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    await run_then_terminate(config)

    assert "stopping: finishing requests in flight" in caplog.text
    assert sum("no SIGHUP" in r.getMessage() for r in caplog.records) == 1
    assert {sig: signal.getsignal(sig) for sig in before} == before  # put back


async def test_a_sighup_while_starting_reloads_instead_of_ending_the_process(
    config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the rotation tests: the handlers came after start(), so a SIGHUP sent as
    the listeners came up ended the process (SIGHUP's default action)."""
    caplog.set_level(logging.INFO, logger="sidecar")
    start = server.Sidecar.start

    async def start_with_a_hangup(self: server.Sidecar) -> None:
        os.kill(os.getpid(), signal.SIGHUP)  # delivered while starting
        await asyncio.sleep(0)
        await start(self)

    monkeypatch.setattr(server.Sidecar, "start", start_with_a_hangup)
    await run_then_terminate(config)
    assert "SIGHUP: reloading credentials" in caplog.text
    assert "stopped at" in caplog.text
