"""The admin endpoints under ``admin_prefix`` on every listener.

``health`` says the process serves; ``ready`` says the route has a loaded,
currently valid client certificate (503 with the reason otherwise);
``status`` is JSON for people, ``metrics`` Prometheus text for machines.
Probes (health, ready) never need the inbound token; status and metrics do
when one is configured. Nothing here ever shows a key, password or token.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from aiohttp import web

from sidecar.metrics import CONTENT_TYPE
from sidecar.proxy import TOKEN_MISSING
from sidecar.upstream_errors import (
    FORBIDDEN_TARGET,
    INBOUND_AUTH_REQUIRED,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    error_response,
)

if TYPE_CHECKING:
    from sidecar.proxy import RouteProxy
    from sidecar.server import RouteRuntime, Sidecar


def readiness(runtime: RouteRuntime, now: dt.datetime | None = None) -> str | None:
    """None when the route can serve, else the reason it cannot."""
    generation = runtime.client.current
    if generation is None:
        return runtime.last_error or "no client certificate loaded yet"
    not_after = generation.not_after
    if (now or dt.datetime.now(dt.UTC)) >= not_after:
        return f"the client certificate expired on {not_after:%Y-%m-%d %H:%M} UTC"
    return None


class Admin:
    """Answers ``{prefix}health|ready|status|metrics`` for one route's listener."""

    def __init__(self, sidecar: Sidecar, runtime: RouteRuntime, proxy: RouteProxy) -> None:
        self.prefix = sidecar.config.admin_prefix
        self.sidecar = sidecar
        self.runtime = runtime
        self.proxy = proxy

    def matches(self, path: str) -> bool:
        return path.startswith(self.prefix)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        foreign = self.proxy.foreign_target(request)
        if foreign is not None:
            # `GET http://other.host/-/status` is meant for another server: never ours to answer.
            return error_response(FORBIDDEN_TARGET, foreign)
        name = request.path[len(self.prefix) :]
        if request.method not in ("GET", "HEAD"):
            response = error_response(
                METHOD_NOT_ALLOWED, f"{request.method} {request.path}: admin endpoints answer GET"
            )
            response.headers["Allow"] = "GET, HEAD"
            return response
        if name == "health":
            return web.json_response({"status": "ok"})
        if name == "ready":
            reason = readiness(self.runtime)
            route = self.runtime.route.name
            if reason is None:
                return web.json_response({"status": "ready", "route": route})
            return web.json_response(
                {"status": "unavailable", "route": route, "reason": reason}, status=503
            )
        if name in ("status", "metrics"):
            if not self.proxy.token_ok(request):
                return error_response(INBOUND_AUTH_REQUIRED, TOKEN_MISSING)
            if name == "status":
                return web.json_response(self.sidecar.status())
            return web.Response(
                body=self.sidecar.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE}
            )
        return error_response(NOT_FOUND, f"no admin endpoint {request.path}")
