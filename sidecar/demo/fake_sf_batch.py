"""The OData V2 ``$batch`` wire format, for the fake SuccessFactors API.

Only the format, no semantics (sidecar.demo.fake_sf runs the requests). A batch
request is a ``multipart/mixed`` body whose parts are either one
``application/http`` request (a read) or a *changeset*: a nested
``multipart/mixed`` of ``application/http`` writes. The answer is again a
``multipart/mixed``: one ``application/http`` response per read, and per
changeset either a nested ``multipart/mixed`` with one response per write, or,
when the changeset failed, the one error response alone::

    --batch_1                          --batchresponse_x
    Content-Type: application/http     Content-Type: application/http

    GET User('u0001') HTTP/1.1         HTTP/1.1 200 OK
                                       Content-Type: application/json
    --batch_1                          ...
    Content-Type: multipart/mixed; boundary=changeset_1
    ...

Lines end in CRLF as RFC 2046 asks; a bare LF is tolerated on input, since
hand-written batches often have them.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from http import HTTPStatus

from multidict import CIMultiDict


class BatchSyntaxError(ValueError):
    """The ``$batch`` body does not follow the multipart/mixed or HTTP format."""


@dataclass(frozen=True)
class Request:
    """One request inside a batch, as written there (``target`` may be relative)."""

    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes
    content_id: str | None = None  # the part's Content-ID, echoed on its response


@dataclass(frozen=True)
class Changeset:
    requests: list[Request]


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, sent on its own or as a part of a batch answer."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_id: str | None = field(default=None, compare=False)


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")


def boundary_of(content_type: str) -> str:
    """The boundary of a ``multipart/mixed`` content type; BatchSyntaxError if none."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/mixed":
        raise BatchSyntaxError(
            f"Content-Type must be multipart/mixed with a boundary, not {content_type!r}"
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"')
    raise BatchSyntaxError(f"Content-Type {content_type!r} names no boundary")


def split_multipart(body: bytes, boundary: str) -> list[bytes]:
    """The parts of a multipart body, between its delimiter lines (RFC 2046, 5.1.1)."""
    delimiter = re.compile(
        rb"(?:^|\r?\n)--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*(?:\r?\n|$)"
    )
    parts: list[bytes] = []
    start: int | None = None  # the preamble before the first delimiter is ignored
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
        if match.group(1):  # the close delimiter: the epilogue after it is ignored
            if not parts:
                raise BatchSyntaxError("the batch holds no part")
            return parts
        start = match.end()
    raise BatchSyntaxError(f"the body does not end with the close delimiter --{boundary}--")


def _headers(block: bytes) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in _LINE_END.split(block):
        if not line:
            continue
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or not name.strip():
            raise BatchSyntaxError(f"not a header line: {line.decode('latin-1')!r}")
        headers.add(name.strip(), value.strip())
    return headers


def _split_head(raw: bytes) -> tuple[bytes, bytes]:
    """Headers and body of a MIME part or an HTTP message (the blank line between)."""
    found = _HEADER_END.search(raw)
    if found is None:  # headers only, no blank line
        return raw, b""
    return raw[: found.start()], raw[found.end() :]


def _http_request(raw: bytes, content_id: str | None) -> Request:
    head, body = _split_head(raw.lstrip(b"\r\n"))
    request_line, _, header_block = head.partition(b"\n")
    words = request_line.decode("latin-1").strip().split()
    if len(words) != 3 or not words[2].startswith("HTTP/"):
        raise BatchSyntaxError(
            f"not an HTTP request line: {request_line.decode('latin-1').strip()!r}"
        )
    return Request(words[0].upper(), words[1], _headers(header_block), body, content_id)


def _part(raw: bytes) -> tuple[str, str, CIMultiDict[str], bytes]:
    """A MIME part: its media type (lower case), full content type, headers and body."""
    head, body = _split_head(raw)
    headers = _headers(head)
    content_type = headers.get("Content-Type", "")
    return content_type.split(";")[0].strip().lower(), content_type, headers, body


def _request(raw: bytes, *, in_changeset: bool) -> Request:
    kind, content_type, headers, body = _part(raw)
    if kind != "application/http":
        where = "a changeset part" if in_changeset else "a batch part"
        raise BatchSyntaxError(f"{where} must be application/http, not {content_type!r}")
    request = _http_request(body, headers.get("Content-ID"))
    if in_changeset and request.method == "GET":
        raise BatchSyntaxError(f"GET {request.target}: a changeset holds writes only")
    if not in_changeset and request.method != "GET":
        raise BatchSyntaxError(f"{request.method} {request.target}: writes belong in a changeset")
    return request


def parse_batch(body: bytes, content_type: str) -> list[Request | Changeset]:
    """The reads and changesets of a ``$batch`` request, in order."""
    operations: list[Request | Changeset] = []
    for raw in split_multipart(body, boundary_of(content_type)):
        kind, inner_type, _, inner_body = _part(raw)
        if kind == "multipart/mixed":
            parts = split_multipart(inner_body, boundary_of(inner_type))
            operations.append(Changeset([_request(p, in_changeset=True) for p in parts]))
        else:
            operations.append(_request(raw, in_changeset=False))
    return operations


def _http_part(reply: Reply) -> bytes:
    reason = HTTPStatus(reply.status).phrase
    lines = [f"HTTP/1.1 {reply.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in reply.headers]
    lines.append(f"Content-Length: {len(reply.body)}")
    mime = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if reply.content_id is not None:
        mime.append(f"Content-ID: {reply.content_id}")
    head = "\r\n".join([*mime, "", *lines, "", ""])
    return head.encode("latin-1") + reply.body


def _multipart(parts: list[bytes], boundary: str) -> bytes:
    out = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return out + b"--" + boundary.encode() + b"--\r\n"


def write_batch(answers: list[Reply | list[Reply]]) -> tuple[bytes, str]:
    """The body and content type of a batch answer: a Reply per read or failed
    changeset, a list of Replies per changeset that succeeded."""
    boundary = f"batchresponse_{secrets.token_hex(8)}"
    parts = []
    for answer in answers:
        if isinstance(answer, Reply):
            parts.append(_http_part(answer))
            continue
        inner = f"changesetresponse_{secrets.token_hex(8)}"
        head = f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n".encode()
        parts.append(head + _multipart([_http_part(r) for r in answer], inner))
    return _multipart(parts, boundary), f"multipart/mixed; boundary={boundary}"
