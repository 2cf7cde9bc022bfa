"""DESIGN.md's error table, every row produced end to end through the sidecar.

Each failure is caused for real on loopback (a server that refuses our
client certificate, an untrusted or misnamed upstream certificate, a closed
port, a reset, a slow upstream, an expiring certificate, requests the
sidecar must refuse) and the answer is checked against the contract: the
row's status, ``Content-Type: application/json``, ``X-Sidecar-Error`` and
the ``{"error": {"code", "message", "hint"}}`` body, never a traceback.
The blocking servers of tests.support.tls_servers stand in where an aiohttp server
would hide what the sidecar must see (the TLS alert, post-handshake
authentication, a connection closed without an answer).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import io
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

import sidecar.forward.pool
from sidecar.config import InboundConfig, LimitsConfig, Timeouts
from sidecar.forward.failures import ERROR_CODES, Failure, classify
from sidecar.forward.pool import connection_key
from tests.conftest import NO_CSRF, PKI, free_port, load_chain, route_config
from tests.support.answers import DESIGN_TABLE, assert_sidecar_error, fetch, raw_exchange
from tests.support.tls_servers import (
    AlertLosingServer,
    ResetServer,
    TLSServer,
    close_without_answer,
    post_handshake_auth,
    read_request,
    reset,
    reset_after_request,
    respond,
    server_context,
)
from tests.support.upstreams import FakeUpstream

UPSTREAM = "https://upstream.example:8443"
TOKEN = "t" * 32


# ------------------------------------------------------------------ helpers


def ok_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok from upstream")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    return app


# ------------------------------------------------- client_certificate_rejected


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
async def test_client_certificate_rejected(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any, version: ssl.TLSVersion
) -> None:
    # The server trusts only another CA: our chain ends in an unknown CA. With
    # TLS 1.2 the alert ends the handshake; with TLS 1.3 the client has already
    # finished its side and reads the alert on the first read after it.
    ctx = server_context(pki, client_ca=pki.other_ca.cert_pem(), maximum_version=version)
    with TLSServer(ctx, respond) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/odata/v2/User")
    error = assert_sidecar_error(answer, "client_certificate_rejected")
    assert "unknown_ca" in error["message"]
    assert upstream.url.removeprefix("https://") in error["message"]
    assert "X.509" in error["hint"] and "Security Center" in error["hint"]
    assert upstream.handshake_errors, "the server never saw (and refused) our certificate"
    assert upstream.requests == []
    assert upstream.errors == []


async def test_client_certificate_rejected_during_an_upload(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    # TLS 1.3: the alert arrives while the body is being written; the write that finds the
    # connection closing must not hide the alert behind a "reset".
    ctx = server_context(
        pki, client_ca=pki.other_ca.cert_pem(), maximum_version=ssl.TLSVersion.TLSv1_3
    )
    with TLSServer(ctx, respond) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/upload", "POST", data=io.BytesIO(b"x" * (4 << 20)))
    error = assert_sidecar_error(answer, "client_certificate_rejected")
    assert "unknown_ca" in error["message"]
    assert upstream.handshake_errors and upstream.requests == []


async def test_tls13_post_handshake_authentication(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    ctx = server_context(pki, post_handshake_auth=True)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with TLSServer(ctx, post_handshake_auth) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/pha")
    assert upstream.errors == []
    assert answer.status == 200, answer
    assert answer.body == b"authenticated after the handshake"
    assert "X-Sidecar-Error" not in answer.headers
    (cert,) = upstream.peer_certs
    subject = dict(pair[0] for pair in cert["subject"])  # type: ignore[attr-defined]
    assert subject["commonName"] == "sidecar-technical-user"
    assert upstream.requests[0].startswith(b"GET /pha HTTP/1.1")


@pytest.mark.parametrize("ending", ["reset", "close"])
async def test_a_tls13_refusal_whose_alert_is_lost_is_still_a_rejection(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any, ending: str
) -> None:
    # Issue 12: a renewed certificate the upstream does not trust gave 502
    # upstream_connect_failed "Connection reset by peer", sending users to check DNS.
    ctx = server_context(pki, client_ca=pki.other_ca.cert_pem())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with AlertLosingServer(ctx, ending) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/odata/v2/User")
    assert upstream.errors == []
    assert upstream.handshake_errors, "the server never saw (and refused) our certificate"
    error = assert_sidecar_error(answer, "client_certificate_rejected")
    assert "right after the TLS handshake" in error["message"]
    assert upstream.url.removeprefix("https://") in error["message"]
    assert "X.509" in error["hint"]


def answer_then_reset(server: TLSServer, conn: ssl.SSLSocket) -> None:
    """Answer the first request with keep-alive; reset the connection at the second."""
    read_request(server, conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    read_request(server, conn)
    reset(conn)


async def test_a_reset_of_a_reused_connection_is_not_a_rejection(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    # No session tickets: nothing but the connection's history says the server took us.
    ctx = server_context(pki)
    ctx.num_tickets = 0
    with TLSServer(ctx, answer_then_reset) as upstream:
        running = await start_sidecar(
            route_config(upstream.url, bundle_file, ca_file, session=NO_CSRF)
        )
        first = await fetch(running.url + "/first")
        second = await fetch(running.url + "/second", "POST", data=b"not repeated")
    assert (first.status, first.body) == (200, b"ok")
    assert upstream.connections == 1
    assert_sidecar_error(second, "upstream_connect_failed")
    assert len(upstream.requests) == 2
    assert upstream.errors == []


async def test_handshake_failure_without_a_common_cipher_is_not_blamed_on_the_certificate(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    # The server accepts our CA but offers only a cipher with RSA key exchange,
    # which its EC certificate cannot use: OpenSSL answers "no shared cipher"
    # with a handshake_failure alert before any certificate was looked at.
    ctx = server_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("AES128-SHA")
    with TLSServer(ctx, respond) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/x")
    assert "NO_SHARED_CIPHER" in str(upstream.handshake_errors)
    assert_sidecar_error(answer, "upstream_tls_failed")


# --------------------------------------------------------- upstream_tls_failed


@pytest.mark.parametrize("case", ["untrusted-ca", "name-mismatch"])
async def test_upstream_tls_failed(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any, case: str
) -> None:
    if case == "untrusted-ca":
        server_cert, reason = pki.other_ca.server("localhost"), "certificate verify failed"
    else:
        server_cert, reason = pki.root.server("otherhost"), "Hostname mismatch"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_chain(ctx, server_cert)
    with TLSServer(ctx, respond) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, "upstream_tls_failed")
    assert reason in error["message"]
    assert "ca_file" in error["hint"]
    assert upstream.requests == [], "a request went to an upstream we do not trust"


# ----------------------------------------------------- upstream_connect_failed


async def test_upstream_connect_failed_closed_port(
    bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    port = free_port()
    running = await start_sidecar(route_config(f"https://localhost:{port}", bundle_file, ca_file))
    answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, "upstream_connect_failed")
    assert f"localhost:{port}" in error["message"]


async def test_closed_port_message_says_refused(
    bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    port = free_port()
    running = await start_sidecar(route_config(f"https://127.0.0.1:{port}", bundle_file, ca_file))
    answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, "upstream_connect_failed")
    assert "refused" in error["message"].lower(), error["message"]


async def test_upstream_connect_failed_reset_on_connect(
    bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    with ResetServer() as upstream:
        url = f"https://localhost:{upstream.port}"
        running = await start_sidecar(route_config(url, bundle_file, ca_file))
        answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, "upstream_connect_failed")
    # Whether the reset shows up in connect() or in the TLS handshake depends on timing.
    assert f"localhost:{upstream.port}" in error["message"]
    # A socket object the loop left open warns (an error here) when it is collected.
    gc.collect()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_upstream_connect_failed_reset_after_request(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any, method: str
) -> None:
    with TLSServer(server_context(pki), reset_after_request) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(
            running.url + "/x", method, data=b"payload" if method == "POST" else None
        )
    assert_sidecar_error(answer, "upstream_connect_failed")
    assert upstream.errors == []


class FailingResolver(AbstractResolver):
    """Fails every lookup like getaddrinfo for an unknown name, without asking DNS."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        raise OSError(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        pass


async def test_classify_dns_failure_from_a_real_connector() -> None:
    resolver = FailingResolver()
    connector = aiohttp.TCPConnector(resolver=resolver)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorDNSError) as info:
            await session.get("https://api.sf-upstream.test/odata/v2/User")
    assert resolver.asked == ["api.sf-upstream.test"]
    fail = classify(info.value, upstream="https://api.sf-upstream.test")
    assert (fail.status, fail.code, fail.kind) == (502, "upstream_connect_failed", "dns")
    assert "cannot resolve" in fail.message and "api.sf-upstream.test" in fail.message


async def test_upstream_connect_failed_dns_end_to_end(
    monkeypatch: pytest.MonkeyPatch, bundle_file: Path, ca_file: Path, start_sidecar: Any
) -> None:
    # The route's pool builds its resolver from this name; no lookup leaves the process.
    monkeypatch.setattr(sidecar.forward.pool, "DefaultResolver", FailingResolver)
    url = "https://api.sf-upstream.test"
    running = await start_sidecar(route_config(url, bundle_file, ca_file))
    answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, "upstream_connect_failed")
    assert "cannot resolve" in error["message"]


# ------------------------------------------------------- upstream_bad_response

SECRET = "s3cr3t-session-4711"
MALFORMED_ANSWERS = {
    "header-without-colon": f"HTTP/1.1 200 OK\r\nSet-Cookie JSESSIONID={SECRET}\r\n",
    "space-before-colon": f"HTTP/1.1 200 OK\r\nSet-Cookie : JSESSIONID={SECRET}\r\n",
    "nul-character": f"HTTP/1.1 200 OK\r\nSet-Cookie: JSESSIONID={SECRET}\x00\r\n",
    "status-line": f"HTTP/1.1 2OO {SECRET}\r\n",
}


@pytest.mark.parametrize("head", MALFORMED_ANSWERS.values(), ids=MALFORMED_ANSWERS.keys())
async def test_a_malformed_answer_is_bad_response_and_its_bytes_are_never_repeated(
    pki: PKI,
    bundle_file: Path,
    ca_file: Path,
    start_sidecar: Any,
    caplog: pytest.LogCaptureFixture,
    head: str,
) -> None:
    # Issue 12: aiohttp's parse errors quote the offending line, e.g. a Set-Cookie value,
    # and that text went to the log, the client's JSON and /-/status.
    def malformed(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        conn.sendall(head.encode("latin-1") + b"Content-Length: 2\r\n\r\nok")
        close_without_answer_wait(conn)

    caplog.set_level("DEBUG")
    with TLSServer(server_context(pki), malformed) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        answer = await fetch(running.url + "/odata/v2/User")
        status = await fetch(running.url + "/-/status")
    assert upstream.errors == []
    error = assert_sidecar_error(answer, "upstream_bad_response")
    assert "sent a malformed response head" in error["message"], error
    assert upstream.url.removeprefix("https://") in error["message"]
    assert status.status == 200 and b"malformed response head" in status.body
    for where, text in [
        ("answer", answer.body.decode()),
        ("log", caplog.text + repr([r.__dict__ for r in caplog.records])),
        ("/-/status", status.body.decode()),
    ]:
        assert SECRET not in text, f"the upstream's bytes leaked into the {where}"
        assert "JSESSIONID" not in text, f"the upstream's bytes leaked into the {where}"


def close_without_answer_wait(conn: ssl.SSLSocket) -> None:
    """After a bad answer: wait until the client closes (it must not reuse the connection)."""
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


@pytest.mark.parametrize(
    ("cause", "words"),
    [
        ("InvalidHeader", "malformed response head (invalid header)"),
        ("BadStatusLine", "malformed response head (invalid status line)"),
        ("LineTooLong", "malformed response head (a line too long)"),
        ("TransferEncodingError", "broken response body (invalid chunked encoding)"),
        ("ContentEncodingError", "broken response body (a corrupt compressed body)"),
    ],
)
def test_classify_describes_a_parse_error_by_its_class_not_its_text(cause: str, words: str) -> None:
    underlying = getattr(sidecar.forward.pool, cause)(f"Set-Cookie: sid={SECRET}")
    raised = sidecar.forward.pool.HttpProcessingError(message=str(underlying))
    raised.__cause__ = underlying
    fail = classify(raised, upstream=UPSTREAM)
    assert (fail.status, fail.code) == (502, "upstream_bad_response")
    assert fail.message == f"{UPSTREAM} sent a {words}"
    assert SECRET not in fail.message


# ------------------------------------------------------------ upstream_timeout


async def test_upstream_timeout_on_read(
    bundle_file: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    received = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        received.set()
        await release.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    url = await tls_upstream(app)
    route = route_config(
        url, bundle_file, ca_file, timeouts=Timeouts(connect=5, read=0.5, shutdown=1)
    )
    running = await start_sidecar(route)
    started = time.monotonic()
    try:
        answer = await fetch(running.url + "/slow")
    finally:
        release.set()
    elapsed = time.monotonic() - started
    assert received.is_set()
    error = assert_sidecar_error(answer, "upstream_timeout")
    assert "in time" in error["message"]
    assert 0.5 <= elapsed < 5, elapsed


async def test_upstream_timeout_when_every_upstream_connection_stays_busy(
    bundle_file: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    fake = FakeUpstream()
    url = await tls_upstream(fake.app())
    route = route_config(
        url,
        bundle_file,
        ca_file,
        timeouts=Timeouts(connect=0.5, read=30, shutdown=1),
        limits=LimitsConfig(upstream_connections=1),
    )
    running = await start_sidecar(route)
    loop = asyncio.get_running_loop()
    slow = loop.create_task(fetch(running.url + "/slow"))  # holds the one connection
    try:
        await asyncio.wait_for(fake.slow_started.wait(), 5)
        started = time.monotonic()
        answer = await asyncio.wait_for(fetch(running.url + "/x"), 5)
        elapsed = time.monotonic() - started
    finally:
        fake.release.set()
    assert (await slow).status == 200
    error = assert_sidecar_error(answer, "upstream_timeout")
    assert "all 1 connections" in error["message"], error
    assert "limits.upstream_connections" in error["message"]
    assert 0.45 <= elapsed < 2, elapsed
    assert fake.requests == 1  # the waiting request never reached the upstream


def test_classify_connect_timeout() -> None:
    fail = classify(aiohttp.ConnectionTimeoutError("Connection timeout to host"), upstream=UPSTREAM)
    assert (fail.status, fail.code, fail.kind) == (504, "upstream_timeout", "timeout")
    assert "connecting to" in fail.message and UPSTREAM in fail.message
    assert "timeouts.connect" in fail.hint


# ----------------------------------------------------- credentials_unavailable


async def test_credentials_unavailable_after_the_certificate_expires(
    pki: PKI, tmp_path: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    not_after = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=3)
    short = pki.intermediate.client(not_after=not_after)
    bundle = tmp_path / "short-lived.pem"
    bundle.write_bytes(short.key_pem() + short.chain_pem())
    bundle.chmod(0o600)
    url = await tls_upstream(ok_app())
    running = await start_sidecar(route_config(url, bundle, ca_file))

    before = await fetch(running.url + "/x")
    assert before.status == 200, "the certificate should still be valid: the test is too slow"
    assert (await fetch(running.url + "/-/ready")).status == 200

    deadline = time.monotonic() + 10
    while dt.datetime.now(dt.UTC) < not_after and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    ready = await fetch(running.url + "/-/ready")
    assert ready.status == 503, ready
    reason = json.loads(ready.body)["reason"]
    assert "expired" in reason
    answer = await fetch(running.url + "/x")
    error = assert_sidecar_error(answer, "credentials_unavailable")
    assert "expired" in error["message"]
    assert "/-/ready" in error["hint"]


async def test_credentials_unavailable_returns_the_request_id(
    pki: PKI, tmp_path: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    not_after = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=2)
    short = pki.intermediate.client(not_after=not_after)
    bundle = tmp_path / "short-lived.pem"
    bundle.write_bytes(short.btp_bundle())
    bundle.chmod(0o600)
    url = await tls_upstream(ok_app())
    running = await start_sidecar(route_config(url, bundle, ca_file))
    deadline = time.monotonic() + 10
    while dt.datetime.now(dt.UTC) < not_after and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    answer = await fetch(running.url + "/x", headers={"X-Request-ID": "trace-4711"})
    assert_sidecar_error(answer, "credentials_unavailable")
    assert answer.headers.get("X-Request-ID") == "trace-4711"


# ------------------------------------------------------------ forbidden_target


async def test_forbidden_target_absolute_form_for_another_host(
    bundle_file: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    url = await tls_upstream(ok_app())
    running = await start_sidecar(route_config(url, bundle_file, ca_file))
    answer = await raw_exchange(
        running.url, b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    )
    error = assert_sidecar_error(answer, "forbidden_target")
    assert "evil.example" in error["message"]


async def test_forbidden_target_connect(
    bundle_file: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    url = await tls_upstream(ok_app())
    running = await start_sidecar(route_config(url, bundle_file, ca_file))
    answer = await raw_exchange(
        running.url, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    error = assert_sidecar_error(answer, "forbidden_target")
    assert "CONNECT" in error["message"]


# ------------------------------------------------------- inbound_auth_required


async def test_inbound_auth_required(
    bundle_file: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    url = await tls_upstream(ok_app())
    route = route_config(url, bundle_file, ca_file, inbound=InboundConfig(token_env="TOK"))
    running = await start_sidecar(route, env={"TOK": TOKEN})

    missing = await fetch(running.url + "/x")
    error = assert_sidecar_error(missing, "inbound_auth_required")
    assert "X-Sidecar-Token" in error["message"] and "X-Sidecar-Token" in error["hint"]
    wrong = await fetch(running.url + "/x", headers={"X-Sidecar-Token": "u" * 32})
    assert_sidecar_error(wrong, "inbound_auth_required")

    right = await fetch(running.url + "/x", headers={"X-Sidecar-Token": TOKEN})
    assert (right.status, right.body) == (200, b"ok from upstream")
    # Probes never need the token.
    assert (await fetch(running.url + "/-/ready")).status == 200


# ----------------------------------------------------------------- bad_request


async def test_bad_request_asterisk_form(
    bundle_file: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    url = await tls_upstream(ok_app())
    running = await start_sidecar(route_config(url, bundle_file, ca_file))
    answer = await raw_exchange(running.url, b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert_sidecar_error(answer, "bad_request")


MALFORMED = {
    "garbage-request-line": b"GARBAGE\r\n\r\n",
    "nul-in-path": b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-header-line": b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "bad-content-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "header-too-long": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "obsolete-line-folding": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n  folded\r\n\r\n",
    "content-length-and-chunked": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_requests_get_400_without_a_traceback(
    bundle_file: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any, request_bytes: bytes
) -> None:
    url = await tls_upstream(ok_app())
    running = await start_sidecar(route_config(url, bundle_file, ca_file))
    answer = await raw_exchange(running.url, request_bytes)
    assert answer.status == 400, answer
    assert b"Traceback" not in answer.body


async def test_malformed_request_is_json_bad_request(
    bundle_file: Path, ca_file: Path, start_sidecar: Any, tls_upstream: Any
) -> None:
    url = await tls_upstream(ok_app())
    running = await start_sidecar(route_config(url, bundle_file, ca_file))
    answer = await raw_exchange(running.url, MALFORMED["garbage-request-line"])
    assert_sidecar_error(answer, "bad_request")


# ------------------------------------------------------ the table is complete


def test_error_codes_are_designs_table() -> None:
    ours = {code: status for code, (status, _) in ERROR_CODES.items()}
    assert ours == DESIGN_TABLE
    assert all(hint for _, hint in ERROR_CODES.values())


def _client_errors() -> dict[str, tuple[BaseException, str]]:
    """One realistic instance of each exception the pool can raise, and its code.

    Keyed by class name (a suffix after "-" marks a second case of a class);
    getattr keeps classes that older aiohttp versions lack from breaking the import.
    """
    key = connection_key("upstream.example", 8443)
    info = aiohttp.RequestInfo(URL(UPSTREAM), "GET", CIMultiDictProxy(CIMultiDict()))
    verify = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get issuer"
    )
    errors: dict[str, tuple[BaseException, str]] = {
        "ClientError": (aiohttp.ClientError("request failed"), "upstream_connect_failed"),
        "ClientConnectionError": (
            aiohttp.ClientConnectionError("the connection pool is closed"),
            "upstream_connect_failed",
        ),
        "ClientConnectionResetError": (
            aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
            "upstream_connect_failed",
        ),
        "ClientConnectorError": (
            aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused")),
            "upstream_connect_failed",
        ),
        "ClientConnectorDNSError": (
            aiohttp.ClientConnectorDNSError(key, OSError(socket.EAI_NONAME, "Name not known")),
            "upstream_connect_failed",
        ),
        "ClientConnectorCertificateError": (
            aiohttp.ClientConnectorCertificateError(key, verify),
            "upstream_tls_failed",
        ),
        "ClientConnectorSSLError": (
            aiohttp.ClientConnectorSSLError(key, ssl.SSLError(1, "[SSL] wrong version number")),
            "upstream_tls_failed",
        ),
        "ClientConnectorSSLError-alert": (
            aiohttp.ClientConnectorSSLError(
                key, ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
            ),
            "client_certificate_rejected",
        ),
        "ClientSSLError": (
            aiohttp.ClientSSLError(key, ssl.SSLError(1, "[SSL] decryption failed")),
            "upstream_tls_failed",
        ),
        "ServerConnectionError": (
            aiohttp.ServerConnectionError("server connection failed"),
            "upstream_connect_failed",
        ),
        "ServerDisconnectedError": (aiohttp.ServerDisconnectedError(), "upstream_connect_failed"),
        "ServerTimeoutError": (
            aiohttp.ServerTimeoutError("Timeout on reading"),
            "upstream_timeout",
        ),
        "ConnectionTimeoutError": (aiohttp.ConnectionTimeoutError("connect"), "upstream_timeout"),
        "SocketTimeoutError": (aiohttp.SocketTimeoutError("sock_read"), "upstream_timeout"),
        "ClientPayloadError": (
            aiohttp.ClientPayloadError("Response payload is not completed"),
            "upstream_bad_response",
        ),
        "ClientOSError": (
            aiohttp.ClientOSError(104, "Connection reset by peer"),
            "upstream_connect_failed",
        ),
        "ClientOSError-tls13-alert": (
            aiohttp.ClientOSError(
                1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"
            ),
            "client_certificate_rejected",
        ),
        "ClientResponseError": (
            aiohttp.ClientResponseError(info, (), status=400, message="Invalid response"),
            "upstream_bad_response",
        ),
    }
    upload_aborted = getattr(aiohttp, "UploadAbortedError", None)  # aiohttp 3.13+
    if upload_aborted is not None:
        errors["UploadAbortedError"] = (
            upload_aborted("the request body was not sent"),
            "upstream_connect_failed",
        )
    return errors


# aiohttp client exceptions our pool cannot raise: it follows no redirects, parses
# no URL, decodes no JSON, uses no proxy, pins no fingerprint and speaks no WebSocket.
NOT_FROM_OUR_POOL = frozenset(
    {
        "ClientHttpProxyError",
        "ClientProxyConnectionError",
        "ContentTypeError",
        "InvalidURL",
        "InvalidUrlClientError",
        "InvalidUrlRedirectClientError",
        "NonHttpUrlClientError",
        "NonHttpUrlRedirectClientError",
        "RedirectClientError",
        "ServerFingerprintMismatch",
        "WSMessageTypeError",
        "WSServerHandshakeError",
    }
)


@pytest.mark.parametrize(
    ("exc", "code"), list(_client_errors().values()), ids=list(_client_errors())
)
def test_classify_maps_every_aiohttp_client_error(exc: BaseException, code: str) -> None:
    fail = classify(exc, upstream=UPSTREAM)
    assert isinstance(fail, Failure)
    assert (fail.code, fail.status) == (code, DESIGN_TABLE[code])
    assert fail.message and fail.hint and fail.kind
    assert "Traceback" not in fail.message


def test_classify_covers_every_client_error_class_of_aiohttp() -> None:
    # A new exception class in aiohttp's list should show up here, not in production.
    classes = {
        name: obj
        for name in aiohttp.client_exceptions.__all__
        if isinstance(obj := getattr(aiohttp.client_exceptions, name), type)
        and issubclass(obj, BaseException)
    }
    assert len(classes) > 20, sorted(classes)  # the list is read, not empty
    examples = _client_errors()
    constructed = {type(exc).__name__ for exc, _ in examples.values()}
    missing = set(classes) - NOT_FROM_OUR_POOL - constructed
    assert not missing, f"add realistic instances of {sorted(missing)} to _client_errors()"
    for name, (exc, code) in examples.items():
        assert type(exc) is classes[type(exc).__name__], name  # the class itself, no subclass
        assert classify(exc, upstream=UPSTREAM).code == code in ERROR_CODES, name
    assert NOT_FROM_OUR_POOL <= set(classes), "an exclusion aiohttp no longer has"


# ------------------------------------------------------------- no retry of a body


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_request_whose_body_went_out_is_not_retried(
    pki: PKI, bundle_file: Path, ca_file: Path, start_sidecar: Any, method: str
) -> None:
    with TLSServer(server_context(pki), close_without_answer) as upstream:
        running = await start_sidecar(
            route_config(upstream.url, bundle_file, ca_file, session=NO_CSRF)
        )
        answer = await fetch(running.url + "/odata/v2/upsert", method, data=b"x" * 10_000)
    assert len(upstream.requests) == 1, upstream.requests
    assert upstream.connections == 1
    assert upstream.requests[0].startswith(f"{method} /odata/v2/upsert ".encode())
    error = assert_sidecar_error(answer, "upstream_connect_failed")
    assert "without answering" in error["message"]
