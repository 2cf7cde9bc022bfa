"""Running the sidecar: listeners, credential reloads, signals and shutdown.

`Sidecar` turns a validated `Config` into one aiohttp server per route.
``start()`` does everything that can fail for the user's reasons (reading
credentials, the inbound token, binding ports) and raises `SidecarError`
for them, so ``run`` exits 2 before serving anything. Afterwards, file
credentials are re-read when the files change or on SIGHUP; a failed reload
keeps the last good identity.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from sidecar.admin import Admin, readiness
from sidecar.config import Config, RouteConfig
from sidecar.errors import ConfigError, SidecarError
from sidecar.listener import start_listener
from sidecar.proxy import RouteProxy
from sidecar.sources import FileSource, source_for
from sidecar.tasks import TaskGroup
from sidecar.upstream import UpstreamClient

log = logging.getLogger("sidecar")

WATCH_INTERVAL = 2.0  # seconds between checks of credential files


@dataclass
class RouteRuntime:
    """Everything one route needs while serving."""

    index: int
    route: RouteConfig
    source: FileSource
    client: UpstreamClient
    proxy: RouteProxy | None = None
    last_error: str | None = None
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    site: web.TCPSite | None = None

    def reload(self) -> bool:
        """Read the credentials again; keep the old identity when that fails."""
        try:
            identity = self.source.load()
        except SidecarError as exc:
            self.last_error = str(exc)
            self.reloads["failure"] += 1
            log.error("route %s: reloading credentials failed, keeping the last good "
                      "certificate: %s", self.route.name, exc)  # fmt: skip
            return False
        self.client.install(identity)
        self.last_error = None
        self.reloads["success"] += 1
        for w in identity.warnings:
            log.warning("route %s: %s", self.route.name, w)
        log.info("route %s: client certificate loaded: %s (expires %s)", self.route.name,
                 identity.leaf.subject.rfc4514_string(),
                 identity.leaf.not_valid_after_utc.date())  # fmt: skip
        return True


class Sidecar:
    """All routes of one config, served in one event loop."""

    def __init__(self, config: Config, *, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = os.environ if env is None else env
        self.tasks = TaskGroup()
        self.routes: list[RouteRuntime] = []
        self._runners: list[web.ServerRunner] = []
        self._stop = asyncio.Event()
        self._in_flight: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        """Load credentials, bind every listener; raise `SidecarError` on user errors."""
        for i, route in enumerate(self.config.routes):
            token = self._token(i, route)
            source = source_for(route, i, self.env)
            rt = RouteRuntime(i, route, source, UpstreamClient(route, self.tasks))
            identity = source.load()  # permanent errors at start: exit 2
            for w in identity.warnings:
                log.warning("route %s: %s", route.name, w)
            rt.client.install(identity)
            rt.proxy = RouteProxy(
                route,
                rt.client,
                token=token,
                query_values=self.config.log.query_values,
                unavailable=functools.partial(readiness, rt),
            )
            self.routes.append(rt)
        try:
            for rt in self.routes:
                await self._serve(rt)
        except BaseException:
            await self.close()
            raise
        self.tasks.create(self._watch_files(), name="watch-credential-files")

    def _token(self, index: int, route: RouteConfig) -> str | None:
        name = route.inbound.token_env
        if name is None:
            return None
        token = self.env.get(name, "")
        if len(token) < 16:
            raise ConfigError(
                f"routes[{index}].inbound.token_env: environment variable {name} is "
                + ("not set" if not token else "shorter than 16 characters"),
                hint=f"export {name}=$(openssl rand -hex 32)",
            )
        return token

    async def _serve(self, rt: RouteRuntime) -> None:
        admin = Admin(self.config.admin_prefix, rt)
        proxy = rt.proxy
        assert proxy is not None

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            if admin.matches(request.path):
                return await admin.handle(request)
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                return await proxy.handle(request)
            finally:
                self._in_flight.discard(task)

        try:
            runner, site = await start_listener(
                handler,
                rt.route.listen.host,
                rt.route.listen.port,
                shutdown_timeout=rt.route.timeouts.shutdown,
            )
        except OSError as exc:
            raise ConfigError(
                f"routes[{rt.index}].listen: cannot listen on {rt.route.listen}: "
                f"{exc.strerror or exc}",
                hint="pick a free port, or stop the process that uses it",
            ) from None
        self._runners.append(runner)
        rt.site = site
        log.info("route %s: listening on http://%s, forwarding to %s", rt.route.name,
                 self.bound_address(rt), rt.route.upstream)  # fmt: skip

    def bound_address(self, rt: RouteRuntime) -> str:
        """HOST:PORT actually bound (port 0 in the config picks a free one)."""
        server = rt.site._server if rt.site is not None else None  # noqa: SLF001
        if isinstance(server, asyncio.Server) and server.sockets:
            host, port = server.sockets[0].getsockname()[:2]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(rt.route.listen)

    async def _watch_files(self) -> None:
        seen = {rt.index: rt.source.fingerprint() for rt in self.routes}
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for rt in self.routes:
                now = rt.source.fingerprint()
                if now != seen[rt.index]:
                    seen[rt.index] = now
                    log.info("route %s: credential files changed, reloading", rt.route.name)
                    rt.reload()

    def reload_all(self) -> None:
        for rt in self.routes:
            rt.reload()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (``timeouts.shutdown``), close."""
        grace = max((r.timeouts.shutdown for r in self.config.routes), default=0.0)
        stopping = asyncio.gather(*(r.cleanup() for r in self._runners))
        done, _ = await asyncio.wait({stopping}, timeout=grace + 0.1)
        if not done:
            # aiohttp's own cancel does not reach a handler waiting on the upstream.
            log.warning("cancelling %d request(s) still in flight after %.1fs",
                        len(self._in_flight), grace)  # fmt: skip
            for task in list(self._in_flight):
                task.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
        self._runners.clear()
        await self.tasks.close()
        for rt in self.routes:
            await rt.client.close()


async def run(config: Config, *, on_ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads credentials."""
    sidecar = Sidecar(config)
    await sidecar.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sidecar.request_stop)
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload_all)
    if on_ready is not None:
        on_ready.set()
    try:
        await sidecar.wait()
        log.info("stopping: finishing requests in flight")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await sidecar.close()
    log.info("stopped at %s", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
