"""The console's memory: `RequestLog` (the last 200 requests) and `Traffic` (15 minutes).

Pure unit tests with chosen times; what reaches them from real requests is
tested through ``/-/requests`` in tests/admin/test_console.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from sidecar.telemetry.logs import redact_query
from sidecar.telemetry.recent import (
    BUCKET,
    EDGES,
    RECENT,
    WINDOW,
    Entry,
    RequestLog,
    Traffic,
)

T0 = 1_800_000_000.0  # a bucket boundary (a multiple of BUCKET)


BASE = Entry(
    at=T0,
    route="main",
    method="GET",
    raw_path="/x",
    status=200,
    duration_ms=12.5,
    upstream_ms=11.0,
    bytes_in=0,
    bytes_out=300,
    request_id="r-1",
    error=None,
    hint=None,
    supplied=None,
    content_type="application/json",
)


def entry(raw_path: str = "/x", **fields: Any) -> Entry:
    return BASE._replace(raw_path=raw_path, **fields)


# ------------------------------------------------------------------ RequestLog


def test_the_log_keeps_the_last_200_newest_first() -> None:
    log = RequestLog()
    for i in range(250):
        log.add(entry(f"/n/{i}", at=T0 + i))
    assert RECENT == 200
    assert len(log) == 200
    paths = [r["path"] for r in log.as_json()]
    assert paths == [f"/n/{i}" for i in range(249, 49, -1)]


def test_an_entry_reads_as_the_access_line_shows_it() -> None:
    log = RequestLog()
    log.add(entry("/odata/v2/User", at=T0 + 0.75, supplied="csrf,session"))
    [r] = log.as_json()
    assert r == {
        "time": "2027-01-15T08:00:00Z",
        "route": "main",
        "method": "GET",
        "path": "/odata/v2/User",
        "status": 200,
        "duration_ms": 12.5,
        "upstream_ms": 11.0,
        "bytes_in": 0,
        "bytes_out": 300,
        "request_id": "r-1",
        "error": None,
        "hint": None,
        "supplied": "csrf,session",
        "content_type": "application/json",
    }


QUERIES = [
    "$filter=lastName%20eq%20%27Doe%27&$top=5",
    "apikey=s3cr3t&apikey=again&flag",
    "a%5Bb%5D=1&%24skip=20",
    "=novalue&x=",
]


@pytest.mark.parametrize("query", QUERIES)
def test_query_values_are_redacted_as_in_the_access_log(query: str) -> None:
    log = RequestLog()
    log.add(entry(f"/odata/v2/User?{query}"))
    [r] = log.as_json()
    assert r["path"] == f"/odata/v2/User?{redact_query(query, keep_values=False)}"
    for value in ("Doe", "s3cr3t", "again", "20"):
        assert value not in str(r["path"])
    [kept] = log.as_json(keep_query_values=True)
    assert kept["path"] == f"/odata/v2/User?{query}"


def test_a_path_without_query_gets_no_question_mark() -> None:
    log = RequestLog()
    log.add(entry("/plain"))
    log.add(entry("/empty?"))
    assert [r["path"] for r in log.as_json()] == ["/empty", "/plain"]


def test_an_absolute_form_target_loses_its_userinfo() -> None:
    """``GET http://user:password@host/p`` (a client using the sidecar as http_proxy):
    the password is a credential, shown nowhere, with or without query values."""
    log = RequestLog()
    log.add(entry("http://user:hunter2@api.example.com:8443/odata/v2/User?$top=1"))
    log.add(entry("https://token-only@api.example.com"))
    log.add(entry("/odata/v2/User('a@b')"))  # an @ in a plain path is no userinfo
    for keep in (False, True):
        paths = [r["path"] for r in log.as_json(keep_query_values=keep)]
        assert paths == [
            "/odata/v2/User('a@b')",
            "https://api.example.com",
            "http://api.example.com:8443/odata/v2/User?$top=" + ("1" if keep else "***"),
        ]


def test_the_status_filter_keeps_one_class() -> None:
    log = RequestLog()
    for i, status in enumerate((200, 204, 302, 404, 499, 502, 101)):
        log.add(entry(f"/s/{i}", status=status))
    by_class = {
        c: [r["status"] for r in log.as_json(status_class=c)] for c in ("2xx", "3xx", "4xx", "5xx")
    }
    assert by_class == {"2xx": [204, 200], "3xx": [302], "4xx": [499, 404], "5xx": [502]}
    assert len(log.as_json()) == 7


def test_the_sidecars_own_error_keeps_its_code_and_hint() -> None:
    log = RequestLog()
    log.add(entry(status=502, error="upstream_connect_failed", hint="is the upstream up?",
                  upstream_ms=None))  # fmt: skip
    [r] = log.as_json()
    assert (r["error"], r["hint"], r["upstream_ms"]) == (
        "upstream_connect_failed",
        "is the upstream up?",
        None,
    )


def test_time_is_utc_iso() -> None:
    log = RequestLog()
    log.add(entry(at=T0 + 59.999))
    [r] = log.as_json()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(r["time"]))
    assert r["time"] == "2027-01-15T08:00:59Z"


# ------------------------------------------------------------------ Traffic


def test_requests_fall_into_10_second_buckets() -> None:
    assert BUCKET == 10.0
    traffic = Traffic()
    for at in (T0, T0 + 3.2, T0 + 9.999):
        traffic.add(200, 0.01, now=at)
    traffic.add(200, 0.01, now=T0 + 10.0)
    traffic.add(200, 0.01, now=T0 + 35.0)
    window = traffic.window(now=T0 + 39.0)
    counts = {b.start - T0: b.count for b in window if b.count}
    assert counts == {0.0: 3, 10.0: 1, 30.0: 1}
    assert window[-1].start == T0 + 30.0  # the current bucket is the last


def test_the_window_is_90_buckets_of_15_minutes_oldest_first() -> None:
    assert WINDOW == 15 * 60
    traffic = Traffic()
    window = traffic.window(now=T0 + 5.0)
    assert len(window) == 90
    starts = [b.start for b in window]
    assert starts == [T0 - (89 - i) * BUCKET for i in range(90)]
    assert all(b.count == 0 and b.quantile(0.5) is None for b in window)


def test_buckets_older_than_15_minutes_leave_the_window() -> None:
    traffic = Traffic()
    traffic.add(200, 0.01, now=T0)
    traffic.add(500, 0.01, now=T0 + 100)
    assert sum(b.count for b in traffic.window(now=T0 + WINDOW - 1)) == 2
    later = traffic.window(now=T0 + WINDOW)
    assert sum(b.count for b in later) == 1
    assert later[-1 - 80].statuses == [0, 0, 0, 1]  # the 500, 80 buckets (800 s) back
    # Even after a silence longer than the window, the window holds only its own buckets.
    for i in range(200):
        traffic.add(200, 0.01, now=T0 + 10 * WINDOW + i * BUCKET)
    window = traffic.window(now=T0 + 10 * WINDOW + 199 * BUCKET)
    assert len(window) == 90 and sum(b.count for b in window) == 90


def test_statuses_are_counted_by_class() -> None:
    traffic = Traffic()
    for status in (101, 200, 204, 302, 304, 400, 404, 499, 500, 502, 504):
        traffic.add(status, 0.01, now=T0)
    [bucket] = [b for b in traffic.window(now=T0) if b.count]
    assert bucket.statuses == [3, 2, 3, 3]  # 1xx counted with 2xx
    assert bucket.count == 11


def test_quantiles_are_the_bucket_edges_below_which_requests_ended() -> None:
    traffic = Traffic()
    for seconds, n in ((0.003, 50), (0.2, 45), (2.0, 5)):
        for _ in range(n):
            traffic.add(200, seconds, now=T0)
    [bucket] = [b for b in traffic.window(now=T0) if b.count]
    assert bucket.quantile(0.5) == 0.005
    assert bucket.quantile(0.51) == 0.25
    assert bucket.quantile(0.95) == 0.25
    assert bucket.quantile(0.96) == 2.5
    assert bucket.quantile(1.0) == 2.5


def test_a_latency_on_an_edge_counts_below_it_and_beyond_the_last_edge_counts_as_it() -> None:
    traffic = Traffic()
    traffic.add(200, EDGES[0], now=T0)
    traffic.add(200, 3600.0, now=T0 + BUCKET)
    first, second = [b for b in traffic.window(now=T0 + BUCKET) if b.count]
    assert first.latency[0] == 1 and first.quantile(0.99) == EDGES[0]
    assert second.latency[-1] == 1 and second.quantile(0.5) == EDGES[-1]
