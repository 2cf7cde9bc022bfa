"""The admin endpoints under ``admin_prefix`` on every listener.

``health`` says the process serves; ``ready`` says the route has a loaded,
currently valid client certificate (503 with the reason otherwise);
``status`` is JSON for people, ``metrics`` Prometheus text for machines;
``intercept.pem`` is the interception certificate https_proxy clients trust
(404 when interception is off). Probes (health, ready) and the certificate
never need the inbound token; status and metrics do when one is configured.
Nothing here ever shows a key, password or token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from sidecar.errors import ConfigError
from sidecar.forward.failures import (
    CREDENTIALS_UNAVAILABLE,
    FORBIDDEN_TARGET,
    INBOUND_AUTH_REQUIRED,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    error_response,
)
from sidecar.forward.handler import TOKEN_MISSING
from sidecar.intercept.certificate import route_certificates
from sidecar.runtime import RouteRuntime, readiness
from sidecar.telemetry.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from sidecar.forward.handler import RouteProxy
    from sidecar.telemetry.metrics import SidecarMetrics


class Admin:
    """Answers ``{prefix}health|ready|status|metrics|intercept.pem`` for one route's listener."""

    def __init__(
        self,
        prefix: str,
        runtime: RouteRuntime,
        proxy: RouteProxy,
        *,
        status: Callable[[], dict[str, object]],
        metrics: SidecarMetrics,
    ) -> None:
        self.prefix = prefix
        self.runtime = runtime
        self.proxy = proxy
        self.status = status  # the whole sidecar's /-/status document
        self.metrics = metrics

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
        if name == "intercept.pem":
            return self.intercept_pem()
        if name in ("status", "metrics"):
            if not self.proxy.token_ok(request):
                return error_response(INBOUND_AUTH_REQUIRED, TOKEN_MISSING)
            if name == "status":
                return web.json_response(self.status())
            return web.Response(
                body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE}
            )
        return error_response(NOT_FOUND, f"no admin endpoint {request.path}")

    def intercept_pem(self) -> web.StreamResponse:
        """The interception certificate (and its successor near expiry): public, no token."""
        route = self.runtime.route
        if not route.intercept.enabled:
            return error_response(
                NOT_FOUND,
                f"interception is off for route {route.name}: no certificate to trust",
                "turn it on with `intercept: {enabled: true}` or `mtls-sidecar run --intercept`",
            )
        generation = self.proxy.client.current
        upstream = generation.target.upstream if generation else route.upstream
        try:
            pem = route_certificates(route, self.runtime.index, upstream).pem()
        except ConfigError as exc:
            return error_response(CREDENTIALS_UNAVAILABLE, exc.message, exc.hint)
        return web.Response(body=pem, headers={"Content-Type": "application/x-pem-file"})
