"""How the proxy answers what goes wrong: refusals at the HTTP level, bad answers, bugs.

Each upstream here answers with bytes written by hand (the blocking servers of
tests.support.tls_servers, one thread per connection), because what is tested is an
answer an aiohttp server would not give: nginx's certificate refusal page, a
495, a corrupt gzip body, an unasked-for 101. The sidecar runs in the test's
event loop; its answers are checked against DESIGN.md's error table, its
metrics through ``/-/metrics`` and its access line through the log.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

import sidecar.forward.handler
from tests.conftest import PKI, route_config
from tests.support.answers import Answer, assert_sidecar_error, fetch, raw_exchange
from tests.support.tls_servers import (
    Handler,
    TLSServer,
    close_cleanly,
    read_request,
    server_context,
)

# nginx's own page when `ssl_verify_client on` finds no certificate (byte for byte,
# CRLF line ends included), and the one for a certificate it does not accept.
NGINX_NO_CERT = (
    b"<html>\r\n<head><title>400 No required SSL certificate was sent</title></head>\r\n"
    b"<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
    b"<center>No required SSL certificate was sent</center>\r\n"
    b"<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n"
)
NGINX_CERT_ERROR = (
    b"<html>\r\n<head><title>400 The SSL certificate error</title></head>\r\n"
    b"<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
    b"<center>The SSL certificate error</center>\r\n"
    b"<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n"
)
SECRET = b"s3cr3t-upstream-bytes"  # must never reach a client's JSON or the log


def canned(answer: bytes) -> Handler:
    """A handler that reads one request, sends ``answer`` as is, and closes."""

    def handle(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        conn.sendall(answer)
        close_cleanly(conn)

    return handle


def response(status: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


def nginx_400(body: bytes) -> bytes:
    return response(
        "400 Bad Request",
        body,
        "Server: nginx/1.24.0",
        "Content-Type: text/html",
        f"Content-Length: {len(body)}",
        "Connection: close",
    )


async def metric(url: str, name: str, **labels: str) -> float:
    """One sample of ``/-/metrics`` (0 when the series does not exist yet)."""
    answer = await fetch(url + "/-/metrics")
    for line in answer.body.decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def through(
    pki: PKI, handler: Handler, start_sidecar: Any, bundle: Path, ca: Path, path: str = "/x"
) -> tuple[Answer, str]:
    """One GET through a sidecar to a TLS server running ``handler``: (answer, sidecar URL)."""
    with TLSServer(server_context(pki), handler) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle, ca))
        answer = await fetch(running.url + path)
    return answer, running.url


# ------------------------------------------------- HTTP-level certificate refusals


@pytest.mark.parametrize(
    "answer, title",
    [
        (nginx_400(NGINX_NO_CERT), "400 No required SSL certificate was sent"),
        (nginx_400(NGINX_CERT_ERROR), "400 The SSL certificate error"),
        (response("495 SSL Certificate Error", b"", "Content-Length: 0"), "495"),
        (response("496 X", b"no cert", "Content-Length: 7"), "496 SSL Certificate Required"),
    ],
    ids=["nginx-no-cert", "nginx-cert-error", "495", "496"],
)
async def test_an_http_level_refusal_is_client_certificate_rejected(
    pki, start_sidecar, bundle_file, ca_file, answer, title
):
    got, url = await through(pki, canned(answer), start_sidecar, bundle_file, ca_file)
    error = assert_sidecar_error(got, "client_certificate_rejected")
    assert f"HTTP {title}" in error["message"]
    assert "Security Center" in error["hint"]
    assert b"<html>" not in got.body  # nginx's page is not passed on
    assert await metric(url, "sidecar_upstream_errors_total", kind="client_cert") == 1


def framed_400(body: bytes, framing: str) -> bytes:
    """An ordinary 400 (no certificate words) with ``body``, framed as asked."""
    head = ["Content-Type: text/plain", "X-Upstream: kept"]
    if framing == "content-length":
        return response("400 Bad Request", body, *head, f"Content-Length: {len(body)}")
    if framing == "chunked":
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in _cut(body, 1000)) + b"0\r\n\r\n"
        return response("400 Bad Request", chunks, *head, "Transfer-Encoding: chunked")
    return response("400 Bad Request", body, *head, "Connection: close")  # until the close


def _cut(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
@pytest.mark.parametrize("size", [0, 37, 4096, 4097, 300_000])
async def test_an_ordinary_400_reaches_the_client_byte_for_byte(
    pki, start_sidecar, bundle_file, ca_file, framing, size
):
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    got, url = await through(
        pki, canned(framed_400(body, framing)), start_sidecar, bundle_file, ca_file
    )
    assert got.status == 400
    assert got.body == body
    assert got.headers["X-Upstream"] == "kept"
    assert "X-Sidecar-Error" not in got.headers
    assert await metric(url, "sidecar_upstream_errors_total", kind="client_cert") == 0


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_pass_through_unchanged(
    pki, start_sidecar, bundle_file, ca_file, caplog, status
):
    body = b'{"error":{"message":"no such user"}}'
    answer = response(
        f"{status} X", body, "Content-Type: application/json", f"Content-Length: {len(body)}"
    )
    with caplog.at_level(logging.WARNING, logger="sidecar.proxy"):
        got, _ = await through(pki, canned(answer), start_sidecar, bundle_file, ca_file)
    assert (got.status, got.body) == (status, body)
    assert "X-Sidecar-Error" not in got.headers
    warnings = [r.getMessage() for r in caplog.records if "upstream answered 401" in r.getMessage()]
    if status == 401:
        (warning,) = warnings
        assert "company id (ACME1234)" in warning
    else:
        assert warnings == []


# ------------------------------------------------------ bad answers: corrupt, 101


async def test_a_corrupt_gzip_body_is_upstream_bad_response(
    pki, start_sidecar, bundle_file, ca_file, caplog
):
    body = b"\x1f\x8b\x08\x00" + SECRET + b" not gzip at all"
    answer = response(
        "200 OK",
        body,
        "Content-Type: application/json",
        "Content-Encoding: gzip",
        f"Content-Length: {len(body)}",
    )
    with caplog.at_level(logging.DEBUG):
        got, url = await through(pki, canned(answer), start_sidecar, bundle_file, ca_file)
    error = assert_sidecar_error(got, "upstream_bad_response")
    assert "undecodable" in error["message"]
    assert SECRET not in got.body and SECRET.decode() not in caplog.text
    assert await metric(url, "sidecar_upstream_errors_total", kind="protocol") == 1


async def test_a_gzip_body_corrupt_midway_cuts_the_connection(
    pki, start_sidecar, bundle_file, ca_file, caplog
):
    good = gzip.compress(json.dumps({"pad": "0" * 400_000}).encode())
    body = good[: len(good) // 2] + b"\xff" * 2000 + SECRET
    answer = response(
        "200 OK",
        body,
        "Content-Type: application/json",
        "Content-Encoding: gzip",
        f"Content-Length: {len(body)}",
    )
    with TLSServer(server_context(pki), canned(answer)) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        request = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
        with caplog.at_level(logging.INFO):
            reader, writer = await asyncio.open_connection("127.0.0.1", URL(running.url).port)
            writer.write(request)
            received = b""
            try:
                while chunk := await asyncio.wait_for(reader.read(65536), 10):
                    received += chunk
            except ConnectionResetError:
                pass  # the reset may arrive before every byte is read
            finally:
                writer.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert not received.endswith(b"0\r\n\r\n")  # never a complete-looking chunked body
    failed = [r for r in caplog.records if "mid-response" in r.getMessage()]
    assert [getattr(r, "code", None) for r in failed] == ["upstream_bad_response"]
    assert SECRET.decode() not in caplog.text
    assert await metric(running.url, "sidecar_upstream_errors_total", kind="protocol") == 1


def switching_then_ok(per_connection: list[int]) -> Handler:
    """The first request on each connection gets a 101; later ones (if any) a 200."""

    def handle(server: TLSServer, conn: ssl.SSLSocket) -> None:
        per_connection.append(0)
        try:
            while True:
                read_request(server, conn)
                per_connection[-1] += 1
                if per_connection[-1] == 1:
                    conn.sendall(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x-secret\r\n"
                        b"Connection: Upgrade\r\nX-Leak: " + SECRET + b"\r\n\r\n"
                    )
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (ConnectionError, OSError):
            pass

    return handle


async def test_an_unasked_101_is_upstream_bad_response_and_its_connection_dropped(
    pki, start_sidecar, bundle_file, ca_file, caplog
):
    per_connection: list[int] = []
    with TLSServer(server_context(pki), switching_then_ok(per_connection)) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        with caplog.at_level(logging.DEBUG):
            first = await fetch(running.url + "/ws")
            second = await fetch(running.url + "/ws")
    for got in (first, second):
        error = assert_sidecar_error(got, "upstream_bad_response")
        assert "101" in error["message"]
        assert SECRET not in got.body
    # each request found a new connection: the switched one was never used again
    assert per_connection == [1, 1]
    assert SECRET.decode() not in caplog.text
    assert await metric(running.url, "sidecar_upstream_errors_total", kind="protocol") == 2


# ------------------------------------------------------------- 100 Continue


async def test_100_continue_is_not_sent_to_an_http10_client(
    pki, start_sidecar, bundle_file, ca_file
):
    def echo_length(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        close_cleanly(conn)

    with TLSServer(server_context(pki), echo_length) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        reader, writer = await asyncio.open_connection("127.0.0.1", URL(running.url).port)
        try:
            writer.write(
                b"PUT /upload HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\nhello"
            )
            received = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
    # the first line is the final answer: no interim 100 an HTTP/1.0 client cannot expect
    assert received.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), received
    assert b"100 Continue" not in received


# --------------------------------------------- a bug: still answered, logged, counted


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sidecar.access"]


def broken(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("boom from a bug")


@pytest.mark.parametrize(
    "where, patch",
    [
        # before anything went upstream
        (
            "before",
            lambda mp: mp.setattr(sidecar.forward.handler, "upstream_request_headers", broken),
        ),
        # after the answer's head went out: the connection is cut instead
        ("after", lambda mp: mp.setattr(sidecar.forward.handler, "_close_watch", broken)),
    ],
    ids=["before-the-answer", "after-its-head"],
)
async def test_an_unexpected_exception_is_answered_logged_and_counted(
    pki, start_sidecar, bundle_file, ca_file, caplog, monkeypatch, where, patch: Callable[..., Any]
):
    def ok(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        body = b"x" * 100_000  # streamed, not sent in one write
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        close_cleanly(conn)

    with TLSServer(server_context(pki), ok) as upstream:
        running = await start_sidecar(route_config(upstream.url, bundle_file, ca_file))
        patch(monkeypatch)
        with caplog.at_level(logging.INFO):
            if where == "before":
                got = await raw_exchange(running.url, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
                error = assert_sidecar_error(got, "internal_error")
                assert "boom" not in json.dumps(error)
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", URL(running.url).port)
                writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    received = await asyncio.wait_for(reader.read(), 10)
                except ConnectionResetError:
                    received = b""
                finally:
                    writer.close()
                assert len(received) < 100_000  # cut, never complete-looking
        monkeypatch.undo()
        status = "500" if where == "before" else "200"
        assert await metric(running.url, "sidecar_requests_total", code=status) == 1
        assert await metric(running.url, "sidecar_requests_in_flight") == 0
    (line,) = [r for r in access_lines(caplog) if "/x" in r.getMessage()]
    assert f" {status} " in line.getMessage()
    (logged,) = [r for r in caplog.records if "internal error while handling" in r.getMessage()]
    assert logged.exc_info is not None and "boom from a bug" in str(logged.exc_info[1])


async def test_an_upstream_header_with_a_control_character_is_upstream_bad_response(
    pki, start_sidecar, bundle_file, ca_file, caplog
):
    # Found by review: the relayed header made aiohttp refuse the answer mid-way, and the
    # client got a closed connection with no status at all.
    answer = response(
        "200 OK",
        b"ok",
        "Content-Type: text/plain",
        "X-Upstream: a\x01" + SECRET.decode(),
        "Content-Length: 2",
    )
    with caplog.at_level(logging.DEBUG):
        got, url = await through(pki, canned(answer), start_sidecar, bundle_file, ca_file)
    error = assert_sidecar_error(got, "upstream_bad_response")
    assert "X-Upstream" in error["message"] and "control character" in error["message"]
    assert SECRET not in got.body and SECRET.decode() not in caplog.text
    assert await metric(url, "sidecar_upstream_errors_total", kind="protocol") == 1
