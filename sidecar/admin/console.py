"""The console at ``/-/``: one server-rendered HTML page for people.

Per route: where it forwards, the certificate chain with its validity drawn and
the days left coloured by ``warn_before``, a pending renewal with its next step,
the session and CSRF state, and interception. Then the last 15 minutes as
charts (`sidecar.admin.charts`) and the recent requests (filterable by status
class), with the sidecar's own errors and their hints.

No build step, no external file: styles inline, no script (the page refreshes
itself with a meta tag), so it works offline and in an air-gapped container.
Everything shown comes from ``/-/status`` and ``/-/requests`` (counts, ages,
public certificate facts, redacted paths) and every value is escaped: no key,
password, token or cookie can reach it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from sidecar.admin.charts import latency_chart, status_chart, validity_bar
from sidecar.credentials.certinfo import CertSummary
from sidecar.telemetry.recent import STATUS_CLASSES, Bucket

REFRESH = 15  # seconds between the page's reloads


@dataclass(frozen=True)
class RouteView:
    """One route as the console shows it."""

    status: Mapping[str, Any]  # the route's /-/status entry
    chain: Sequence[CertSummary]  # leaf first; empty before a certificate is loaded
    warn_before_days: float
    intercept: str | None = None  # HTML of the interception block, when it has one


def render(
    *,
    version: str,
    uptime: float,
    prefix: str,
    routes: Sequence[RouteView],
    requests: Sequence[Mapping[str, Any]],
    traffic: Sequence[Bucket],
    status_class: str | None,
    now: dt.datetime | None = None,
) -> str:
    """The whole page."""
    now = now or dt.datetime.now(dt.UTC)
    body = "".join(_route(r, now, prefix) for r in routes)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        "<title>mtls-sidecar console</title>"
        f"<style>{_CSS}</style></head><body>"
        f'<header><h1>mtls-sidecar</h1><p class="meta">version {escape(version)} · up '
        f"{_duration(uptime)} · refreshes every {REFRESH} s · "
        f'<a href="{escape(prefix)}status">status (JSON)</a> · '
        f'<a href="{escape(prefix)}requests">requests (JSON)</a> · '
        f'<a href="{escape(prefix)}metrics">metrics</a></p></header>'
        f"<main>{body}"
        '<section id="traffic"><h2>Last 15 minutes</h2>'
        f"<figure>{latency_chart(traffic)}</figure>"
        f"<figure>{status_chart(traffic)}</figure></section>"
        f"{_requests(requests, status_class, prefix)}"
        "</main></body></html>\n"
    )


def _route(view: RouteView, now: dt.datetime, prefix: str) -> str:
    s = view.status
    ready = bool(s.get("ready"))
    badge = (
        '<span class="badge ok">ready</span>'
        if ready
        else f'<span class="badge bad">not ready: {escape(str(s.get("not_ready_reason")))}</span>'
    )
    facts = _facts(
        ("listens on", f"http://{s.get('listen')}"),
        ("forwards to", s.get("upstream") or "(not known yet)"),
        ("company id", s.get("company_id") or "(none)"),
        ("credentials", s.get("credential_source")),
        ("last refresh", _last_refresh(s.get("last_refresh"))),
    )
    return (
        f'<section class="route" id="route-{escape(str(s.get("name")))}">'
        f"<h2>Route {escape(str(s.get('name')))} {badge}</h2>{facts}"
        f"{_certificate(view, now)}{_pending(s.get('pending'))}"
        f"{_session(s.get('session'))}"
        f"{view.intercept or ''}</section>"
    )


def _certificate(view: RouteView, now: dt.datetime) -> str:
    if not view.chain:
        return '<h3>Client certificate</h3><p class="bad">No certificate loaded.</p>'
    leaf = view.chain[0]
    not_before = dt.datetime.fromisoformat(leaf.not_before)
    not_after = dt.datetime.fromisoformat(leaf.not_after)
    tone = _tone(leaf, view.warn_before_days)
    if leaf.expired:
        # days_left is floored (-0.1 days is -1): the days since are counted from not_after
        ago = max(int((now - not_after).total_seconds() // 86400), 0)
        days = f"expired {_days(ago)} ago" if ago else "expired today"
    else:
        days = f"{_days(leaf.days_left)} left"
    rows = "".join(
        f"<tr><td>{'leaf' if i == 0 else ('root' if c.self_signed else 'intermediate')}</td>"
        f"<td>{escape(c.subject)}</td><td>{escape(c.issuer)}</td>"
        f"<td>{c.not_before[:10]}</td><td>{c.not_after[:10]}</td>"
        f'<td class="{_tone(c, view.warn_before_days)}">{c.days_left}</td>'
        f'<td class="mono small">{escape(c.sha256)}</td></tr>'
        for i, c in enumerate(view.chain)
    )
    advice = ""
    if tone != "ok":
        advice = (
            '<p class="advice">Renew it now: create the next certificate in SAP BTP, upload '
            "its public chain (<code>mtls-sidecar cert export-public</code>) to the X.509 "
            "certificate mapping in SuccessFactors Security Center, then put it in place; the "
            "sidecar tries it before switching.</p>"
        )
    return (
        "<h3>Client certificate</h3>"
        f'<p class="validity">{validity_bar(not_before, not_after, now, tone)} '
        f'<span class="{tone}">{days}</span> (until {leaf.not_after[:16].replace("T", " ")} '
        "UTC)</p>"
        f"{advice}"
        '<table class="chain"><thead><tr><th>role</th><th>subject</th><th>issuer</th>'
        "<th>not before</th><th>not after</th><th>days left</th><th>SHA-256</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _pending(pending: Mapping[str, Any] | None) -> str:
    if not pending:
        return "<h3>Renewal</h3><p>No renewed certificate waiting.</p>"
    probe = pending.get("last_probe") or {}
    refused = probe.get("result") == "rejected"
    step = (
        "Upload the new certificate's public chain (<code>mtls-sidecar cert export-public "
        "NEW.pem</code>) to the X.509 certificate mapping in SuccessFactors Security Center. "
        "The sidecar keeps serving with the current one, tries the new one again every "
        "minute and switches by itself once it is accepted."
        if refused
        else "The upstream could not be reached to test it; the sidecar keeps the current "
        "certificate and tries again every minute."
    )
    return (
        '<h3>Renewal</h3><div class="pending">'
        "<p><strong>A renewed certificate is pending</strong> since "
        f"{escape(str(pending.get('since')))}: {escape(str(pending.get('subject')))}, until "
        f"{escape(str(pending.get('not_after'))[:10])}.</p>"
        + _facts(
            ("SHA-256", pending.get("sha256")),
            ("last probe", f"{probe.get('at')}: {probe.get('result')}"),
            ("why", probe.get("message")),
            ("next probe in", f"{pending.get('next_probe_in_seconds')} s"),
        )
        + f'<p class="advice">Next step: {step}</p></div>'
    )


def _session(session: Mapping[str, Any] | None) -> str:
    if not session:
        return ""
    on = [name for name in ("reuse", "csrf") if session.get(name)]
    if not on:
        return "<h3>Session</h3><p>Session reuse and CSRF tokens are off for this route.</p>"
    token_age = session.get("csrf_token_age_seconds")
    session_age = session.get("session_age_seconds")
    return "<h3>Session and CSRF</h3>" + _facts(
        ("kept for clients that keep none", ", ".join(
            {"reuse": "session cookies", "csrf": "CSRF tokens"}[n] for n in on
        )),
        ("cookies held", session.get("cookies", 0)),
        ("session age", "no session yet" if session_age is None else _duration(session_age)),
        ("CSRF token age", "none cached" if token_age is None else _duration(token_age)),
        ("sessions opened upstream", session.get("sessions_opened", 0)),
        ("CSRF tokens fetched", session.get("csrf_fetches", 0)),
        ("throttled answers (429/503)", session.get("throttled", 0)),
    )  # fmt: skip


def _requests(requests: Sequence[Mapping[str, Any]], chosen: str | None, prefix: str) -> str:
    links = " ".join(
        f'<a href="{escape(prefix)}{"?status=" + c if c else ""}"'
        f"{' class=chosen' if c == chosen else ''}>{c or 'all'}</a>"
        for c in (None, *STATUS_CLASSES)
    )
    rows = "".join(_request_row(r) for r in requests)
    if not rows:
        rows = '<tr><td colspan="9">No requests yet.</td></tr>'
    return (
        '<section id="requests"><h2>Recent requests</h2>'
        f'<p class="filter">Show: {links}</p>'
        '<table class="requests"><thead><tr><th>time (UTC)</th><th>route</th><th>method</th>'
        "<th>path</th><th>status</th><th>ms</th><th>upstream ms</th><th>bytes in/out</th>"
        f"<th>request id</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _request_row(r: Mapping[str, Any]) -> str:
    status = int(r["status"])
    row = (
        f'<tr class="s{status // 100}xx"><td>{escape(str(r["time"])[11:19])}</td>'
        f"<td>{escape(str(r['route']))}</td><td>{escape(str(r['method']))}</td>"
        f'<td class="mono">{escape(str(r["path"]))}</td><td>{status}</td>'
        f"<td>{r['duration_ms']}</td><td>{_blank(r['upstream_ms'])}</td>"
        f"<td>{r['bytes_in']}/{r['bytes_out']}</td>"
        f'<td class="mono small">{escape(str(r["request_id"]))}</td></tr>'
    )
    if r.get("error"):
        row += (
            f'<tr class="fix"><td></td><td colspan="8">sidecar error <code>'
            f"{escape(str(r['error']))}</code>: {escape(str(r.get('hint') or ''))}</td></tr>"
        )
    return row


def _blank(value: object) -> str:
    return "" if value is None else escape(str(value))


def _facts(*pairs: tuple[str, object]) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in pairs)
    return f'<dl class="facts">{items}</dl>'


def _last_refresh(last: Mapping[str, Any] | None) -> str:
    if not last:
        return "never"
    text = f"{last.get('at')}: {last.get('result')}"
    return f"{text} ({last.get('error')})" if last.get("error") else text


def _tone(cert: CertSummary, warn_before_days: float) -> str:
    if cert.expired or cert.not_yet_valid:
        return "bad"
    return "warn" if cert.days_left < warn_before_days else "ok"


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b;
background:#f6f7f9}
header{background:#0b3d62;color:#fff;padding:12px 24px}header h1{margin:0;font-size:20px}
header a{color:#cfe6ff}.meta{margin:4px 0 0;opacity:.9}
main{padding:12px 24px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 16px;margin:12px 0}
h2{font-size:17px;margin:4px 0 8px}h3{font-size:15px;margin:14px 0 6px}
.badge{font-size:12px;padding:2px 8px;border-radius:10px;vertical-align:middle;color:#fff}
.badge.ok{background:#2e7d32}.badge.bad{background:#c62828}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:4px 0}
dt{color:#555}dd{margin:0;word-break:break-all}
.ok{color:#2e7d32}.warn{color:#b26a00;font-weight:600}.bad{color:#c62828;font-weight:600}
.badge.ok,.badge.bad{color:#fff;font-weight:600}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eceff1;vertical-align:top}
th{color:#555;font-weight:600}.mono{font-family:ui-monospace,Menlo,Consolas,monospace}
.small{font-size:11px}tr.s4xx td:nth-child(5){color:#b26a00}tr.s5xx td:nth-child(5){color:#c62828}
tr.fix td{color:#555;font-size:12px;border-bottom:1px solid #dde1e6}
.advice{background:#fff8e1;border-left:3px solid #f9a825;padding:6px 10px}
.pending{border-left:3px solid #ef6c00;padding-left:10px}
.filter a{margin-right:6px}.filter a.chosen{font-weight:700;text-decoration:none;color:#1b1b1b}
svg.bar .rest{fill:#e0e0e0}svg.bar.ok .lived{fill:#66bb6a}svg.bar.warn .lived{fill:#ffa726}
svg.bar.bad .lived{fill:#ef5350}svg.bar .today{stroke:#1b1b1b;stroke-width:2}
.validity svg{vertical-align:middle}
figure{margin:6px 0}svg.chart{max-width:100%;height:auto;background:#fafbfc}
svg .grid{stroke:#eceff1}svg .axisline{stroke:#b0bec5}
svg .axis,svg .legend{font-size:11px;fill:#555}
polyline{fill:none;stroke-width:2;stroke-linecap:round;stroke-linejoin:round}
polyline.p50,tspan.p50{stroke:#1565c0;fill:#1565c0}
polyline.p95,tspan.p95{stroke:#ef6c00;fill:#ef6c00}
polyline.p50,polyline.p95{fill:none}
code{background:#f1f3f5;padding:0 3px;border-radius:3px}
"""
