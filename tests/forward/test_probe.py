"""``check --probe`` calls every kind of certificate refusal a rejection (exit 1).

The HTTP-level refusals go through `failures.http_refusal`, the
classifier the proxy uses too: nginx never fails the handshake over a client
certificate but answers 400 with one of its own pages, other servers 495/496.
A TLS 1.3 server that refuses the certificate and closes before its alert
gets through is a rejection too.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tests.conftest import PKI, free_port
from tests.support.process import check_probe, write_config, write_files
from tests.support.tls_servers import (
    AlertLosingServer,
    TLSServer,
    answer,
    read_request,
    server_context,
)


def nginx_page(title: str) -> bytes:
    """nginx's own error page, byte for byte (its CRLF lines and version footer)."""
    return (
        f"<html>\r\n<head><title>400 {title}</title></head>\r\n<body>\r\n"
        f"<center><h1>400 Bad Request</h1></center>\r\n<center>{title}</center>\r\n"
        "<hr><center>nginx/1.27.3</center>\r\n</body>\r\n</html>\r\n"
    ).encode()


REFUSALS = {
    "nginx-no-certificate": (400, nginx_page("No required SSL certificate was sent")),
    "nginx-certificate-error": (400, nginx_page("The SSL certificate error")),
    "495": (495, b"SSL Certificate Error"),
    "496": (496, b"SSL Certificate Required"),
}


@pytest.mark.parametrize(("status", "body"), REFUSALS.values(), ids=REFUSALS.keys())
def test_check_probe_calls_an_http_refusal_rejected(
    pki: PKI, tmp_path: Path, status: int, body: bytes
) -> None:
    def refuse(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        answer(conn, status, body)

    write_files(tmp_path, pki)
    with TLSServer(server_context(pki), refuse) as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config)
    assert code == 1, output
    assert f"HTTP status {status}" in output
    assert "certificate:  NOT ACCEPTED: the TLS handshake succeeded but" in output
    assert "refused the client certificate (HTTP" in output
    assert "X.509" in output
    assert "route(s) failed the probe" in output
    assert "ACCEPTED: the server accepted" not in output


def test_check_probe_calls_an_ordinary_400_accepted(pki: PKI, tmp_path: Path) -> None:
    def bad_request(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        answer(conn, 400, nginx_page("Request Header Or Cookie Too Large"))

    write_files(tmp_path, pki)
    with TLSServer(server_context(pki), bad_request) as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config)
    assert code == 0, output
    assert "certificate:  ACCEPTED" in output and "HTTP status 400" in output


@pytest.mark.parametrize("ending", ["reset", "close"])
def test_check_probe_calls_a_close_right_after_the_tls13_handshake_rejected(
    pki: PKI, tmp_path: Path, ending: str
) -> None:
    write_files(tmp_path, pki)
    ctx = server_context(pki, client_ca=pki.other_ca.cert_pem())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with AlertLosingServer(ctx, ending) as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config)
    assert code == 1, output
    assert "probe:        handshake rejected by the server" in output
    assert "right after the TLS handshake" in output
    assert upstream.handshake_errors
