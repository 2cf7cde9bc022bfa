"""One response as an ``Answer`` (however it was obtained) and DESIGN.md's error table."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

# DESIGN.md, "Errors the sidecar itself answers", copied by hand on purpose:
# the table in the code must not drift from the contract.
DESIGN_TABLE = {
    "upstream_connect_failed": 502,
    "upstream_tls_failed": 502,
    "client_certificate_rejected": 502,
    "upstream_timeout": 504,
    "credentials_unavailable": 503,
    "forbidden_target": 403,
    "inbound_auth_required": 401,
    "bad_request": 400,
    "upstream_bad_response": 502,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_too_large": 413,
    "request_timeout": 408,
    "internal_error": 500,
}


class Answer:
    """Status, headers and body of one response, however it was obtained."""

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Answer({self.status}, {dict(self.headers)!r}, {self.body[:500]!r})"


async def fetch(url: str, method: str = "GET", **kwargs: Any) -> Answer:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, **kwargs) as resp:
            return Answer(resp.status, CIMultiDict(resp.headers), await resp.read())


async def raw_exchange(base_url: str, request: bytes) -> Answer:
    """Send ``request`` verbatim on a new connection and read one response."""
    url = URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
        length = int(headers.get("Content-Length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return Answer(status, headers, body)
    finally:
        writer.close()
        await writer.wait_closed()


def assert_sidecar_error(answer: Answer, code: str) -> dict[str, str]:
    """The sidecar's own JSON error for ``code``; returns its ``error`` object."""
    assert b"Traceback" not in answer.body, answer
    assert answer.status == DESIGN_TABLE[code], answer
    assert answer.headers.get("X-Sidecar-Error") == code, answer
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer
    doc = json.loads(answer.body)
    assert list(doc) == ["error"], doc
    error = doc["error"]
    assert set(error) == {"code", "message", "hint"}, error
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["hint"], str) and error["hint"]
    return dict(error)
