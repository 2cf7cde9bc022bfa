"""Request parsing under attack: a raw-socket battery of malformed and smuggling inputs.

Each input goes, byte for byte, to a running sidecar on a new connection. The
sidecar must answer it with DESIGN.md's JSON ``bad_request`` (400,
``X-Sidecar-Error``) or close the connection; never with a 5xx, never with a
traceback, never by forwarding anything to the upstream — in particular not
the ``GET /smuggled`` that many inputs hide behind an ambiguous framing. Right
after, a good request on a new connection must succeed: the process is alive
and the listener still serves.

The inputs follow the classic request-smuggling and parser-confusion catalogues
(PortSwigger's CL.TE/TE.CL/TE.TE families, RFC 9112 §2-§7 grammar edges): bad
request lines, invalid chunk sizes and extensions, duplicate or conflicting
Content-Length, Transfer-Encoding obfuscations, obs-fold, NUL/CR/LF in names
and values, over-long lines and too many headers (with the default limits and
with small `LimitsConfig` values on the route).

Every input goes to both of aiohttp's request parsers, one after the other on
the same sidecar: llhttp (its C extension) and the pure-Python parser a
platform without aiohttp's wheels gets (``AIOHTTP_NO_EXTENSIONS=1``), which
sidecar.forward.listener makes refuse what llhttp refuses. Both must give the same
verdict.

Inputs the sidecar currently accepts are marked ``xfail(strict=True)`` with a
``BUG:`` reason saying what goes wrong; none of them lets a smuggled request
through (each still gets exactly one answer, and the upstream sees only the
request as the client framed it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import http_parser, web, web_protocol

from sidecar.config import LimitsConfig
from tests.conftest import NO_CSRF, route_config
from tests.support.raw_http import RawResponse, assert_raw_error, raw, read_response
from tests.support.upstreams import FakeUpstream

# --------------------------------------------------------------------- inputs

#: hidden behind an ambiguous framing: the upstream must never see this path
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
HOST = b"Host: x\r\n"

#: the defaults, with a short head timer so an input that stops mid-head is cut quickly
BATTERY_LIMITS = LimitsConfig(header_timeout=1.0)
#: the smallest values the config accepts, to prove the limits themselves
SMALL_LIMITS = LimitsConfig(max_header_size=1024, max_headers=8, header_timeout=1.0)

#: aiohttp's C parser is there (it is not with AIOHTTP_NO_EXTENSIONS=1, or without a wheel)
LLHTTP = hasattr(http_parser, "HttpRequestParserC")
PARSERS = ("python", "llhttp")


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    limits: LimitsConfig = BATTERY_LIMITS
    code: str = "bad_request"  # the sidecar's own refusal, when it answers
    bug: str | None = None  # the product accepts this input today
    llhttp_bug: bool = False  # only llhttp accepts it; the pure-Python parser refuses it


CASES: list[Case] = []


def case(name: str, data: bytes, **kw: Any) -> None:
    CASES.append(Case(name, data, **kw))


def get(request_line: bytes, *headers: bytes) -> bytes:
    return request_line + b"\r\n" + HOST + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def chunked(body: bytes, te: bytes = b"chunked") -> bytes:
    """A chunked POST whose body (sizes, data, trailers) is ``body``."""
    return b"POST /x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: " + te + b"\r\n\r\n" + body


def with_length(value: bytes, body: bytes = b"hello") -> bytes:
    """A POST with ``Content-Length: value``, ``body`` and a request behind it."""
    return (
        b"POST /x HTTP/1.1\r\n" + HOST + b"Content-Length: " + value + b"\r\n\r\n" + body + SMUGGLED
    )


def framing(headers: bytes, body: bytes) -> bytes:
    """A POST with the given framing header lines (CRLF-terminated) and raw body."""
    return b"POST /x HTTP/1.1\r\n" + HOST + headers + b"\r\n" + body


# -- request lines
case("missing-version", b"GET /x\r\n" + HOST + b"\r\n")
case("http-0.9", get(b"GET /x HTTP/0.9"))
case("http-2.0", get(b"GET /x HTTP/2.0"))
case("http-1.2", get(b"GET /x HTTP/1.2"))
case("http-3.0", get(b"GET /x HTTP/3.0"))
case("lowercase-method", get(b"get /x HTTP/1.1"))
case("lowercase-version", get(b"GET /x http/1.1"))
case("https-version", get(b"GET /x HTTPS/1.1"))
case("version-truncated", get(b"GET /x HTTP/1."))
case("version-garbage", get(b"GET /x HTTP/1.1x"))
case(
    "double-space-after-method",
    get(b"GET  /x HTTP/1.1"),
    bug="`GET  /x HTTP/1.1` (two spaces) is accepted and forwarded (200), while a tab or a "
    "trailing space gets 400; RFC 9112 §3 allows this leniency, so low severity",
)
case(
    "double-space-before-version",
    get(b"GET /x  HTTP/1.1"),
    bug="`GET /x  HTTP/1.1` (two spaces) is accepted and forwarded (200); same leniency as "
    "double-space-after-method",
)
case("trailing-space", get(b"GET /x HTTP/1.1 "))
case("leading-space", get(b" GET /x HTTP/1.1"))
case("tabs", get(b"GET\t/x\tHTTP/1.1"))
case("space-in-target", get(b"GET /a b HTTP/1.1"))
case("no-target", get(b"GET HTTP/1.1"))
case("method-bad-char", get(b"GE(T /x HTTP/1.1"))
case("method-nul", get(b"G\x00ET /x HTTP/1.1"))
case("method-long", get(b"A" * 100 + b" /x HTTP/1.1"))
case("bare-lf-line-endings", b"GET /x HTTP/1.1\nHost: x\n\n")
case("bare-cr-after-request-line", b"GET /x HTTP/1.1\rHost: x\r\n\r\n")
case("end-of-head-bare-lf", b"GET /x HTTP/1.1\r\nHost: x\r\n\n")
case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
case("tls-client-hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)))
case("nul-bytes", b"\x00" * 100)
case("only-empty-lines", b"\r\n\r\n\r\n")  # nothing to answer: the head timer closes it
# -- request targets
case("abs-empty-host", get(b"GET http:///x HTTP/1.1"))
case("abs-bad-port", get(b"GET http://localhost:abc/x HTTP/1.1"))
case("abs-port-overflow", get(b"GET http://localhost:99999/x HTTP/1.1"))
case("abs-open-ipv6", get(b"GET http://[::1/x HTTP/1.1"))
case("abs-no-scheme", get(b"GET ://x/y HTTP/1.1"))
case("abs-only-scheme", get(b"GET http:// HTTP/1.1"))
case("abs-percent-host", get(b"GET http://%zz/x HTTP/1.1"), code="forbidden_target")
case("asterisk-for-get", get(b"GET * HTTP/1.1"))
case("query-only-target", get(b"GET ?x=1 HTTP/1.1"))
case("path-utf8", get("GET /é HTTP/1.1".encode()))
case("path-latin1", get(b"GET /\xe9 HTTP/1.1"))
case("path-nul", get(b"GET /a\x00b HTTP/1.1"))
case("path-ctl", get(b"GET /a\x01b HTTP/1.1"))
case("path-del", get(b"GET /a\x7fb HTTP/1.1"))
case("path-tab", get(b"GET /a\tb HTTP/1.1"))
case("path-fragment", get(b"GET /x#frag HTTP/1.1"))  # RFC 9112 3.2: no fragment in a target
case("path-backslash", get(b"GET /a\\b HTTP/1.1"))  # not a URI character; some servers read "/"
# -- chunk sizes and extensions (a request hides behind each broken body)
case("chunk-hex-overflow", chunked(b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-2-pow-64", chunked(b"10000000000000000\r\nabc\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-negative", chunked(b"-5\r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-0x-prefix", chunked(b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-plus-sign", chunked(b"+5\r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-non-hex", chunked(b"zz\r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-empty-size", chunked(b"\r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-space-before-size", chunked(b" 5\r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-space-after-size", chunked(b"5 \r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-lf-only", chunked(b"5\nhello\n0\n\n" + SMUGGLED))
case("chunk-missing-crlf-after-data", chunked(b"5\r\nhelloX0\r\n\r\n" + SMUGGLED))
case("chunk-data-longer-than-size", chunked(b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-last-then-request-as-trailer", chunked(b"0\r\n" + SMUGGLED))
case("chunk-bad-trailer", chunked(b"0\r\nbad trailer\r\n\r\n" + SMUGGLED))
case("chunk-ext-bare-lf", chunked(b"5;a=b\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-ext-bare-cr", chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case("chunk-ext-open-quote", chunked(b'5;a="b\r\nhello\r\n0\r\n\r\n' + SMUGGLED))
case("chunk-ext-empty-name", chunked(b"5;\r\nhello\r\n0\r\n\r\n" + SMUGGLED))
case(
    "chunk-ext-64-kib",
    chunked(b"5;a=" + b"b" * 65536 + b"\r\nhello\r\n0\r\n\r\n"),
    bug="chunk extensions have no length limit: a 64 KiB extension (4 MiB and 50 000 "
    "`;a=b` too) on one chunk-size line is accepted (200), beyond max_header_size; "
    "RFC 9112 §7.1.1 says a server ought to limit them and answer 4xx. llhttp does not "
    "buffer them, so it costs bandwidth, not memory (the pure-Python parser refuses it: "
    "it would have to buffer the line)",
    llhttp_bug=True,
)
# -- Content-Length
case("cl-list-conflicting", with_length(b"5, 6"))
case("cl-list-identical", with_length(b"5, 5"))
case(
    "cl-two-headers-conflicting",
    framing(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!" + SMUGGLED),
)
case(
    "cl-two-headers-identical",
    framing(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello" + SMUGGLED),
)
case("cl-negative", with_length(b"-1"))
case("cl-plus-sign", with_length(b"+5"))
case("cl-hex", with_length(b"0x5"))
case("cl-two-numbers", with_length(b"5 5"))
case("cl-trailing-comma", with_length(b"5,"))
case("cl-overflow", with_length(b"99999999999999999999999"))
# llhttp reads 2**64 - 1 as "no length": an empty body, then SMUGGLED as the next request
case("cl-max-uint64", with_length(b"18446744073709551615", b""))
case("cl-max-uint64-leading-zero", with_length(b"018446744073709551615", b""))
case("cl-nul", with_length(b"5\x00"))
case("cl-fullwidth-digit", with_length("５".encode()))  # int() would take it
case("cl-underscore", with_length(b"1_0", b"helloworld"))  # int() would take it
case("cl-empty", with_length(b""))
# -- CL.TE, TE.CL and Transfer-Encoding obfuscation
case(
    "cl-te",
    framing(b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
)
case(
    "te-cl",
    framing(
        b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
    ),
)
case(
    "cl-te-other-case",
    framing(b"transfer-encoding: CHUNKED\r\ncontent-length: 40\r\n", b"0\r\n\r\n" + SMUGGLED),
)
case("te-chunked-identity", chunked(b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED, b"chunked, identity"))
case(
    "te-identity-chunked-with-cl",
    framing(
        b"Transfer-Encoding: identity, chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
)
case(
    "te-xchunked",
    framing(b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED),
)
case("te-xchunked-alone", chunked(b"0\r\n\r\n" + SMUGGLED, b"xchunked"))
case(
    "te-space-before-colon",
    framing(b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED),
)
case(
    "te-two-headers",
    framing(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n" + SMUGGLED
    ),
)
case(
    "te-unknown-and-chunked-headers",
    framing(
        b"Transfer-Encoding: foo\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        b"0\r\n\r\n" + SMUGGLED,
    ),
)
case(
    "te-obs-fold",
    framing(b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED),
)
case(
    "te-vertical-tab",
    framing(b"Transfer-Encoding:\x0bchunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED),
)
case("te-quoted", chunked(b"0\r\n\r\n" + SMUGGLED, b'"chunked"'))
case("te-chunked-not-last", chunked(b"0\r\n\r\n" + SMUGGLED, b"chunked, gzip"))
case("te-chunked-twice", chunked(b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED, b"chunked, chunked"))
case("te-gzip-only", chunked(b"0\r\n\r\n" + SMUGGLED, b"gzip"))
case(
    "te-chunked-http-1.0",
    b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
)
case(
    "te-chunked-http-1.0-with-cl",
    b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
)
# -- header lines
case("obs-fold", get(b"GET /x HTTP/1.1", b"X-A: b", b" folded"))
case("obs-fold-tab", get(b"GET /x HTTP/1.1", b"X-A: b", b"\tfolded"))
case("obs-fold-first-header", b"GET /x HTTP/1.1\r\n Host: x\r\n\r\n")
case("nul-in-value", get(b"GET /x HTTP/1.1", b"X-A: a\x00b"))
case("nul-in-name", get(b"GET /x HTTP/1.1", b"X-\x00A: b"))
case("cr-in-value", get(b"GET /x HTTP/1.1", b"X-A: a\rb"))
case("cr-in-name", get(b"GET /x HTTP/1.1", b"X-\rA: b"))
case("cr-before-crlf", get(b"GET /x HTTP/1.1", b"X-A: a\r"))
case("lf-in-value", get(b"GET /x HTTP/1.1", b"X-A: a\nb"))
case("lf-in-name", get(b"GET /x HTTP/1.1", b"X-\nA: b"))
case("ctl-in-value", get(b"GET /x HTTP/1.1", b"X-A: a\x01b"))
case("del-in-value", get(b"GET /x HTTP/1.1", b"X-A: a\x7fb"))
case("value-not-utf8", get(b"GET /x HTTP/1.1", b"X-A: \xff\xfe"))
case("header-without-colon", get(b"GET /x HTTP/1.1", b"X-A b"))
case("space-before-colon", get(b"GET /x HTTP/1.1", b"X-A : b"))
case("tab-before-colon", get(b"GET /x HTTP/1.1", b"X-A\t: b"))
case("empty-name", get(b"GET /x HTTP/1.1", b": b"))
case("name-bad-char", get(b"GET /x HTTP/1.1", b"X(A): b"))
case("name-quote", get(b"GET /x HTTP/1.1", b'X"A: b'))
case("name-non-ascii", get(b"GET /x HTTP/1.1", "X-é: b".encode()))
case("host-duplicate", b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
case("host-missing-http-1.1", b"GET /x HTTP/1.1\r\n\r\n")
case("host-invalid", b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n")  # RFC 9112 3.2: MUST be 400
# -- over-long and too many, with the default limits (16 KiB lines, 100 headers)
case("long-request-line", get(b"GET /" + b"a" * 20_000 + b" HTTP/1.1"))
case("long-method", get(b"A" * 20_000 + b" /x HTTP/1.1"))
case("long-header-value", get(b"GET /x HTTP/1.1", b"X-A: " + b"a" * 20_000))
case("long-header-name", get(b"GET /x HTTP/1.1", b"X" * 20_000 + b": a"))
case("too-many-headers", get(b"GET /x HTTP/1.1", *(b"X-%d: a" % i for i in range(200))))
# -- the same with small limits on the route (1 KiB lines, 8 headers)
case("small-long-request-line", get(b"GET /" + b"a" * 1100 + b" HTTP/1.1"), limits=SMALL_LIMITS)
case(
    "small-long-header-value", get(b"GET /x HTTP/1.1", b"X-A: " + b"a" * 1100), limits=SMALL_LIMITS
)
case("small-long-header-name", get(b"GET /x HTTP/1.1", b"X" * 1100 + b": a"), limits=SMALL_LIMITS)
case(
    "small-too-many-headers",
    get(b"GET /x HTTP/1.1", *(b"X-%d: a" % i for i in range(9))),
    limits=SMALL_LIMITS,
)
case(
    "small-long-chunked-trailer",
    chunked(b"0\r\nX-T: " + b"a" * 1100 + b"\r\n\r\n" + SMUGGLED),
    limits=SMALL_LIMITS,
)


def test_the_battery_is_big_and_every_input_named_once() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    assert len({c.data for c in CASES}) == len(CASES), "duplicate inputs"
    assert len(CASES) >= 60, len(CASES)


# -------------------------------------------------------------------- harness


@contextlib.contextmanager
def request_parser(name: str) -> Iterator[None]:
    """New connections use llhttp, or aiohttp's pure-Python parser as without its wheels.

    aiohttp's RequestHandler picks its parser class from this module global when
    a connection is made, which is what AIOHTTP_NO_EXTENSIONS decides at import.
    """
    with pytest.MonkeyPatch.context() as patch:
        if name == "python":
            patch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
        yield


@pytest.fixture(params=PARSERS)
def parser(request: pytest.FixtureRequest) -> Iterator[str]:
    with request_parser(request.param):
        yield request.param


class RecordingUpstream(FakeUpstream):
    """A `FakeUpstream` that also keeps the raw target of every request it got."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.targets.append(request.raw_path)
            response: web.StreamResponse = await handler(request)
            return response

        app.middlewares.insert(0, record)
        return app


@dataclass
class Battery:
    upstream: RecordingUpstream
    port: int


@pytest.fixture
async def battery(
    tls_upstream: Any, start_sidecar: Any, bundle_file: Path, ca_file: Path
) -> AsyncIterator[Callable[[LimitsConfig], Awaitable[Battery]]]:
    """Start a recording upstream and a sidecar with the given limits in front of it.

    The loop runs in debug mode: aiohttp then puts a traceback into its own 500
    page, so a request that reached one would show it.
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(True)

    async def start(limits: LimitsConfig) -> Battery:
        fake = RecordingUpstream()
        url = await tls_upstream(fake.app())
        # what reaches the upstream is checked: no CSRF token fetch in between
        running = await start_sidecar(
            route_config(url, bundle_file, ca_file, limits=limits, session=NO_CSRF)
        )
        port = int(running.url.rsplit(":", 1)[1])
        return Battery(fake, port)

    try:
        yield start
    finally:
        loop.set_debug(False)


@dataclass
class Outcome:
    responses: list[RawResponse]
    closed: bool  # the sidecar closed the connection (rather than waiting for more)


async def send_raw(port: int, data: bytes, *, wait: float = 5.0) -> Outcome:
    """Send ``data`` on a new connection; read every response until EOF or ``wait``.

    A response that is not a refusal ends the reading at once: it is already a
    failure, and waiting for more would only slow the battery down.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses: list[RawResponse] = []
    closed = False
    try:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError:
            pass  # the sidecar may refuse and close before it has read everything
        while True:
            try:
                answer = await asyncio.wait_for(read_response(reader), wait)
            except asyncio.IncompleteReadError as exc:
                closed = not exc.partial
                assert not exc.partial, f"a truncated response: {exc.partial[:300]!r}"
                break
            except ConnectionError:
                closed = True
                break
            except TimeoutError:
                break
            responses.append(answer)
            if answer.status != 400 or answer.headers.get("Connection", "").lower() != "close":
                break
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    return Outcome(responses, closed)


# ---------------------------------------------------------------------- tests


def _params() -> list[Any]:
    return [
        pytest.param(
            c,
            id=c.name,
            marks=[
                pytest.mark.xfail(
                    LLHTTP or not c.llhttp_bug,
                    strict=True,
                    raises=AssertionError,
                    reason=f"BUG: {c.bug}",
                )
            ]
            if c.bug
            else [],
        )
        for c in CASES
    ]


@pytest.mark.parametrize("bad", _params())
async def test_malformed_input_is_refused_and_the_sidecar_keeps_serving(
    battery: Callable[[LimitsConfig], Awaitable[Battery]],
    caplog: pytest.LogCaptureFixture,
    bad: Case,
) -> None:
    b = await battery(bad.limits)
    # The pure-Python parser first: for llhttp's own bugs it is the one that refuses.
    for i, parser in enumerate(PARSERS, 1):
        with request_parser(parser):
            outcome = await send_raw(b.port, bad.data)
            (after,) = await raw(b.port, b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        for answer in outcome.responses:
            assert b"Traceback" not in answer.body, (parser, answer.body)
            assert answer.status < 500, (parser, answer.status, answer.body)
        if outcome.responses:
            (answer,) = outcome.responses  # exactly one answer: no second (smuggled) request
            expected = 403 if bad.code == "forbidden_target" else 400
            assert_raw_error(answer.status, answer.headers, answer.body, bad.code, expected)
            assert json.loads(answer.body)["error"]["code"] == bad.code
        else:
            assert outcome.closed, f"{parser}: neither an answer nor a closed connection"

        # The process is alive and the listener serves the next client.
        assert after.status == 200, (parser, after.body)
        assert after.json()["path"] == "/after"
        assert b.upstream.targets == ["/after"] * i, f"{parser}: forwarded {b.upstream.targets}"
        assert b.upstream.requests == i
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_small_limits_still_serve_requests_within_them(
    battery: Callable[[LimitsConfig], Awaitable[Battery]], parser: str
) -> None:
    """The limits refuse only what exceeds them: 8 headers and 1 KiB lines pass."""
    b = await battery(SMALL_LIMITS)
    target = b"/" + b"a" * 900
    headers = [b"X-%d: v" % i for i in range(7)]  # with Host: exactly max_headers
    (answer,) = await raw(b.port, get(b"GET " + target + b" HTTP/1.1", *headers))
    assert answer.status == 200, answer.body
    assert answer.json()["path"] == target.decode()
    (answer,) = await raw(b.port, get(b"GET /x HTTP/1.1", b"X-A: " + b"v" * 900))
    assert answer.status == 200, answer.body


async def test_a_body_that_looks_like_a_request_stays_a_body(
    battery: Callable[[LimitsConfig], Awaitable[Battery]], parser: str
) -> None:
    """The control for the battery: well-framed bodies holding a request are just bytes."""
    b = await battery(BATTERY_LIMITS)
    by_length = with_length(b"%d" % len(SMUGGLED), SMUGGLED)[: -len(SMUGGLED)]
    by_chunks = chunked(b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n")
    for data in (by_length, by_chunks):
        (answer,) = await raw(b.port, data)
        assert answer.status == 200, answer.body
        assert answer.json()["body_length"] == len(SMUGGLED)
    assert b.upstream.targets == ["/x", "/x"]
