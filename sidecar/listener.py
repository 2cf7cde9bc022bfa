"""A route's HTTP listener: aiohttp's low-level server with our error answers.

The low-level server hands every request to one handler, whatever its target
(``CONNECT host:443``, ``OPTIONS *``, absolute-form without a path), so the
proxy decides about all of them; a router would answer some with its own 404.
Requests aiohttp's parser rejects get DESIGN.md's JSON ``bad_request`` too,
instead of aiohttp's text page, and nothing ever shows a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from sidecar.upstream_errors import BAD_REQUEST, INTERNAL_ERROR, error_response

log = logging.getLogger("sidecar.listener")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Protocol(RequestHandler):
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
            log.debug("refused a malformed request: %s", exc or message)
            response = error_response(BAD_REQUEST, f"malformed request: {message or exc}")
        else:
            log.error("internal error while handling %s %s: %s: %s", request.method,
                      request.path, type(exc).__name__, exc, exc_info=exc)  # fmt: skip
            response = error_response(
                INTERNAL_ERROR, "the sidecar failed to handle this request; see its log"
            )
        response.force_close()
        return response


class ListenerServer(web.Server):
    """`web.Server` whose connections answer errors as JSON."""

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return _Protocol(self, loop=self._loop, **kwargs)


async def start_listener(
    handler: Handler, host: str, port: int, *, shutdown_timeout: float
) -> tuple[web.ServerRunner, web.TCPSite]:
    """Serve ``handler`` on HOST:PORT; stop with ``runner.cleanup()``."""
    server = ListenerServer(
        handler,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        access_log=None,  # the proxy writes its own access line
        max_field_size=16384,
    )
    runner = web.ServerRunner(server, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site
