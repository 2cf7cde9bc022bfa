"""The admin endpoints under ``admin_prefix`` on every listener.

``health`` says the process serves; ``ready`` says the route has a loaded,
currently valid client certificate (503 with the reason otherwise);
``status`` is JSON for people, ``metrics`` Prometheus text for machines; the
console (the prefix itself, or ``console``) is HTML for people and
``requests`` its recent requests as JSON; ``intercept.pem`` is the interception
certificate https_proxy clients trust (404 when interception is off). Probes
(health, ready) and the certificate never need the inbound token; the others do
when one is configured. Nothing here ever shows a key, password, token or cookie.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from sidecar import __version__
from sidecar.credentials.certinfo import summarize
from sidecar.errors import ConfigError
from sidecar.forward.answer import Answer, json_answer
from sidecar.forward.failures import (
    CREDENTIALS_UNAVAILABLE,
    FORBIDDEN_TARGET,
    INBOUND_AUTH_REQUIRED,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    error_response,
)
from sidecar.forward.handler import TOKEN_MISSING
from sidecar.forward.listener import Request
from sidecar.intercept.certificate import route_certificates
from sidecar.intercept.trust import client_lines
from sidecar.runtime import RouteRuntime, readiness, route_status
from sidecar.telemetry.recent import STATUS_CLASSES

if TYPE_CHECKING:
    from sidecar.admin.console import Interception
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
        routes: Callable[[], Sequence[RouteRuntime]] = lambda: (),
        started_at: float | None = None,
        query_values: bool = False,
    ) -> None:
        self.prefix = prefix
        self.runtime = runtime
        self.proxy = proxy
        self.status = status  # the whole sidecar's /-/status document
        self.metrics = metrics
        self.routes = routes  # every route, for the console
        self.started_at = time.time() if started_at is None else started_at
        self.query_values = query_values  # the access log's choice, for /-/requests too

    def matches(self, path: str) -> bool:
        return path.startswith(self.prefix)

    async def handle(self, request: Request) -> Answer:
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
            return json_answer({"status": "ok"})
        if name == "ready":
            reason = readiness(self.runtime)
            route = self.runtime.route.name
            if reason is None:
                return json_answer({"status": "ready", "route": route})
            return json_answer({"status": "unavailable", "route": route, "reason": reason}, 503)
        if name == "intercept.pem":
            return self.intercept_pem()
        if name in ("status", "metrics", "", "console", "requests"):
            if not self.proxy.token_ok(request):
                return error_response(INBOUND_AUTH_REQUIRED, TOKEN_MISSING)
            if name == "status":
                return json_answer(self.status())
            if name == "metrics":
                content_type = self.metrics.exposition_type()
                return Answer(
                    200, CIMultiDict({"Content-Type": content_type}), self.metrics.exposition()
                )
            status_class = request.query.get("status")
            if status_class is not None and status_class not in STATUS_CLASSES:
                return error_response(
                    NOT_FOUND, f"status={status_class[:20]!r}: give one of " +
                    ", ".join(STATUS_CLASSES)
                )  # fmt: skip
            requests = self.metrics.recent.as_json(
                keep_query_values=self.query_values, status_class=status_class
            )
            if name == "requests":
                return json_answer({"requests": requests})
            headers = {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"}
            page = self.console(requests, status_class)
            return Answer(200, CIMultiDict(headers), page.encode())
        return error_response(NOT_FOUND, f"no admin endpoint {request.path}")

    def console(self, requests: list[dict[str, object]], status_class: str | None) -> str:
        # Imported at the first page: a sidecar nobody looks at never loads it.
        from sidecar.admin.console import RouteView, render

        views = []
        for rt in self.routes():
            generation = rt.client.current
            chain = [summarize(c) for c in generation.identity.chain] if generation else []
            views.append(
                RouteView(
                    route_status(rt),
                    chain,
                    rt.route.credentials.warn_before / 86400,
                    self._interception(rt),
                )
            )
        return render(
            version=__version__,
            uptime=time.time() - self.started_at,
            prefix=self.prefix,
            routes=views,
            requests=requests,
            traffic=self.metrics.traffic.window(),
            status_class=status_class,
        )

    def _interception(self, rt: RouteRuntime) -> Interception:
        """What the console shows of a route's interception (public facts only)."""
        from sidecar.admin.console import Interception

        route = rt.route
        if not route.intercept.enabled:
            return Interception(enabled=False)
        generation = rt.client.current
        upstream = generation.target.upstream if generation else route.upstream
        try:
            current = route_certificates(route, rt.index, upstream).current()
        except ConfigError as exc:
            return Interception(enabled=True, problem=str(exc))
        proxy = f"http://{rt.bound_address}"
        lines = client_lines(current.cert_path, proxy, current.names[0], route.name)
        return Interception(
            enabled=True,
            names=current.names,
            sha256=current.fingerprint,
            not_after=current.not_after.isoformat(),
            trust_lines=lines,
        )

    def intercept_pem(self) -> Answer:
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
        return Answer(200, CIMultiDict({"Content-Type": "application/x-pem-file"}), pem)
