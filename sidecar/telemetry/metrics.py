"""Prometheus metrics and the per-route counters ``/-/status`` shows.

Each `Sidecar` owns one `CollectorRegistry` (not the global one), so several
sidecars in one process (the tests) never mix their numbers. Label values are
bounded: methods outside the standard set count as ``OTHER``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from sidecar.telemetry.recent import Entry, RequestLog, Traffic

CONTENT_TYPE = CONTENT_TYPE_LATEST

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "MERGE"})
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class SidecarMetrics:
    """All metric families of one sidecar process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests", "Requests answered, by route, method and status code",
            ["route", "method", "code"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "sidecar_request_duration_seconds", "Time from request to end of response",
            ["route"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "sidecar_upstream_errors", "Failures talking to the upstream, by kind",
            ["route", "kind"], registry=r,
        )  # fmt: skip
        self.not_after = Gauge(
            "sidecar_client_cert_not_after_seconds",
            "Expiry of the loaded client certificate (Unix time)", ["route"], registry=r,
        )  # fmt: skip
        self.pending = Gauge(
            "sidecar_client_cert_pending",
            "1 while a renewed client certificate is held back (the upstream refused it, "
            "or it could not be tested yet)", ["route"], registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "sidecar_credential_reloads", "Credential loads, by result",
            ["route", "result"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "sidecar_requests_in_flight", "Requests being forwarded now", ["route"], registry=r
        )
        self.sessions = Counter(
            "sidecar_upstream_sessions", "Sessions the upstream opened (new session cookies "
            "kept for clients that send none)", ["route"], registry=r,
        )  # fmt: skip
        self.csrf_fetches = Counter(
            "sidecar_csrf_fetches", "CSRF tokens fetched for writes that carried none",
            ["route"], registry=r,
        )  # fmt: skip
        self.throttled = Counter(
            "sidecar_upstream_throttled", "429 and 503 answers with Retry-After, passed through",
            ["route"], registry=r,
        )  # fmt: skip
        self.upstream_connections = Gauge(
            "sidecar_upstream_connections", "Open upstream connections (idle and busy)",
            ["route"], registry=r,
        )  # fmt: skip

        # What the console shows: the last requests and 15 minutes of traffic, all routes.
        self.recent = RequestLog()
        self.traffic = Traffic()

    def route(self, name: str) -> RouteStats:
        return RouteStats(name, self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class LastEvent:
    at: str
    message: str


@dataclass
class RouteStats:
    """What one route records; Prometheus families plus plain numbers for status."""

    name: str
    metrics: SidecarMetrics
    requests: int = 0
    upstream_errors: int = 0
    sessions: int = 0
    csrf_fetches: int = 0
    throttled: int = 0
    last_upstream_error: LastEvent | None = None
    last_reload: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = self.metrics
        self.in_flight = 0  # a plain int read at scrape time: no lock per request
        m.in_flight.labels(self.name).set_function(lambda: self.in_flight)
        self._counters: dict[tuple[str, int], Counter] = {}
        self._duration_child = m.duration.labels(self.name)
        for result in ("success", "failure"):
            m.reloads.labels(self.name, result)  # show zeroes from the start
        self._pending = m.pending.labels(self.name)
        self._pending.set(0)
        self._sessions = m.sessions.labels(self.name)
        self._csrf_fetches = m.csrf_fetches.labels(self.name)
        self._throttled = m.throttled.labels(self.name)

    def started(self) -> float:
        self.in_flight += 1
        return time.perf_counter()

    def recent(self, entry: Entry) -> None:
        """The console's record of one request: the recent list and the traffic charts."""
        self.metrics.recent.add(entry)
        self.metrics.traffic.add(entry.status, entry.duration_ms / 1000, entry.at)

    def finished(self, method: str, status: int, elapsed: float) -> None:
        self.in_flight -= 1
        self.requests += 1
        key = (method if method in _METHODS else "OTHER", status)
        counter = self._counters.get(key)
        if counter is None:  # label lookups cost more than the increment: once per pair
            counter = self._counters[key] = self.metrics.requests.labels(
                self.name, key[0], str(status)
            )
        counter.inc()
        self._duration_child.observe(elapsed)

    def upstream_error(self, kind: str, message: str) -> None:
        self.upstream_errors += 1
        self.last_upstream_error = LastEvent(_now(), message)
        self.metrics.upstream_errors.labels(self.name, kind).inc()

    def set_pending(self, pending: bool) -> None:
        self._pending.set(1 if pending else 0)

    def session_opened(self) -> None:
        self.sessions += 1
        self._sessions.inc()

    def csrf_fetched(self) -> None:
        self.csrf_fetches += 1
        self._csrf_fetches.inc()

    def upstream_throttled(self) -> None:
        self.throttled += 1
        self._throttled.inc()

    def reloaded(self, ok: bool, message: str | None, not_after: dt.datetime | None) -> None:
        self.metrics.reloads.labels(self.name, "success" if ok else "failure").inc()
        self.last_reload = {"at": _now(), "result": "success" if ok else "failure",
                            "error": message}  # fmt: skip
        if ok and not_after is not None:
            self.metrics.not_after.labels(self.name).set(not_after.timestamp())

    def track_connections(self, count: Callable[[], int]) -> None:
        self.metrics.upstream_connections.labels(self.name).set_function(count)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
