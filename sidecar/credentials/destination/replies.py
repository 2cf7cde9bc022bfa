"""Reading the answers of XSUAA and the Destination Service, shared by token and lookup.

A bounded body, a JSON object, a short error detail, and the one mapping of a
connection failure to `DestinationUnavailable` (transient: retry later).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from sidecar.errors import DestinationError, DestinationUnavailable

MAX_RESPONSE_BYTES = 4 * 1024 * 1024


def unavailable(what: str, exc: BaseException) -> DestinationUnavailable:
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    elif isinstance(exc, aiohttp.ClientSSLError):
        reason = f"TLS failed: {exc}"
    else:
        reason = str(exc) or type(exc).__name__
    return DestinationUnavailable(
        f"{what}: cannot reach it: {reason}",
        hint="check the network and proxy settings; the sidecar retries",
    )


async def read_body(resp: aiohttp.ClientResponse, what: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise DestinationError(f"{what}: the answer is larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_body(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        # An HTML page from a proxy or a maintenance screen: worth another try later.
        raise DestinationUnavailable(f"{what}: the answer is not JSON") from None
    if not isinstance(data, dict):
        raise DestinationError(f"{what}: the answer is not a JSON object")
    return data


def error_detail(body: bytes) -> str:
    """A short reason from an error body: ErrorMessage, error_description, or text."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        for key in ("ErrorMessage", "error_description", "error", "message"):
            if isinstance(data.get(key), str) and data[key]:
                return f": {data[key][:300]}"
        return ""
    text = body.decode("utf-8", "replace").strip()
    if not text or text.startswith("<"):
        return ""
    return f": {' '.join(text.split())[:300]}"
