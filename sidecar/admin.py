"""The admin endpoints under ``admin_prefix`` on every listener.

``health`` says the process serves; ``ready`` says the route has a loaded,
currently valid client certificate (503 with the reason otherwise).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from sidecar.server import RouteRuntime


def readiness(runtime: RouteRuntime, now: dt.datetime | None = None) -> str | None:
    """None when the route can serve, else the reason it cannot."""
    generation = runtime.client.current
    if generation is None:
        return runtime.last_error or "no client certificate loaded yet"
    not_after = generation.identity.leaf.not_valid_after_utc
    if (now or dt.datetime.now(dt.UTC)) >= not_after:
        return f"the client certificate expired on {not_after:%Y-%m-%d %H:%M} UTC"
    return None


class Admin:
    """Answers ``{prefix}health`` and ``{prefix}ready`` for one route's listener."""

    def __init__(self, prefix: str, runtime: RouteRuntime) -> None:
        self.prefix = prefix
        self.runtime = runtime

    def matches(self, path: str) -> bool:
        return path.startswith(self.prefix)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        name = request.path[len(self.prefix) :]
        if request.method not in ("GET", "HEAD"):
            return web.json_response({"error": {"code": "method_not_allowed"}}, status=405)
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
        return web.json_response(
            {"error": {"code": "not_found", "message": f"no admin endpoint {request.path}"}},
            status=404,
        )
