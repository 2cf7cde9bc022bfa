"""Running the sidecar: listeners, credential refresh, signals and shutdown.

`Sidecar` turns a validated `Config` into one listener per route.
``start()`` does everything that can fail for the user's reasons (reading
file credentials, a destination that does not exist, the inbound token,
binding ports) and raises `SidecarError` for them, so ``run`` exits 2 before
serving anything. A Destination Service that is merely unreachable at start
is not such a reason: the route serves 503 ``credentials_unavailable`` and
retries with capped, jittered exponential backoff.

Afterwards each route keeps its credentials fresh in a background task:
files are looked at every 2 s (and at once on SIGHUP), destinations are
re-fetched every ``refresh``. A new identity is validated, then swapped in
atomically (sidecar.forward.upstream); a failed reload keeps the last good one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Mapping

from sidecar import __version__
from sidecar.admin.endpoints import Admin
from sidecar.config import Config, RouteConfig
from sidecar.credentials.sources import FILE_POLL_INTERVAL
from sidecar.errors import ConfigError, SidecarError
from sidecar.forward.handler import RouteProxy
from sidecar.forward.listener import Listener, Request, Response, Tunnel, start_listener
from sidecar.forward.upstream import UpstreamClient
from sidecar.intercept.certificate import route_certificates
from sidecar.resources import MemoryTrimmer, raise_file_limit
from sidecar.runtime import RouteRuntime, readiness, route_status, source_for
from sidecar.tasks import TaskGroup
from sidecar.telemetry.metrics import SidecarMetrics

log = logging.getLogger("sidecar")

BACKOFF_START = 1.0
BACKOFF_CAP = 30.0
TRIM_EVERY = 5.0  # seconds between looks at whether a load has ended


class Sidecar:
    """All routes of one config, served in one event loop."""

    def __init__(self, config: Config, *, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = os.environ if env is None else env
        self.tasks = TaskGroup()
        self.metrics = SidecarMetrics()
        self.routes: list[RouteRuntime] = []
        self.started_at = time.time()
        self._listeners: list[Listener] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Load credentials, bind every listener; raise `SidecarError` on user errors."""
        try:
            for i, route in enumerate(self.config.routes):
                await self._prepare_route(i, route)
            for rt in self.routes:
                await self._serve(rt)
        except BaseException:
            await self.close()
            raise
        for rt in self.routes:
            self.tasks.create(self._keep_fresh(rt), name=f"refresh-{rt.route.name}")
        self.tasks.create(self._trim_after_load(), name="memory-trim")

    async def _trim_after_load(self) -> None:
        trimmer = MemoryTrimmer(lambda: sum(rt.stats.requests for rt in self.routes))
        while True:
            await asyncio.sleep(TRIM_EVERY)
            if trimmer.tick():
                log.debug("a load ended: unused memory returned to the system")

    async def _prepare_route(self, index: int, route: RouteConfig) -> None:
        token = inbound_token(index, route, self.env)
        if route.intercept.enabled and route.upstream is not None:
            # Made (or found) now: an unwritable cert_dir stops the start before it serves.
            route_certificates(route, index, env=self.env).current()
        source = source_for(route, index, self.env)
        stats = self.metrics.route(route.name)
        rt = RouteRuntime(index, route, source, UpstreamClient(route, self.tasks), stats)
        self.routes.append(rt)
        stats.track_connections(rt.client.open_connections)
        try:
            loaded = await source.load()
        except SidecarError as exc:
            if not exc.transient:
                raise  # permanent at start: `run` exits 2
            rt.failed(exc)  # serve 503 and retry in the background
        else:
            assert loaded is not None
            rt.apply(loaded, quiet=True)  # start() logs it once the listener is up
        rt.proxy = RouteProxy(
            route,
            rt.client,
            stats,
            token=token,
            query_values=self.config.log.query_values,
            unavailable=functools.partial(readiness, rt),
        )

    async def _serve(self, rt: RouteRuntime) -> None:
        proxy = rt.proxy
        assert proxy is not None
        admin = Admin(
            self.config.admin_prefix,
            rt,
            proxy,
            status=self.status,
            metrics=self.metrics,
            routes=lambda: self.routes,
            started_at=self.started_at,
            query_values=self.config.log.query_values,
        )

        async def handler(request: Request) -> Response | Tunnel:
            if admin.matches(request.path):
                return await admin.handle(request)
            return await proxy.handle(request)

        try:
            listener = await start_listener(
                handler,
                rt.route.listen.host,
                rt.route.listen.port,
                limits=rt.route.limits,
                shutdown_timeout=rt.route.timeouts.shutdown,
            )
        except OSError as exc:
            raise ConfigError(
                f"routes[{rt.index}].listen: cannot listen on {rt.route.listen}: "
                f"{exc.strerror or exc}",
                hint="pick a free port, or stop the process that uses it",
            ) from None
        self._listeners.append(listener)
        rt.site = listener
        generation = rt.client.current
        log.info(
            "route %s: listening on http://%s, forwarding to %s with %s",
            rt.route.name,
            self.bound_address(rt),
            generation.target.upstream if generation else "the destination's URL",
            f"client certificate {generation.identity.leaf.subject.rfc4514_string()} (expires "
            f"{generation.identity.leaf.not_valid_after_utc.date()})"
            if generation
            else f"no client certificate yet ({rt.last_error})",
        )

    def bound_address(self, rt: RouteRuntime) -> str:
        """HOST:PORT actually bound (port 0 in the config picks a free one)."""
        return rt.bound_address

    async def _keep_fresh(self, rt: RouteRuntime) -> None:
        """Poll the source; back off (capped, jittered) while it fails transiently."""
        delay = BACKOFF_START
        while True:
            waiting = rt.source.poll_interval
            if rt.client.current is None or rt.retry_soon:
                waiting = min(delay, BACKOFF_CAP) * random.uniform(0.5, 1.0)
                delay = min(delay * 2, BACKOFF_CAP)
            pending = rt.pending_due()
            if pending is not None:
                waiting = min(waiting, pending)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.reload_requested.wait(), timeout=waiting)
            forced = rt.reload_requested.is_set()
            rt.reload_requested.clear()
            if forced or rt.client.current is None or rt.retry_soon or await rt.source.changed():
                if await rt.reload():
                    delay = BACKOFF_START
            # Not an `elif`: a destination always says "changed" (the service answers 304),
            # and a reload that re-offered the pending identity has just probed it (not due).
            if rt.pending_due() == 0.0:
                await rt.retry_pending()  # a renewal the upstream refused: asked once more
            rt.warn_expiry()

    def reload_all(self) -> None:
        """SIGHUP: every route looks at its source at once."""
        log.info("SIGHUP: reloading credentials")
        for rt in self.routes:
            rt.reload_requested.set()

    def status(self) -> dict[str, object]:
        return {
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "routes": [route_status(rt) for rt in self.routes],
        }

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (``timeouts.shutdown``), close."""
        await asyncio.gather(*(listener.cleanup() for listener in self._listeners))
        self._listeners.clear()
        await self.tasks.close()
        for rt in self.routes:
            await rt.client.close()
            await rt.source.close()


def inbound_token(index: int, route: RouteConfig, env: Mapping[str, str]) -> str | None:
    """The route's inbound token from its environment variable, if it has one."""
    name = route.inbound.token_env
    if name is None:
        return None
    token = env.get(name, "")
    if len(token) < 16:
        raise ConfigError(
            f"routes[{index}].inbound.token_env: environment variable {name} is "
            + ("not set" if not token else "shorter than 16 characters"),
            hint=f"export {name}=$(openssl rand -hex 32)",
        )
    return token


async def run(config: Config, *, on_ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads credentials (where there is one)."""
    raise_file_limit()
    sidecar = Sidecar(config)
    # Handled from before the start: a SIGHUP (or SIGTERM) while the listeners come up
    # must not end the process with the default action.
    restore_signals = _handle_signals(sidecar)
    try:
        await sidecar.start()
    except BaseException:
        restore_signals()
        raise
    if on_ready is not None:
        on_ready.set()
    try:
        await sidecar.wait()
        log.info("stopping: finishing requests in flight")
    finally:
        restore_signals()
        await sidecar.close()
    log.info("stopped at %s", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def _handle_signals(sidecar: Sidecar) -> Callable[[], None]:
    """SIGTERM and SIGINT stop, SIGHUP reloads; returns what puts the old handlers back.

    Windows has no SIGHUP, and its event loops no ``add_signal_handler``: there
    Python's own ``signal.signal`` handles SIGINT and SIGTERM.
    """
    loop = asyncio.get_running_loop()
    stops = (signal.SIGTERM, signal.SIGINT)
    hangup = getattr(signal, "SIGHUP", None)
    try:
        for sig in stops:
            loop.add_signal_handler(sig, sidecar.request_stop)
    except NotImplementedError:
        previous = {
            sig: signal.signal(sig, lambda *_: loop.call_soon_threadsafe(sidecar.request_stop))
            for sig in stops
        }
        _no_reload_signal()

        def restore_handlers() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore_handlers
    handled = list(stops)
    if hangup is None:
        _no_reload_signal()
    else:
        loop.add_signal_handler(hangup, sidecar.reload_all)
        handled.append(hangup)

    def remove_handlers() -> None:
        for sig in handled:
            loop.remove_signal_handler(sig)

    return remove_handlers


def _no_reload_signal() -> None:
    log.debug(
        "this platform has no SIGHUP: credential files are read again when they change "
        "(looked at every %.0f s), destinations every `refresh`; restart the sidecar to "
        "load them at once",
        FILE_POLL_INTERVAL,
    )
