"""What the last minutes looked like, for the console: recent requests and traffic.

`RequestLog` keeps the last `RECENT` requests of the whole sidecar in a ring
buffer (memory only, nothing on disk); `Traffic` keeps 15 minutes of counts and
latencies in 10-second buckets for the console's charts. Both are fed once per
request by the handler's `_record` and cost a tuple and a few additions: the
query is stored as sent and redacted when read (`redact_query`; the userinfo of
an absolute-form target dropped), so a request pays nothing for it. What is
kept is what the access line shows (no header value but the response's
Content-Type, never a body, cookie or token).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from sidecar.telemetry.logs import redact_query, without_userinfo

RECENT = 200  # requests kept
BUCKET = 10.0  # seconds per traffic bucket
WINDOW = 15 * 60  # seconds of traffic kept
#: latency bucket edges (seconds); a request falls in the first edge it does not exceed
EDGES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")


class Entry(NamedTuple):
    """One finished request as the access line shows it (the query still unredacted)."""

    at: float  # time.time()
    route: str
    method: str
    raw_path: str  # as sent: percent-encoded path and query
    status: int
    duration_ms: float
    upstream_ms: float | None
    bytes_in: int
    bytes_out: int
    request_id: str
    error: str | None  # the sidecar's own error code, when it answered itself
    hint: str | None
    supplied: str | None  # what the sidecar's session supplied
    content_type: str | None  # the answer's


class RequestLog:
    """The last `RECENT` requests, newest last."""

    def __init__(self, size: int = RECENT) -> None:
        self._entries: deque[Entry] = deque(maxlen=size)

    def add(self, entry: Entry) -> None:
        self._entries.append(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def as_json(
        self, *, keep_query_values: bool = False, status_class: str | None = None
    ) -> list[dict[str, object]]:
        """Newest first, the query redacted as in the access log; optionally one class."""
        out = []
        for e in reversed(self._entries):
            if status_class is not None and f"{e.status // 100}xx" != status_class:
                continue
            path, _, query = e.raw_path.partition("?")
            path = without_userinfo(path)
            query = redact_query(query, keep_values=keep_query_values)
            out.append(
                {
                    "time": _iso(e.at),
                    "route": e.route,
                    "method": e.method,
                    "path": path + (f"?{query}" if query else ""),
                    "status": e.status,
                    "duration_ms": e.duration_ms,
                    "upstream_ms": e.upstream_ms,
                    "bytes_in": e.bytes_in,
                    "bytes_out": e.bytes_out,
                    "request_id": e.request_id,
                    "error": e.error,
                    "hint": e.hint,
                    "supplied": e.supplied,
                    "content_type": e.content_type,
                }
            )
        return out


@dataclass
class Bucket:
    """The requests that ended in one `BUCKET`-second slot."""

    start: float
    statuses: list[int]  # counts per STATUS_CLASSES (1xx counted with 2xx)
    latency: list[int]  # counts per EDGES slot, plus one for longer ones

    @property
    def count(self) -> int:
        return sum(self.statuses)

    def quantile(self, q: float) -> float | None:
        """The latency (seconds, a bucket edge) below which ``q`` of the requests ended."""
        total = sum(self.latency)
        if not total:
            return None
        seen = 0
        for i, n in enumerate(self.latency):
            seen += n
            if seen >= q * total:
                return EDGES[i] if i < len(EDGES) else EDGES[-1]
        return EDGES[-1]


class Traffic:
    """Counts and latencies of the last `WINDOW` seconds in `BUCKET`-second buckets."""

    def __init__(self) -> None:
        self._buckets: deque[Bucket] = deque(maxlen=int(WINDOW // BUCKET))

    def add(self, status: int, seconds: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        start = now - now % BUCKET
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(Bucket(start, [0] * 4, [0] * (len(EDGES) + 1)))
        bucket = self._buckets[-1]
        bucket.statuses[min(max(status // 100 - 2, 0), 3)] += 1
        bucket.latency[bisect.bisect_left(EDGES, seconds)] += 1

    def window(self, now: float | None = None) -> list[Bucket]:
        """Every bucket of the last `WINDOW` seconds, oldest first, empty ones included."""
        now = time.time() if now is None else now
        last = now - now % BUCKET
        first = last - (WINDOW // BUCKET - 1) * BUCKET
        held = {b.start: b for b in self._buckets if b.start >= first}
        slots = int(WINDOW // BUCKET)
        return [
            held.get(s) or Bucket(s, [0] * 4, [0] * (len(EDGES) + 1))
            for s in (first + i * BUCKET for i in range(slots))
        ]


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
