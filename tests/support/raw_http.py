"""Raw HTTP/1.1 over a socket: where aiohttp's client would tidy up what is sent."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET") -> RawResponse:
    """One HTTP/1.1 response, framed the way RFC 9112 says (no extra bytes read)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    if method == "HEAD" or status in (204, 304) or status < 200:
        body = b""
    elif "chunked" in headers.get("Transfer-Encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await reader.readexactly(size + 2))
            if size == 0:
                break
        body = b"".join(p[:-2] for p in parts)
    elif "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    else:
        body = await reader.read()
    return RawResponse(status, headers, body)


async def raw(port: int, *requests: bytes, methods: tuple[str, ...] = ()) -> list[RawResponse]:
    """Send each request on one connection and read its response before the next."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        async with asyncio.timeout(20):
            for i, data in enumerate(requests):
                writer.write(data)
                await writer.drain()
                method = methods[i] if i < len(methods) else data.split(b" ", 1)[0].decode()
                answers.append(await read_response(reader, method=method))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


def assert_raw_error(status: int, headers: Any, body: bytes, code: str, expected: int) -> None:
    assert status == expected, body
    assert headers["X-Sidecar-Error"] == code
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["message"] and error["hint"]
    assert b"Traceback" not in body
