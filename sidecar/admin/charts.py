"""Small inline SVG drawings for the console, drawn on the server (no chart library).

`validity_bar` shows a certificate's life with today marked; `latency_chart` and
`status_chart` show the last 15 minutes of `sidecar.telemetry.recent.Traffic`.
Every drawing carries a ``<title>`` and an ``aria-label`` so it reads without sight,
and every text in it is escaped.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from html import escape

from sidecar.telemetry.recent import BUCKET, STATUS_CLASSES, Bucket

WIDTH, HEIGHT = 720, 140
_PAD_LEFT, _PAD_BOTTOM, _PAD_TOP = 52, 18, 8
STATUS_COLOURS = dict(
    zip(STATUS_CLASSES, ("#2e7d32", "#1565c0", "#ef6c00", "#c62828"), strict=True)
)
_LOW, _HIGH = 0.001, 300.0  # the latency axis, seconds (log scale)


def validity_bar(
    not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime, tone: str
) -> str:
    """The certificate's validity as a bar, the part lived filled, today a line."""
    span = (not_after - not_before).total_seconds() or 1.0
    lived = min(max((now - not_before).total_seconds() / span, 0.0), 1.0)
    width = 320
    x = round(lived * width, 1)
    label = f"valid {not_before:%Y-%m-%d} to {not_after:%Y-%m-%d}; today is {now:%Y-%m-%d}"
    return (
        f'<svg class="bar {escape(tone)}" width="{width}" height="16" viewBox="0 0 {width} 16" '
        f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>'
        f'<rect x="0" y="3" width="{width}" height="10" rx="3" class="rest"/>'
        f'<rect x="0" y="3" width="{x}" height="10" rx="3" class="lived"/>'
        f'<line x1="{x}" y1="0" x2="{x}" y2="16" class="today"/></svg>'
    )


def latency_chart(buckets: Sequence[Bucket]) -> str:
    """p50 and p95 latency per bucket on a log scale (gaps where nothing was served)."""
    label = "Latency over the last 15 minutes: median and 95th percentile per 10 seconds"
    parts = [_frame(label)]
    for seconds, text in ((0.01, "10 ms"), (0.1, "100 ms"), (1.0, "1 s"), (10.0, "10 s")):
        y = _y_latency(seconds)
        parts.append(
            f'<line x1="{_PAD_LEFT}" y1="{y}" x2="{WIDTH}" y2="{y}" class="grid"/>'
            f'<text x="{_PAD_LEFT - 4}" y="{y + 4}" class="axis" text-anchor="end">{text}</text>'
        )
    for q, css in ((0.5, "p50"), (0.95, "p95")):
        for run in _runs([b.quantile(q) for b in buckets]):
            points = " ".join(f"{_x(i, len(buckets))},{_y_latency(v)}" for i, v in run)
            parts.append(f'<polyline points="{points}" class="{css}"/>')
    parts.append(_time_axis(len(buckets)))
    parts.append(
        f'<text x="{WIDTH - 4}" y="{_PAD_TOP + 10}" class="legend" text-anchor="end">'
        '<tspan class="p50">— median</tspan> <tspan class="p95">— 95th percentile</tspan></text>'
    )
    return "".join(parts) + "</svg>"


def status_chart(buckets: Sequence[Bucket]) -> str:
    """Requests per bucket, stacked by status class."""
    label = "Requests over the last 15 minutes by status class, per 10 seconds"
    top = max((b.count for b in buckets), default=0) or 1
    plot = HEIGHT - _PAD_BOTTOM - _PAD_TOP
    bar = (WIDTH - _PAD_LEFT) / max(len(buckets), 1)
    parts = [_frame(label)]
    parts.append(
        f'<text x="{_PAD_LEFT - 4}" y="{_PAD_TOP + 4}" class="axis" text-anchor="end">{top}</text>'
        f'<text x="{_PAD_LEFT - 4}" y="{HEIGHT - _PAD_BOTTOM}" class="axis" '
        'text-anchor="end">0</text>'
    )
    for i, b in enumerate(buckets):
        base = float(HEIGHT - _PAD_BOTTOM)
        for cls, n in zip(STATUS_CLASSES, b.statuses, strict=True):
            if not n:
                continue
            h = round(n / top * plot, 1)
            base -= h
            x = round(_PAD_LEFT + i * bar, 1)
            parts.append(
                f'<rect x="{x}" y="{round(base, 1)}" width="{round(max(bar - 1, 1), 1)}" '
                f'height="{h}" fill="{STATUS_COLOURS[cls]}"><title>{cls}: {n}</title></rect>'
            )
    parts.append(_time_axis(len(buckets)))
    legend = " ".join(
        f'<tspan fill="{colour}">■ {cls}</tspan>' for cls, colour in STATUS_COLOURS.items()
    )
    parts.append(
        f'<text x="{WIDTH - 4}" y="{_PAD_TOP + 10}" class="legend" text-anchor="end">'
        f"{legend}</text>"
    )
    return "".join(parts) + "</svg>"


def _frame(label: str) -> str:
    return (
        f'<svg class="chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>'
        f'<line x1="{_PAD_LEFT}" y1="{HEIGHT - _PAD_BOTTOM}" x2="{WIDTH}" '
        f'y2="{HEIGHT - _PAD_BOTTOM}" class="axisline"/>'
    )


def _time_axis(slots: int) -> str:
    """Minutes ago under the plot, every 5 minutes."""
    out = []
    minutes = round(slots * BUCKET / 60)
    for ago in range(0, minutes + 1, 5):
        i = slots - ago * 60 / BUCKET
        x = _x(max(i - 1, 0), slots) if ago else _x(slots - 1, slots)
        text = "now" if ago == 0 else f"-{ago} min"
        anchor = "end" if ago == 0 else "middle"
        out.append(
            f'<text x="{x}" y="{HEIGHT - 4}" class="axis" text-anchor="{anchor}">{text}</text>'
        )
    return "".join(out)


def _x(i: int | float, slots: int) -> float:
    step = (WIDTH - _PAD_LEFT) / max(slots, 1)
    return round(_PAD_LEFT + (i + 0.5) * step, 1)


def _y_latency(seconds: float) -> float:
    plot = HEIGHT - _PAD_BOTTOM - _PAD_TOP
    low, high = math.log10(_LOW), math.log10(_HIGH)
    value = min(max(math.log10(max(seconds, _LOW)), low), high)
    return round(_PAD_TOP + (high - value) / (high - low) * plot, 1)


def _runs(values: Sequence[float | None]) -> list[list[tuple[int, float]]]:
    """Consecutive buckets that have a value (a line is not drawn across silence)."""
    runs: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for i, v in enumerate(values):
        if v is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append((i, v))
    if current:
        runs.append(current)
    # A single point is drawn as a short line, so it shows.
    return [r if len(r) > 1 else [(r[0][0], r[0][1]), (r[0][0], r[0][1])] for r in runs]
