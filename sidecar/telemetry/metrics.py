"""Prometheus metrics and the per-route counters ``/-/status`` shows.

The request path only adds to plain numbers (`RouteStats`): no lock, no label
lookup per request. The Prometheus client is imported at the first scrape (or
when something asks for the registry), which builds one `CollectorRegistry`
per `Sidecar` (not the global one, so several sidecars in one process, the
tests, never mix their numbers) whose collector reads those numbers. Label
values are bounded: methods outside the standard set count as ``OTHER``.
"""

from __future__ import annotations

import bisect
import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sidecar.telemetry.recent import Entry, RequestLog, Traffic

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "MERGE"})
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_LE = (*(repr(float(b)) for b in _BUCKETS), "+Inf")  # as Prometheus writes them: 1.0, 0.005


class SidecarMetrics:
    """All metric families of one sidecar process: the routes' numbers, exported."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self._registry: CollectorRegistry | None = None
        # What the console shows: the last requests and 15 minutes of traffic, all routes.
        self.recent = RequestLog()
        self.traffic = Traffic()

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats(name, self)
        return stats

    @property
    def registry(self) -> CollectorRegistry:
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry()
            self._registry.register(_Collector(self))
        return self._registry

    def exposition(self) -> bytes:
        """The text exposition, in the format `exposition_type` names."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    @staticmethod
    def exposition_type() -> str:
        from prometheus_client import CONTENT_TYPE_LATEST  # its version follows the client's

        return CONTENT_TYPE_LATEST


class _Collector:
    """Reads the routes' numbers into Prometheus families at each scrape."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        routes = list(self._metrics.routes.values())

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=["route", *labels])

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["route"])

        requests = counter(
            "sidecar_requests", "Requests answered, by route, method and status code",
            ["method", "code"],
        )  # fmt: skip
        duration = HistogramMetricFamily(
            "sidecar_request_duration_seconds", "Time from request to end of response",
            labels=["route"],
        )  # fmt: skip
        errors = counter(
            "sidecar_upstream_errors", "Failures talking to the upstream, by kind", ["kind"]
        )
        not_after = gauge(
            "sidecar_client_cert_not_after_seconds",
            "Expiry of the loaded client certificate (Unix time)",
        )
        pending = gauge(
            "sidecar_client_cert_pending",
            "1 while a renewed client certificate is held back (the upstream refused it, "
            "or it could not be tested yet)",
        )
        reloads = counter("sidecar_credential_reloads", "Credential loads, by result", ["result"])
        in_flight = gauge("sidecar_requests_in_flight", "Requests being forwarded now")
        sessions = counter(
            "sidecar_upstream_sessions", "Sessions the upstream opened (new session cookies "
            "kept for clients that send none)", [],
        )  # fmt: skip
        csrf = counter(
            "sidecar_csrf_fetches", "CSRF tokens fetched for writes that carried none", []
        )
        throttled = counter(
            "sidecar_upstream_throttled",
            "429 and 503 answers with Retry-After, passed through", [],
        )  # fmt: skip
        connections = gauge(
            "sidecar_upstream_connections", "Open upstream connections (idle and busy)"
        )
        for r in routes:
            for (method, code), n in r.by_code.items():
                requests.add_metric([r.name, method, str(code)], n)
            cumulative, total = [], 0
            for le, n in zip(_LE, r.buckets, strict=True):
                total += n
                cumulative.append((le, total))
            duration.add_metric([r.name], cumulative, r.duration_sum)
            for kind, n in r.errors_by_kind.items():
                errors.add_metric([r.name, kind], n)
            if r.not_after is not None:
                not_after.add_metric([r.name], r.not_after)
            pending.add_metric([r.name], 1 if r.pending else 0)
            for result, n in r.reloads.items():
                reloads.add_metric([r.name, result], n)
            in_flight.add_metric([r.name], r.in_flight)
            sessions.add_metric([r.name], r.sessions)
            csrf.add_metric([r.name], r.csrf_fetches)
            throttled.add_metric([r.name], r.throttled)
            if r.connections is not None:
                connections.add_metric([r.name], r.connections())
        yield from (requests, duration, errors, not_after, pending, reloads, in_flight,
                    sessions, csrf, throttled, connections)  # fmt: skip


@dataclass
class LastEvent:
    at: str
    message: str


@dataclass
class RouteStats:
    """What one route records: plain numbers, read by ``/-/status`` and at each scrape."""

    name: str
    metrics: SidecarMetrics
    requests: int = 0
    upstream_errors: int = 0
    sessions: int = 0
    csrf_fetches: int = 0
    throttled: int = 0
    in_flight: int = 0
    pending: bool = False
    not_after: float | None = None  # the loaded client certificate's expiry (Unix time)
    last_upstream_error: LastEvent | None = None
    last_reload: dict[str, str | None] = field(default_factory=dict)
    by_code: dict[tuple[str, int], int] = field(default_factory=dict)  # (method, status)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(_BUCKETS) + 1))
    duration_sum: float = 0.0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    connections: Callable[[], int] | None = None  # open upstream connections, read at scrape

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
        self.by_code[key] = self.by_code.get(key, 0) + 1
        # le buckets: the first bound >= elapsed counts it (the last one is +Inf)
        self.buckets[bisect.bisect_left(_BUCKETS, elapsed)] += 1
        self.duration_sum += elapsed

    def upstream_error(self, kind: str, message: str) -> None:
        self.upstream_errors += 1
        self.last_upstream_error = LastEvent(_now(), message)
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1

    def set_pending(self, pending: bool) -> None:
        self.pending = pending

    def session_opened(self) -> None:
        self.sessions += 1

    def csrf_fetched(self) -> None:
        self.csrf_fetches += 1

    def upstream_throttled(self) -> None:
        self.throttled += 1

    def reloaded(self, ok: bool, message: str | None, not_after: dt.datetime | None) -> None:
        result = "success" if ok else "failure"
        self.reloads[result] += 1
        self.last_reload = {"at": _now(), "result": result, "error": message}
        if ok and not_after is not None:
            self.not_after = not_after.timestamp()

    def track_connections(self, count: Callable[[], int]) -> None:
        self.connections = count


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
