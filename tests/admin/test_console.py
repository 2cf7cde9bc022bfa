"""The console at ``/-/`` (HTML for people) and ``/-/requests`` (its requests as JSON).

The rendering tests call `render` with chosen routes: certificates of chosen
validity from the test PKI, a pending renewal as `Pending.status()` gives it,
session counts; every page is parsed with html5lib's strict HTML5 parser, which
raises on any parse error. The endpoint tests start a sidecar in front of a
`FakeUpstream` over real mTLS; the secrets test runs a whole session against the
demo's fake SuccessFactors (session cookies, CSRF tokens) and scans every page;
the browser test loads the demo's console in headless Chromium and saves the
screenshot the README shows (docs/console.png, rewritten with SIDECAR_SCREENSHOT=1).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import html5lib  # type: ignore[import-untyped]
import pytest

from sidecar.admin.charts import latency_chart, status_chart, validity_bar
from sidecar.admin.console import RouteView, render
from sidecar.config import Config, InboundConfig, LogConfig
from sidecar.credentials.certinfo import CertSummary, summarize
from sidecar.credentials.identity import read_bundle_bytes
from sidecar.credentials.sources import Loaded
from sidecar.demo.app import NEW_USER, demo_config, fake_successfactors
from sidecar.demo.pki import Issued
from sidecar.forward.probe import ProbeResult, Verdict
from sidecar.forward.upstream import route_target
from sidecar.runtime import Pending
from sidecar.server import Sidecar
from sidecar.telemetry.recent import Traffic
from tests.conftest import (
    PKI,
    ROOT,
    Demo,
    Running,
    free_port,
    key_material,
    route_config,
)
from tests.support.browser import Chromium
from tests.support.raw_http import raw
from tests.support.upstreams import FakeUpstream

TOKEN = "console-token-" + "5e1f" * 6
SVG = "{http://www.w3.org/2000/svg}"
DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
WARN_DAYS = 30.0  # credentials.warn_before's default, in days
SCREENSHOT = ROOT / "docs" / "console.png"


# ------------------------------------------------------------------ helpers


def parse(page: str) -> ET.Element:
    """The page as an element tree; html5lib's strict mode raises on any HTML5 parse error."""
    parser = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False)
    root: ET.Element = parser.parse(page)
    return root


def text(element: ET.Element | None) -> str:
    assert element is not None
    return " ".join("".join(element.itertext()).split())


def by_class(root: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in root.iter() if name in e.get("class", "").split()]


def facts(element: ET.Element | None) -> dict[str, str]:
    """A ``<dl class="facts">`` as a dict: each dt's text → its dd's text."""
    assert element is not None
    items = list(element)
    return {text(k): text(v) for k, v in zip(items[::2], items[1::2], strict=True)}


def section_facts(section: ET.Element, heading: str) -> dict[str, str]:
    """The facts after the ``<h3>`` titled ``heading`` in a route's section."""
    children = list(section)
    at = next(i for i, e in enumerate(children) if e.tag == "h3" and text(e) == heading)
    dl = next(e for e in children[at + 1 :] if e.tag == "dl")
    return facts(dl)


def status_entry(name: str, **fields: Any) -> dict[str, Any]:
    """A route's /-/status entry, as `sidecar.runtime.route_status` writes one."""
    entry: dict[str, Any] = {
        "name": name,
        "listen": "127.0.0.1:8080",
        "upstream": "https://api.example.com",
        "company_id": "ACME1234",
        "credential_source": f"pem /etc/sidecar/{name}.pem",
        "ready": True,
        "not_ready_reason": None,
        "last_refresh": {"at": "2026-12-04T10:00:00+00:00", "result": "success", "error": None},
        "counters": {"requests": 0, "upstream_errors": 0},
        "pending": None,
        "session": None,
        "last_upstream_error": None,
    }
    entry.update(fields)
    return entry


def chain_of(issued: Issued, now: dt.datetime) -> list[CertSummary]:
    return [summarize(c, now) for c in (issued.cert, *issued.parents)]


def page(
    *routes: RouteView,
    requests: Sequence[Mapping[str, Any]] = (),
    traffic: Traffic | None = None,
    now: dt.datetime | None = None,
) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return render(
        version="9.9.9",
        uptime=3725.0,
        prefix="/-/",
        routes=routes,
        requests=requests,
        traffic=(traffic or Traffic()).window(now.timestamp()),
        status_class=None,
        now=now,
    )


def request_row(**fields: Any) -> dict[str, Any]:
    """One /-/requests entry."""
    row: dict[str, Any] = {
        "time": "2026-12-04T10:00:05Z",
        "route": "main",
        "method": "GET",
        "path": "/odata/v2/User?$top=***",
        "status": 200,
        "duration_ms": 12.3,
        "upstream_ms": 11.9,
        "bytes_in": 0,
        "bytes_out": 512,
        "request_id": "abc-1",
        "error": None,
        "hint": None,
        "supplied": None,
        "content_type": "application/json",
    }
    row.update(fields)
    return row


def pending_status(pki: PKI, verdict: Verdict, message: str) -> dict[str, object]:
    """What `Pending.status()` says of a renewed certificate held back after a probe."""
    renewed = pki.intermediate.client("renewed-technical-user")
    identity = read_bundle_bytes(renewed.btp_bundle(), source="renewed.pem").identity()
    route = route_config("https://api.example.com", Path("unused.pem"), Path("unused-ca.pem"))
    loaded = Loaded(identity)
    pending = Pending(
        loaded,
        route_target(route, loaded),
        since="2026-12-04T09:00:00+00:00",
        result=ProbeResult(verdict, "TLSv1.3 TLS_AES_256_GCM_SHA384", 401, message),
        probed_at="2026-12-04T09:59:00+00:00",
        next_probe=time.monotonic() + 42.4,
    )
    return pending.status()


# ------------------------------------------------------------------ rendering


def test_a_full_page_is_valid_html5(pki: PKI) -> None:
    now = dt.datetime.now(dt.UTC)
    traffic = Traffic()
    for status, seconds in ((200, 0.02), (201, 0.3), (404, 0.01), (502, 5.0)):
        traffic.add(status, seconds, now.timestamp())
    session = {"reuse": True, "csrf": True, "cookies": 2, "session_age_seconds": 30,
               "csrf_tokens": 1, "csrf_token_age_seconds": 5, "sessions_opened": 1,
               "csrf_fetches": 1, "throttled": 0}  # fmt: skip
    routes = (
        RouteView(
            status_entry(
                "main",
                session=session,
                pending=pending_status(pki, "rejected", "the upstream answered 401"),
            ),
            chain_of(pki.client, now),
            WARN_DAYS,
        ),
        RouteView(
            status_entry("other", ready=False, not_ready_reason="no certificate loaded yet"),
            [],
            WARN_DAYS,
        ),
    )
    requests = [
        request_row(),
        request_row(status=502, error="upstream_connect_failed", hint="is it up?"),
        request_row(path="/a&b<c>'\"", method="POST", status=404, upstream_ms=None),
    ]
    html = page(*routes, requests=requests, traffic=traffic, now=now)
    root = parse(html)
    with pytest.raises(html5lib.html5parser.ParseError):  # the check has teeth
        parse(html.replace("<!DOCTYPE html>", "").replace("</table>", "</tabel>", 1))
    assert text(root.find(".//title")) == "mtls-sidecar console"
    assert root.find(".//script") is None  # no script at all: it refreshes with a meta tag
    assert [e.get("id") for e in root.iter("section")] == [
        "route-main",
        "route-other",
        "traffic",
        "requests",
    ]
    links = [e.get("href", "") for e in root.iter("a")] + [
        e.get("src", "") for e in root.iter() if e.get("src")
    ]
    assert all(link.startswith("/-/") for link in links), links  # nothing from elsewhere


def test_every_route_appears_with_where_it_forwards(pki: PKI) -> None:
    now = dt.datetime.now(dt.UTC)
    root = parse(
        page(
            RouteView(status_entry("main"), chain_of(pki.client, now), WARN_DAYS),
            RouteView(
                status_entry("reporting", upstream="https://api55.example.com", company_id="X9"),
                chain_of(pki.client, now),
                WARN_DAYS,
            ),
            now=now,
        )
    )
    sections = {e.get("id"): e for e in by_class(root, "route")}
    assert list(sections) == ["route-main", "route-reporting"]
    reporting = sections["route-reporting"]
    assert text(reporting.find("h2")) == "Route reporting ready"
    assert facts(reporting.find("dl")) == {
        "listens on": "http://127.0.0.1:8080",
        "forwards to": "https://api55.example.com",
        "company id": "X9",
        "credentials": "pem /etc/sidecar/reporting.pem",
        "last refresh": "2026-12-04T10:00:00+00:00: success",
    }


def test_a_route_without_a_certificate_says_so_and_why() -> None:
    root = parse(
        page(RouteView(status_entry("main", ready=False, not_ready_reason="x: expired"), [], 30))
    )
    [section] = by_class(root, "route")
    assert "not ready: x: expired" in text(section.find("h2"))
    assert "No certificate loaded." in text(section)


@pytest.mark.parametrize(
    ("not_after", "tone", "days"),
    [
        (-(10 * DAY + HOUR), "bad", "expired 10 days ago"),
        (-HOUR, "bad", "expired today"),
        (5 * DAY + HOUR, "warn", "5 days left"),
        (DAY + HOUR, "warn", "1 day left"),
        (200 * DAY + HOUR, "ok", "200 days left"),
    ],
    ids=["expired", "expired-today", "expiring", "expiring-tomorrow", "fine"],
)
def test_a_certificate_renders_its_state(
    pki: PKI, not_after: dt.timedelta, tone: str, days: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    leaf = pki.intermediate.client(not_before=now - 400 * DAY, not_after=now + not_after)
    view = RouteView(status_entry("main"), chain_of(leaf, now), WARN_DAYS)
    root = parse(page(view, now=now))
    [validity] = by_class(root, "validity")
    [span] = validity.iter("span")
    assert (span.get("class"), text(span)) == (tone, days)
    [bar] = validity.iter(f"{SVG}svg")
    assert bar.get("class") == f"bar {tone}"
    rows = list(root.iter("table"))[0].iter("tr")
    leaf_cells = next(r for r in rows if r.find("td") is not None and text(r.find("td")) == "leaf")
    assert leaf_cells[5].get("class") == tone  # the days-left column
    advice = [text(e) for e in by_class(root, "advice")]
    if tone == "ok":
        assert advice == []
    else:
        assert len(advice) == 1 and "Renew it now" in advice[0]
        assert "mtls-sidecar cert export-public" in advice[0]


def test_the_chain_table_lists_leaf_intermediate_and_root(pki: PKI) -> None:
    now = dt.datetime.now(dt.UTC)
    root = parse(page(RouteView(status_entry("main"), chain_of(pki.client, now), WARN_DAYS)))
    [table] = by_class(root, "chain")
    body = table.find("tbody")
    assert body is not None
    rows = [[text(td) for td in tr] for tr in body]
    assert [r[0] for r in rows] == ["leaf", "intermediate", "root"]
    assert rows[0][1] == pki.client.cert.subject.rfc4514_string()
    assert rows[0][6] == summarize(pki.client.cert).sha256


def test_a_pending_renewal_renders_its_next_step(pki: PKI) -> None:
    pending = pending_status(pki, "rejected", "401 from /odata/v2/: the certificate is not mapped")
    view = RouteView(status_entry("main", pending=pending), [], WARN_DAYS)
    root = parse(page(view))
    [box] = by_class(root, "pending")
    said = text(box)
    assert "A renewed certificate is pending since 2026-12-04T09:00:00+00:00" in said
    assert "CN=renewed-technical-user" in said
    found = facts(box.find("dl"))
    assert found["SHA-256"] == pending["sha256"]
    assert found["last probe"] == "2026-12-04T09:59:00+00:00: rejected"
    assert found["why"] == "401 from /odata/v2/: the certificate is not mapped"
    assert found["next probe in"] == "42 s"
    [step] = by_class(box, "advice")
    assert text(step).startswith("Next step: Upload the new certificate's public chain")
    assert "mtls-sidecar cert export-public NEW.pem" in text(step)
    assert "Security Center" in text(step)


def test_an_untested_renewal_says_the_upstream_could_not_be_reached(pki: PKI) -> None:
    pending = pending_status(pki, "inconclusive", "connect: connection refused")
    root = parse(page(RouteView(status_entry("main", pending=pending), [], WARN_DAYS)))
    [step] = by_class(root, "advice")
    assert "could not be reached" in text(step)
    assert "keeps the current certificate" in text(step)


def test_no_pending_renewal_says_nothing_waits() -> None:
    root = parse(page(RouteView(status_entry("main"), [], WARN_DAYS)))
    assert "No renewed certificate waiting." in text(root)
    assert by_class(root, "pending") == []


def test_the_session_state_renders_counts_and_ages() -> None:
    session = {"reuse": True, "csrf": True, "cookies": 2, "session_age_seconds": 125,
               "csrf_tokens": 1, "csrf_token_age_seconds": 30, "sessions_opened": 3,
               "csrf_fetches": 4, "throttled": 1}  # fmt: skip
    root = parse(page(RouteView(status_entry("main", session=session), [], WARN_DAYS)))
    [section] = by_class(root, "route")
    assert section_facts(section, "Session and CSRF") == {
        "kept for clients that keep none": "session cookies, CSRF tokens",
        "cookies held": "2",
        "session age": "2 min",
        "CSRF token age": "30 s",
        "sessions opened upstream": "3",
        "CSRF tokens fetched": "4",
        "throttled answers (429/503)": "1",
    }


def test_a_session_not_opened_yet_and_a_session_switched_off() -> None:
    fresh = {"reuse": True, "csrf": False, "cookies": 0, "session_age_seconds": None,
             "csrf_tokens": 0, "csrf_token_age_seconds": None, "sessions_opened": 0,
             "csrf_fetches": 0, "throttled": 0}  # fmt: skip
    off = {**fresh, "reuse": False}
    root = parse(
        page(
            RouteView(status_entry("fresh", session=fresh), [], WARN_DAYS),
            RouteView(status_entry("off", session=off), [], WARN_DAYS),
        )
    )
    fresh_section, off_section = by_class(root, "route")
    found = section_facts(fresh_section, "Session and CSRF")
    assert found["kept for clients that keep none"] == "session cookies"
    assert (found["session age"], found["CSRF token age"]) == ("no session yet", "none cached")
    assert "Session reuse and CSRF tokens are off for this route." in text(off_section)


def test_every_value_is_escaped() -> None:
    hostile = "<script>alert(1)</script>"
    root = parse(
        page(
            RouteView(status_entry(hostile, company_id=hostile), [], WARN_DAYS),
            requests=[request_row(path=f"/x{hostile}", request_id=hostile, route=hostile)],
        )
    )
    assert root.find(".//script") is None
    assert text(root).count(hostile) >= 4  # shown as text: name, company id, path, id


def test_the_request_rows_show_the_sidecars_own_error_with_its_hint() -> None:
    requests = [
        request_row(status=502, error="upstream_connect_failed", hint="is the upstream up?",
                    upstream_ms=None, request_id="r-2"),
        request_row(status=404, request_id="r-1"),
    ]  # fmt: skip
    root = parse(page(requests=requests))
    [table] = by_class(root, "requests")
    body = table.find("tbody")
    assert body is not None
    rows = [(tr.get("class"), [text(td) for td in tr]) for tr in body]
    assert rows[0] == (
        "s5xx",
        ["10:00:05", "main", "GET", "/odata/v2/User?$top=***", "502", "12.3", "", "0/512", "r-2"],
    )
    assert rows[1] == ("fix", ["", "sidecar error upstream_connect_failed: is the upstream up?"])
    assert rows[2][0] == "s4xx"
    assert len(rows) == 3  # no fix line for an upstream's own 404


def test_no_requests_yet_says_so() -> None:
    root = parse(page())
    [table] = by_class(root, "requests")
    assert text(table.find("tbody")) == "No requests yet."


# ------------------------------------------------------------------ charts


def images(root: ET.Element) -> list[ET.Element]:
    return list(root.iter(f"{SVG}svg"))


def assert_described(svg: ET.Element) -> None:
    """An image for screen readers too: role=img, a label, and a title saying the same."""
    assert svg.get("role") == "img"
    title = svg.find(f"{SVG}title")
    assert title is not None and title.text
    assert svg.get("aria-label") == title.text


def test_every_chart_is_an_image_with_a_title(pki: PKI) -> None:
    now = dt.datetime.now(dt.UTC)
    root = parse(page(RouteView(status_entry("main"), chain_of(pki.client, now), WARN_DAYS)))
    svgs = images(root)
    assert len(svgs) == 3  # the validity bar, latency, status
    for svg in svgs:
        assert_described(svg)
    titles = [svg.findtext(f"{SVG}title") for svg in svgs]
    assert titles[0] == (
        f"valid {pki.client.cert.not_valid_before_utc:%Y-%m-%d} to "
        f"{pki.client.cert.not_valid_after_utc:%Y-%m-%d}; today is {now:%Y-%m-%d}"
    )
    assert "Latency over the last 15 minutes" in str(titles[1])
    assert "Requests over the last 15 minutes by status class" in str(titles[2])


def chart(svg_text: str) -> ET.Element:
    [svg] = images(parse(f"<!DOCTYPE html><title>t</title>{svg_text}"))
    assert_described(svg)
    return svg


def bars(svg: ET.Element) -> list[str]:
    return [str(r.findtext(f"{SVG}title")) for r in svg.iter(f"{SVG}rect")]


def test_the_status_chart_draws_a_bar_per_class_served() -> None:
    now = time.time()
    traffic = Traffic()
    for status in (200, 200, 201, 404, 502, 503):
        traffic.add(status, 0.01, now)
    traffic.add(302, 0.01, now - 60)
    svg = chart(status_chart(traffic.window(now)))
    assert bars(svg) == ["3xx: 1", "2xx: 3", "4xx: 1", "5xx: 2"]
    heights = {
        str(r.findtext(f"{SVG}title")): float(r.get("height", "0")) for r in svg.iter(f"{SVG}rect")
    }
    assert heights["2xx: 3"] == pytest.approx(3 * heights["3xx: 1"], abs=0.2)
    # The busiest bucket fills the plot: its bars stack up to the top.
    last = [r for r in svg.iter(f"{SVG}rect") if r.findtext(f"{SVG}title") != "3xx: 1"]
    assert min(float(r.get("y", "0")) for r in last) == pytest.approx(8, abs=0.2)
    assert bars(chart(status_chart(Traffic().window(now)))) == []


def test_the_latency_chart_draws_lines_only_where_requests_ended() -> None:
    now = time.time()
    traffic = Traffic()
    assert list(chart(latency_chart(traffic.window(now))).iter(f"{SVG}polyline")) == []
    traffic.add(200, 0.02, now)
    traffic.add(200, 0.02, now - 10)
    traffic.add(200, 3.0, now - 300)
    lines = list(chart(latency_chart(traffic.window(now))).iter(f"{SVG}polyline"))
    # per quantile: the two recent buckets as one line, the lone one as a point
    assert sorted(str(line.get("class")) for line in lines) == ["p50", "p50", "p95", "p95"]


def test_the_validity_bar_marks_today() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    svg = chart(validity_bar(start, start + 100 * DAY, start + 25 * DAY, "ok"))
    [today] = svg.iter(f"{SVG}line")
    assert float(today.get("x1", "0")) == 80.0  # a quarter of 320
    later = chart(validity_bar(start, start + 100 * DAY, start + 1000 * DAY, "bad"))
    [today] = later.iter(f"{SVG}line")
    assert float(today.get("x1", "0")) == 320.0  # past the end: at the end


# ------------------------------------------------------------------ the endpoints


async def get_page(
    client: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> str:
    async with client.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/html"
        assert resp.charset == "utf-8"
        assert resp.headers["Cache-Control"] == "no-store"
        return await resp.text()


async def recent(
    client: aiohttp.ClientSession,
    url: str,
    query: str = "",
    headers: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    async with client.get(f"{url}/-/requests{query}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert list(body) == ["requests"]
    entries: list[dict[str, Any]] = body["requests"]
    return entries


async def send(
    client: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> aiohttp.ClientResponse:
    async with client.request(method, url, **kwargs) as resp:
        await resp.read()
        return resp


@pytest.fixture
async def main(tls_upstream: Any, start_sidecar: Any, bundle_file: Path, ca_file: Path) -> Running:
    """A sidecar with route ``main`` to a `FakeUpstream` and route ``dead`` to a closed port."""
    upstream = await tls_upstream(FakeUpstream().app())
    running: Running = await start_sidecar(
        route_config(upstream, bundle_file, ca_file, name="main"),
        route_config(f"https://127.0.0.1:{free_port()}", bundle_file, ca_file, name="dead"),
    )
    return running


def url_of(running: Running, index: int) -> str:
    return f"http://{running.sidecar.bound_address(running.sidecar.routes[index])}"


@pytest.mark.parametrize("path", ["/-/", "/-/console"])
async def test_the_console_shows_every_route_of_a_running_sidecar(
    main: Running, client: aiohttp.ClientSession, path: str
) -> None:
    await send(client, "GET", f"{main.url}/hello")
    root = parse(await get_page(client, main.url + path))
    sections = {e.get("id"): e for e in by_class(root, "route")}
    assert list(sections) == ["route-main", "route-dead"]
    for index, name in enumerate(("main", "dead")):
        found = facts(sections[f"route-{name}"].find("dl"))
        assert found["listens on"] == url_of(main, index)
        assert found["company id"] == "ACME1234"
    [table] = by_class(root, "requests")
    assert "/hello" in text(table)
    # Every listener shows the whole sidecar.
    other = parse(await get_page(client, url_of(main, 1) + path))
    assert [e.get("id") for e in by_class(other, "route")] == ["route-main", "route-dead"]


async def test_requests_are_newest_first_and_at_most_200_are_kept(
    main: Running, client: aiohttp.ClientSession
) -> None:
    for i in range(250):
        await send(client, "GET", f"{main.url}/n/{i}")
    entries = await recent(client, main.url)
    assert [e["path"] for e in entries] == [f"/n/{i}" for i in range(249, 49, -1)]
    newest = entries[0]
    assert newest["route"] == "main" and newest["method"] == "GET" and newest["status"] == 200
    assert newest["bytes_out"] > 0 and newest["upstream_ms"] is not None
    assert newest["duration_ms"] >= newest["upstream_ms"]
    assert str(newest["content_type"]).startswith("application/json")
    rows = by_class(parse(await get_page(client, main.url + "/-/")), "s2xx")
    assert len(rows) == 200


async def test_query_values_are_redacted_as_in_the_access_log(
    main: Running, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.access")
    query = "$filter=lastName%20eq%20%27Secretson%27&$top=5&apikey=k-77e1"
    await send(client, "GET", f"{main.url}/odata/v2/User?{query}")
    [entry] = await recent(client, main.url)
    assert entry["path"] == "/odata/v2/User?$filter=***&$top=***&apikey=***"
    [line] = [r for r in caplog.records if r.name == "sidecar.access"]
    assert entry["path"] == line.__dict__["path"]
    page_text = await get_page(client, main.url + "/-/")
    for value in ("Secretson", "k-77e1", "$top=5"):
        assert value not in page_text
    assert "/odata/v2/User?$filter=***&amp;$top=***&amp;apikey=***" in page_text


async def test_query_values_are_kept_with_log_query_values(
    tls_upstream: Any, bundle_file: Path, ca_file: Path, client: aiohttp.ClientSession
) -> None:
    upstream = await tls_upstream(FakeUpstream().app())
    route = route_config(upstream, bundle_file, ca_file, name="main")
    sidecar = Sidecar(Config(routes=(route,), log=LogConfig(query_values=True)), env={})
    await sidecar.start()
    try:
        url = f"http://{sidecar.bound_address(sidecar.routes[0])}"
        await send(client, "GET", f"{url}/odata/v2/User?$top=5&$filter=x%20eq%201")
        [entry] = await recent(client, url)
        assert entry["path"] == "/odata/v2/User?$top=5&$filter=x%20eq%201"
        assert "$top=5&amp;$filter=x%20eq%201" in await get_page(client, url + "/-/")
    finally:
        await sidecar.close()


async def test_the_status_filter_keeps_one_class(
    main: Running, client: aiohttp.ClientSession
) -> None:
    for path in ("/status/200", "/status/201", "/status/302", "/status/404", "/status/503"):
        await send(client, "GET", main.url + path)
    await send(client, "GET", url_of(main, 1) + "/down")  # 502 from the sidecar
    statuses = {
        c: [e["status"] for e in await recent(client, main.url, f"?status={c}")]
        for c in ("2xx", "3xx", "4xx", "5xx")
    }
    assert statuses == {"2xx": [201, 200], "3xx": [302], "4xx": [404], "5xx": [502, 503]}
    root = parse(await get_page(client, f"{main.url}/-/?status=4xx"))
    [table] = by_class(root, "requests")
    body = table.find("tbody")
    assert body is not None
    assert [tr.get("class") for tr in body] == ["s4xx"]
    chosen = [text(a) for a in by_class(root, "chosen")]
    assert chosen == ["4xx"]


@pytest.mark.parametrize("path", ["/-/requests?status=9xx", "/-/?status=4XX", "/-/?status="])
async def test_a_bad_status_filter_is_answered_with_the_json_error(
    main: Running, client: aiohttp.ClientSession, path: str
) -> None:
    async with client.get(main.url + path) as resp:
        assert resp.status == 404
        assert resp.headers["X-Sidecar-Error"] == "not_found"
        body = await resp.json()
    assert body["error"]["code"] == "not_found"
    assert "give one of 2xx, 3xx, 4xx, 5xx" in body["error"]["message"]


async def test_the_sidecars_own_errors_appear_with_their_code_and_hint(
    main: Running, client: aiohttp.ClientSession
) -> None:
    async with client.get(url_of(main, 1) + "/down") as resp:
        assert resp.status == 502
        connect = (await resp.json())["error"]
    port = int(main.url.rsplit(":", 1)[1])
    [forbidden] = await raw(
        port, b"GET http://other.example/x HTTP/1.1\r\nHost: other.example\r\n\r\n"
    )
    assert forbidden.status == 403
    target = forbidden.json()["error"]

    entries = await recent(client, main.url)
    assert [(e["route"], e["status"], e["error"], e["hint"]) for e in entries] == [
        ("main", 403, "forbidden_target", target["hint"]),
        ("dead", 502, "upstream_connect_failed", connect["hint"]),
    ]
    assert connect["code"] == "upstream_connect_failed"
    assert [e["upstream_ms"] for e in entries] == [None, None]  # never reached an upstream
    fixes = [text(e) for e in by_class(parse(await get_page(client, main.url + "/-/")), "fix")]
    assert fixes == [
        f"sidecar error forbidden_target: {target['hint']}",
        f"sidecar error upstream_connect_failed: {connect['hint']}",
    ]


async def test_the_charts_show_the_requests_served(
    main: Running, client: aiohttp.ClientSession
) -> None:
    for path in ("/a", "/b", "/status/404"):
        await send(client, "GET", main.url + path)
    root = parse(await get_page(client, main.url + "/-/"))
    counts: dict[str, int] = {}
    for bar in bars(images(root)[-1]):  # one bucket, or two if the requests straddled 10 s
        cls, n = bar.split(": ")
        counts[cls] = counts.get(cls, 0) + int(n)
    assert counts == {"2xx": 2, "4xx": 1}
    assert len(list(images(root)[-2].iter(f"{SVG}polyline"))) == 2  # p50 and p95


# ------------------------------------------------------------------ the token


@pytest.fixture
async def guarded(
    tls_upstream: Any, start_sidecar: Any, bundle_file: Path, ca_file: Path
) -> Running:
    upstream = await tls_upstream(FakeUpstream().app())
    route = route_config(upstream, bundle_file, ca_file, inbound=InboundConfig(token_env="TOK"))
    running: Running = await start_sidecar(route, env={"TOK": TOKEN})
    return running


STATUSES = ("2xx", "3xx", "4xx", "5xx")
CONSOLE_PATHS = ["/-/", "/-/console", "/-/requests", "/-/requests?status=2xx", "/-/?status=5xx"]


@pytest.mark.parametrize("path", CONSOLE_PATHS)
@pytest.mark.parametrize("sent", [None, "wrong", TOKEN + "x"])
async def test_the_console_and_requests_need_the_token(
    guarded: Running, client: aiohttp.ClientSession, path: str, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Sidecar-Token": sent}
    async with client.get(guarded.url + path, headers=headers) as resp:
        assert resp.status == 401
        assert resp.content_type == "application/json"
        assert resp.headers["X-Sidecar-Error"] == "inbound_auth_required"
        body = await resp.json()
    assert body["error"]["code"] == "inbound_auth_required"
    assert "X-Sidecar-Token" in body["error"]["message"]


@pytest.mark.parametrize("path", CONSOLE_PATHS)
async def test_the_console_and_requests_answer_with_the_token(
    guarded: Running, client: aiohttp.ClientSession, path: str
) -> None:
    async with client.get(guarded.url + path, headers={"X-Sidecar-Token": TOKEN}) as resp:
        assert resp.status == 200
        assert resp.content_type in ("text/html", "application/json")


@pytest.mark.parametrize("path", ["/-/health", "/-/ready"])
async def test_health_and_ready_never_need_the_token(
    guarded: Running, client: aiohttp.ClientSession, path: str
) -> None:
    async with client.get(guarded.url + path) as resp:
        assert resp.status == 200


# ------------------------------------------------------------------ secrets


def set_cookies(resp: aiohttp.ClientResponse) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for header in resp.headers.getall("Set-Cookie", ()):
        jar.load(header)
    return {name: morsel.value for name, morsel in jar.items()}


def key_secrets(bundle: bytes) -> list[str]:
    """The private key of a BTP bundle as `key_material` names it (PEM lines, DER hex)."""
    parsed = read_bundle_bytes(bundle, source="bundle")
    assert parsed.key is not None
    pem = bundle.split(b"-----END PRIVATE KEY-----")[0] + b"-----END PRIVATE KEY-----\n"
    return [pem.decode(), *key_material(Issued(parsed.leaf, parsed.key), pem)]


async def test_no_secret_reaches_the_console_or_requests_across_a_session(
    start_sidecar: Any, tmp_path: Path
) -> None:
    """A whole session against the fake SuccessFactors: the sidecar's session cookies and
    CSRF token, a client's own cookie, Authorization and CSRF token, the inbound token,
    query values, a password in an absolute-form target; then every page is scanned."""
    authorization = "Basic " + "c2VjcmV0LXVzZXI6cGFzcy05MWMy"
    client_cookie = "client-own-cookie-3d5a"
    client_csrf = "client-own-csrf-token-88b0"
    query_value = "query-secret-6c1b"
    userinfo = "userinfo-password-0f4e"
    async with fake_successfactors(tmp_path / "sf") as upstream:
        config = demo_config(upstream, 0)
        route = dataclasses.replace(config.routes[0], inbound=InboundConfig(token_env="TOK"))
        running: Running = await start_sidecar(route, env={"TOK": TOKEN})
        url = running.url
        cookies: dict[str, str] = {}  # every cookie value the fake set
        # DummyCookieJar: which cookie goes where is up to this test.
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), headers={"X-Sidecar-Token": TOKEN}
        ) as client:

            async def go(method: str, path: str, **headers: str) -> aiohttp.ClientResponse:
                kwargs: dict[str, Any] = {"headers": headers}
                if method == "POST":
                    kwargs = {
                        "data": NEW_USER,
                        "headers": {"Content-Type": "application/json", **headers},
                    }
                resp = await send(client, method, url + path, **kwargs)
                cookies.update({f"{k} #{len(cookies)}": v for k, v in set_cookies(resp).items()})
                return resp

            resp = await go("GET", f"/odata/v2/User?$top=2&$filter={query_value}")
            assert resp.status == 200
            ours = set_cookies(resp)  # the sidecar's session, handed to the client too
            assert set(ours) == {"JSESSIONID", "route"}
            resp = await go("POST", "/odata/v2/User")
            assert resp.status == 201  # the sidecar fetched and sent the CSRF token
            sent_back = "; ".join(f"{k}={v}" for k, v in ours.items())
            resp = await go("GET", "/odata/v2/", Cookie=sent_back, **{"X-CSRF-Token": "Fetch"})
            csrf = resp.headers["X-CSRF-Token"]  # the session's token, the one the sidecar sent
            assert len(csrf) > 16
            delete = await go(
                "DELETE", "/odata/v2/User('demo1')", Cookie=sent_back, **{"X-CSRF-Token": csrf}
            )
            assert delete.status == 204
            resp = await go("GET", "/odata/v2/User?$top=1", Authorization=authorization)
            assert resp.status == 200  # the client's own session (Authorization): another login
            resp = await go(
                "POST",
                "/odata/v2/User",
                Cookie=f"mine={client_cookie}",
                **{"X-CSRF-Token": client_csrf},
            )
            assert resp.status == 403  # the client's own cookie and token: not valid there
            await go("GET", "/odata/v2/Nothing")
            await go("GET", "/odata/v2/User", **{"X-Sidecar-Token": "wrong"})
            port = int(url.rsplit(":", 1)[1])
            target = f"http://demo:{userinfo}@localhost:{upstream.port}/odata/v2/User?$top=1"
            request = (
                f"GET {target} HTTP/1.1\r\nHost: localhost\r\nX-Sidecar-Token: {TOKEN}\r\n\r\n"
            )
            [answer] = await raw(port, request.encode())
            assert answer.status == 200
            assert upstream.state.sessions_opened == 3  # the sidecar's, and two of clients

            outputs = []
            filtered = [f"/-/{kind}?status={c}" for kind in ("", "requests") for c in STATUSES]
            for path in ("/-/", "/-/console", "/-/requests", *filtered):
                async with client.get(url + path) as page_resp:
                    assert page_resp.status == 200
                    outputs.append(await page_resp.text())
                    outputs.append(json.dumps(dict(page_resp.headers)))
        everything = "\n".join(outputs)

        # The session shows, its values do not.
        assert "/odata/v2/User?$top=***&amp;$filter=***" in everything
        assert '"supplied": "csrf,session"' in everything
        assert "http://localhost:" in everything  # the absolute-form target, without userinfo
        secrets = {
            "inbound token": TOKEN,
            "Authorization": authorization,
            "Authorization credentials": authorization.split()[1],
            "client cookie": client_cookie,
            "client CSRF token": client_csrf,
            "CSRF token": csrf,
            "query value": query_value,
            "userinfo password": userinfo,
            **{f"cookie {name}": value for name, value in cookies.items()},
        }
        for i, material in enumerate(key_secrets(upstream.pki.client_bundle.read_bytes())):
            secrets[f"private key {i}"] = material
        assert len(cookies) == 6 and len(secrets) > 20
        for what, secret in secrets.items():
            assert secret not in everything, what


# ------------------------------------------------------------------ in a real browser


async def test_a_real_browser_shows_the_console_of_the_demo(demo: Demo, tmp_path: Path) -> None:
    """Headless Chromium loads /-/ of the running demo; the screenshot is the README's."""
    browser = Chromium.find(tmp_path)
    async with aiohttp.ClientSession() as client:
        for method, path, kwargs in (
            ("GET", "/odata/v2/User?$top=3", {}),
            ("GET", "/odata/v2/$metadata", {}),
            ("POST", "/odata/v2/User", {"data": NEW_USER,
                                        "headers": {"Content-Type": "application/json"}}),
            ("GET", "/odata/v2/User('demo1')", {}),
            ("GET", "/odata/v2/Nothing", {}),
        ):  # fmt: skip
            await send(client, method, demo.url + path, **kwargs)
    console = demo.url + "/-/"
    dom = await browser.dump_dom(console)
    # The README's screenshot is written only when asked for (SIDECAR_SCREENSHOT=1), so a
    # test run leaves the checkout as it was.
    shot = SCREENSHOT if os.environ.get("SIDECAR_SCREENSHOT") == "1" else tmp_path / "console.png"
    await browser.screenshot(console, shot)
    root = html5lib.parse(dom, namespaceHTMLElements=False)
    assert text(root.find(".//title")) == "mtls-sidecar console"
    [route] = by_class(root, "route")
    assert route.get("id") == "route-demo"
    assert text(route.find("h2")) == "Route demo ready"
    [chain] = by_class(root, "chain")
    assert [text(tr.find("td")) for tr in chain.iter("tr") if tr.find("td") is not None] == [
        "leaf",
        "intermediate",
        "root",
    ]
    [table] = by_class(root, "requests")
    rows = [[text(td) for td in tr] for tr in table.iter("tr") if tr.find("td") is not None]
    assert [(r[2], r[3], r[4]) for r in rows] == [
        ("GET", "/odata/v2/Nothing", "404"),
        ("GET", "/odata/v2/User('demo1')", "200"),
        ("POST", "/odata/v2/User", "201"),
        ("GET", "/odata/v2/$metadata", "200"),
        ("GET", "/odata/v2/User?$top=***", "200"),
    ]
    assert len(list(root.iter(f"{SVG}svg"))) == 3
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
