"""A route's HTTP listener: aiohttp's low-level server, our errors and limits.

The low-level server hands every request to one handler, whatever its target
(``CONNECT host:443``, ``OPTIONS *``, absolute-form without a path), so the
proxy decides about all of them; a router would answer some with its own 404.
Requests aiohttp's parser rejects get DESIGN.md's JSON ``bad_request`` too,
instead of aiohttp's text page, and nothing ever shows a traceback.

Limits (``routes[].limits``):

- ``max_header_size`` / ``max_headers``: aiohttp's parser refuses larger heads (400);
- ``header_timeout``: a connection must deliver a complete request head this
  soon after it opens or after its previous response (slowloris); else it is
  closed;
- ``idle_timeout``: aiohttp's keep-alive timeout;
- ``max_connections``: connections beyond it are accepted but not read until
  a slot frees (they wait, as in a backlog; nothing is refused), so a burst
  cannot exhaust file descriptors for the upstream pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from sidecar.config import LimitsConfig
from sidecar.upstream_errors import BAD_REQUEST, INTERNAL_ERROR, error_response

log = logging.getLogger("sidecar.listener")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Protocol(RequestHandler):
    """One client connection, with the head timeout and the connection limit."""

    _head_timer: asyncio.TimerHandle | None = None
    _between_requests = False  # the next bytes start a new request head

    @property
    def _listener(self) -> ListenerServer:
        manager = self._manager
        assert isinstance(manager, ListenerServer)
        return manager

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._listener.admit(self)

    def admitted(self) -> None:
        """The connection got a slot: read it; its first head must come soon."""
        if self.transport is not None:
            self.transport.resume_reading()
        self._start_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._between_requests:
            # The first bytes of the next request: the rest of its head must follow.
            self._between_requests = False
            self._start_head_timer()
        super().data_received(data)

    def response_done(self) -> None:
        """Idle now: aiohttp's keep-alive timeout applies until the next bytes."""
        self._between_requests = True

    def _start_head_timer(self) -> None:
        if self._head_timer is None and self.transport is not None:
            self._head_timer = self._loop.call_later(
                self._listener.limits.header_timeout, self._head_too_slow
            )

    def head_received(self) -> None:
        self._between_requests = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        log.info("closing a connection that sent no complete request head within %.1fs",
                 self._listener.limits.header_timeout)  # fmt: skip
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_received()
        self._listener.release(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; the connection is cut")
        if status < 500:
            # Only the class: the parser's text quotes header lines, which may hold secrets.
            log.debug("refused a malformed request (%s)", type(exc).__name__ if exc else status)
            response = error_response(BAD_REQUEST, f"malformed request: {message or exc}")
        else:
            log.error("internal error while handling %s %s: %s: %s", request.method,
                      request.raw_path.partition("?")[0], type(exc).__name__, exc,
                      exc_info=exc)  # fmt: skip
            response = error_response(
                INTERNAL_ERROR, "the sidecar failed to handle this request; see its log"
            )
        response.force_close()
        return response


class ListenerServer(web.Server):
    """`web.Server` whose connections answer errors as JSON and respect the limits."""

    def __init__(self, handler: Handler, limits: LimitsConfig, **kwargs: Any) -> None:
        super().__init__(self._with_head_timer(handler), **kwargs)
        self.limits = limits
        self._active: set[_Protocol] = set()
        self._waiting: deque[_Protocol] = deque()

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return _Protocol(self, loop=self._loop, **kwargs)

    @staticmethod
    def _with_head_timer(handler: Handler) -> Handler:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            if isinstance(protocol, _Protocol):
                protocol.head_received()
            try:
                return await handler(request)
            finally:
                if isinstance(protocol, _Protocol):
                    protocol.response_done()

        return handle

    def admit(self, protocol: _Protocol) -> None:
        if len(self._active) < self.limits.max_connections:
            self._active.add(protocol)
            protocol.admitted()
            return
        if protocol.transport is not None:
            protocol.transport.pause_reading()
        self._waiting.append(protocol)
        log.warning("connection limit (%d) reached: a new connection waits",
                    self.limits.max_connections)  # fmt: skip

    def release(self, protocol: _Protocol) -> None:
        if protocol in self._active:
            self._active.discard(protocol)
            while self._waiting and len(self._active) < self.limits.max_connections:
                nxt = self._waiting.popleft()
                if nxt.transport is not None and not nxt.transport.is_closing():
                    self._active.add(nxt)
                    nxt.admitted()
        elif protocol in self._waiting:
            self._waiting.remove(protocol)


def bound_port(site: web.TCPSite) -> int:
    """The port a started site listens on (asyncio's and uvloop's servers alike)."""
    sockets = getattr(site._server, "sockets", None) or ()  # noqa: SLF001
    return int(sockets[0].getsockname()[1]) if sockets else site._port  # noqa: SLF001


async def start_listener(
    handler: Handler, host: str, port: int, *, limits: LimitsConfig, shutdown_timeout: float
) -> tuple[web.ServerRunner, web.TCPSite]:
    """Serve ``handler`` on HOST:PORT; stop with ``runner.cleanup()``."""
    server = ListenerServer(
        handler,
        limits,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        access_log=None,  # the proxy writes its own access line
        auto_decompress=False,  # request bodies go upstream as sent
        max_line_size=limits.max_header_size,
        max_field_size=limits.max_header_size,
        max_headers=limits.max_headers,
        keepalive_timeout=limits.idle_timeout,
    )
    runner = web.ServerRunner(server, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site
