"""The one table that turns upstream failures into the sidecar's error codes.

Everything the aiohttp client or OpenSSL can raise while we talk to the
upstream ends up in `classify()`, which returns a `Failure`: the HTTP status,
the code of DESIGN.md's error table, a message and a hint. The proxy, the
probe and the logs all use it, so a failure reads the same everywhere.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy

from sidecar.forward.answer import Answer, json_answer
from sidecar.forward.pool import (
    BadStatusLine,
    ClosedAfterHandshakeError,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    PayloadEncodingError,
    PoolTimeoutError,
    TransferEncodingError,
    UpstreamResponse,
)
from sidecar.forward.rewrite import BodyDecodeError, Decoder
from sidecar.http_rules import REQUEST_ID_HEADER

UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"
UPSTREAM_TLS_FAILED = "upstream_tls_failed"
CLIENT_CERTIFICATE_REJECTED = "client_certificate_rejected"
UPSTREAM_TIMEOUT = "upstream_timeout"
CREDENTIALS_UNAVAILABLE = "credentials_unavailable"
FORBIDDEN_TARGET = "forbidden_target"
INBOUND_AUTH_REQUIRED = "inbound_auth_required"
BAD_REQUEST = "bad_request"
INTERNAL_ERROR = "internal_error"  # a bug in the sidecar; never expected
REQUEST_TOO_LARGE = "request_too_large"  # routes[].limits.max_body
REQUEST_TIMEOUT = "request_timeout"  # a request body that stalls longer than timeouts.read
UPSTREAM_BAD_RESPONSE = "upstream_bad_response"  # framing, an unexpected 101, a corrupt body
NOT_FOUND = "not_found"  # an unknown admin path
METHOD_NOT_ALLOWED = "method_not_allowed"  # a method an admin path does not take

#: status and default hint of every code the sidecar answers itself
ERROR_CODES: dict[str, tuple[int, str]] = {
    UPSTREAM_CONNECT_FAILED: (
        502,
        "check the upstream URL, DNS and network path (proxy, firewall) to the API server",
    ),
    UPSTREAM_TLS_FAILED: (
        502,
        "the upstream's certificate is not trusted or does not match its name; add its CA "
        "with tls.ca_file (--ca-file) or set tls.server_name",
    ),
    CLIENT_CERTIFICATE_REJECTED: (
        502,
        "the server refused the client certificate: check the X.509 certificate mapping "
        "in SuccessFactors Security Center and that the certificate is the one uploaded there",
    ),
    UPSTREAM_TIMEOUT: (
        504,
        "the upstream did not answer in time; raise timeouts.connect / timeouts.read "
        "if it is just slow",
    ),
    CREDENTIALS_UNAVAILABLE: (
        503,
        "see /-/ready and the sidecar's log for why no valid client certificate is loaded",
    ),
    FORBIDDEN_TARGET: (
        403,
        "the sidecar only forwards to its configured upstream; send requests to it "
        "directly (e.g. http://127.0.0.1:8080/path)",
    ),
    INBOUND_AUTH_REQUIRED: (401, "send the configured token in the X-Sidecar-Token header"),
    BAD_REQUEST: (400, "fix the request's syntax"),
    INTERNAL_ERROR: (500, "please report this with the sidecar's log lines"),
    REQUEST_TOO_LARGE: (413, "send a smaller body, or raise limits.max_body"),
    REQUEST_TIMEOUT: (408, "send the request body without pausing longer than timeouts.read"),
    UPSTREAM_BAD_RESPONSE: (
        502,
        "the upstream's answer broke HTTP/1.1 (framing, an unexpected 101 or a corrupt "
        "compressed body): check what runs at the upstream URL, or report it to its owner",
    ),
    NOT_FOUND: (404, "the admin endpoints are health, ready, status and metrics"),
    METHOD_NOT_ALLOWED: (405, "admin endpoints answer GET (and HEAD) only"),
}

# OpenSSL reasons of TLS alerts a server sends when it does not accept the
# client certificate. In TLS 1.3 they arrive on the first read after the
# handshake, so they may come wrapped in a read error rather than a connect error.
_REJECTION_ALERTS = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_ACCESS_DENIED",
    "ALERT_DECRYPT_ERROR",
)  # not HANDSHAKE_FAILURE: it mostly means no common protocol or cipher


@dataclass(frozen=True)
class Failure:
    status: int
    code: str
    message: str
    hint: str
    kind: str  # label for metrics: connect, dns, tls, client_cert, timeout, reset, protocol


def failure(code: str, message: str, kind: str, hint: str | None = None) -> Failure:
    status, default_hint = ERROR_CODES[code]
    return Failure(status, code, message, hint or default_hint, kind)


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or during, outermost first (the one walker)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def rejection_alert(exc: BaseException) -> str | None:
    """The TLS alert reason if ``exc`` (or its cause) is a client-certificate rejection."""
    for e in exception_chain(exc):
        texts = [getattr(e, "reason", None) or "", str(e)]
        # A certificate error is our verdict on the server, never its alert (and before
        # aiohttp 3.14 reading its os_error raises AttributeError).
        if isinstance(e, aiohttp.ClientConnectorError) and not isinstance(
            e, aiohttp.ClientConnectorCertificateError
        ):
            texts.append(str(e.os_error))
        for text in texts:
            upper = str(text).upper()
            for alert in _REJECTION_ALERTS:
                if alert in upper:
                    return alert.removeprefix("ALERT_").lower()
    return None


# nginx never fails the handshake over a client certificate: it answers 400 with
# one of these titles (its internal codes 495/496, which other servers send as is).
_NGINX_REFUSALS = (b"No required SSL certificate was sent", b"The SSL certificate error")
_CERT_STATUSES = {495: "SSL Certificate Error", 496: "SSL Certificate Required"}
#: how much of a 400's body is read to find nginx's title
REFUSAL_PEEK = 4096


@dataclass(frozen=True)
class HttpRefusal:
    """An HTTP answer that refuses the client certificate (or, ``certain=False``, may)."""

    status: int
    title: str
    certain: bool  # False: 401/403 from the API, which may also mean a wrong company id

    def failure(self, upstream: str) -> Failure:
        return failure(
            CLIENT_CERTIFICATE_REJECTED,
            f"{upstream} refused the client certificate (HTTP {self.status} {self.title})",
            "client_cert",
        )


def http_refusal(status: int, body_head: bytes = b"") -> HttpRefusal | None:
    """Whether an upstream answer refuses the client certificate at the HTTP level.

    ``body_head`` is at most `REFUSAL_PEEK` bytes of the (decoded) body; only a
    400 needs it. The proxy turns the ``certain`` ones into 502
    ``client_certificate_rejected`` and passes 401/403 through (they carry the
    API's own explanation); ``check --probe`` and the rotation probe count both
    as rejections.
    """
    if status in _CERT_STATUSES:
        return HttpRefusal(status, _CERT_STATUSES[status], certain=True)
    if status == 400:
        for title in _NGINX_REFUSALS:
            if title in body_head:
                return HttpRefusal(status, title.decode(), certain=True)
        return None
    if status in (401, 403):
        return HttpRefusal(status, "Unauthorized" if status == 401 else "Forbidden", False)
    return None


async def peek_refusal(upstream: UpstreamResponse, method: str) -> tuple[bytes, HttpRefusal | None]:
    """Whether an answer refuses the client certificate, and the body bytes read to tell.

    Only a 400's body is read, at most `REFUSAL_PEEK` bytes (nginx's refusals are 400
    pages); the caller relays those bytes before the rest, so an ordinary 400 reaches
    the client unchanged. The proxy and ``check --probe`` both decide with this.
    """
    head = b""
    if upstream.status == 400 and method != "HEAD":
        head = await upstream.read_at_most(REFUSAL_PEEK)
    return head, http_refusal(upstream.status, _decoded(head, upstream.headers))


def _decoded(head: bytes, headers: CIMultiDictProxy[str]) -> bytes:
    """The start of a body as text for `http_refusal` (nginx may gzip its error pages)."""
    encoding = headers.get("Content-Encoding")
    if not head or encoding is None:
        return head
    try:
        return next(Decoder(encoding, piece=REFUSAL_PEEK).decode(head), b"")
    except (ValueError, BodyDecodeError):  # an undecodable coding: look at the bytes as sent
        return head


def _reason(error: OSError) -> str:
    # asyncio replaces strerror with "Connect call failed (...)"; the errno still tells.
    if error.errno:
        return f"{os.strerror(error.errno)} ({error.strerror or error})"
    return str(error.strerror or error)


# What was wrong with an answer, by the most specific class aiohttp's parser raised.
_MALFORMED: tuple[tuple[type[BaseException], str], ...] = (
    (BadStatusLine, "sent a malformed response head (invalid status line)"),
    (InvalidHeader, "sent a malformed response head (invalid header)"),
    (LineTooLong, "sent a malformed response head (a line too long)"),
    (ContentLengthError, "sent a broken response body (shorter than its Content-Length)"),
    (TransferEncodingError, "sent a broken response body (invalid chunked encoding)"),
    (ContentEncodingError, "sent a broken response body (a corrupt compressed body)"),
    (PayloadEncodingError, "sent a broken response body"),
    (aiohttp.ClientPayloadError, "sent a broken response body (it ended early or is malformed)"),
)


def _malformed(exc: BaseException) -> str:
    """What was wrong with the upstream's answer, in words: no byte of the answer."""
    chain = exception_chain(exc)
    for cls, text in _MALFORMED:
        if any(isinstance(e, cls) for e in chain):
            return text
    return "sent a malformed response head"


def classify(exc: BaseException, *, upstream: str) -> Failure:
    """Map an exception raised while talking to ``upstream`` to a `Failure`."""
    alert = rejection_alert(exc)
    if alert is not None:
        return failure(
            CLIENT_CERTIFICATE_REJECTED,
            f"{upstream} rejected the client certificate (TLS alert: {alert})",
            "client_cert",
        )
    # Order matters: the more specific classes come first.
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return failure(
            UPSTREAM_TLS_FAILED,
            f"{upstream}: server certificate not accepted: {exc.certificate_error}",
            "tls",
        )
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return failure(
            UPSTREAM_CONNECT_FAILED,
            f"cannot resolve the host of {upstream}: {exc.os_error}",
            "dns",
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return failure(
            UPSTREAM_TLS_FAILED,
            f"TLS handshake with {upstream} failed: {exc.os_error}",
            "tls",
            "no TLS version or cipher in common with the upstream, or it refused the client "
            "certificate without saying so: check tls settings and the X.509 mapping",
        )
    if isinstance(exc, ClosedAfterHandshakeError):
        return failure(
            CLIENT_CERTIFICATE_REJECTED,
            f"{upstream} closed the connection right after the TLS handshake, before "
            "answering: a TLS 1.3 server that refuses the client certificate does this",
            "client_cert",
        )
    if isinstance(exc, PoolTimeoutError):
        return failure(
            UPSTREAM_TIMEOUT,
            f"all {exc.limit} connections to {upstream} were busy for {exc.waited:g}s "
            "(limits.upstream_connections)",
            "timeout",
            "raise the route's limits.upstream_connections, or timeouts.connect to wait "
            "longer for a free connection; see which requests hold them in the access log",
        )
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return failure(UPSTREAM_TIMEOUT, f"connecting to {upstream} timed out", "timeout")
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return failure(UPSTREAM_TIMEOUT, f"{upstream} did not answer in time", "timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return failure(
            UPSTREAM_CONNECT_FAILED,
            f"cannot connect to {upstream}: {_reason(exc.os_error)}",
            "connect",
        )
    if isinstance(exc, ssl.SSLError):
        return failure(UPSTREAM_TLS_FAILED, f"TLS error with {upstream}: {exc}", "tls")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return failure(
            UPSTREAM_CONNECT_FAILED, f"{upstream} closed the connection without answering", "reset"
        )
    if isinstance(
        exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError | HttpProcessingError
    ):
        # Never the exception's text: aiohttp quotes the offending bytes of the answer,
        # which may be a Set-Cookie or token; the message goes to logs, clients, /-/status.
        return failure(UPSTREAM_BAD_RESPONSE, f"{upstream} {_malformed(exc)}", "protocol")
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError | OSError):
        return failure(UPSTREAM_CONNECT_FAILED, f"connection to {upstream} failed: {exc}", "reset")
    if isinstance(exc, aiohttp.ClientError):
        return failure(UPSTREAM_CONNECT_FAILED, f"request to {upstream} failed: {exc}", "protocol")
    raise exc


def error_response(
    code: str, message: str, hint: str | None = None, *, request_id: str | None = None
) -> Answer:
    """The sidecar's own answer: JSON error body and ``X-Sidecar-Error``."""
    status, default_hint = ERROR_CODES[code]
    body = {"error": {"code": code, "message": message, "hint": hint or default_hint}}
    response = json_answer(body, status)
    response.headers["X-Sidecar-Error"] = code
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response
