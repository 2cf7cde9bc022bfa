"""Whole answers: the sidecar's own (errors, admin endpoints) and small relayed ones.

A plain record that `sidecar.forward.listener` frames and sends in one write;
no aiohttp response object is made for it.
"""

from __future__ import annotations

import json

from multidict import CIMultiDict


class Answer:
    """A status, its headers and a whole body.

    ``own``: the sidecar's answer, which the listener gives a Content-Type and a
    Server header when it has none; a relayed one (``own=False``) goes back with
    the upstream's headers only.
    """

    __slots__ = ("status", "reason", "headers", "body", "keep_alive", "own")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str] | None = None,
        body: bytes = b"",
        *,
        reason: str | None = None,
        own: bool = True,
    ) -> None:
        self.status, self.reason, self.body, self.own = status, reason, body, own
        self.headers: CIMultiDict[str] = CIMultiDict() if headers is None else headers
        self.keep_alive: bool | None = None  # None: as the request asks

    def force_close(self) -> None:
        """Close the connection after this answer."""
        self.keep_alive = False


def json_answer(data: object, status: int = 200) -> Answer:
    """``data`` as JSON, written as aiohttp's ``json_response`` writes it."""
    headers = CIMultiDict({"Content-Type": "application/json; charset=utf-8"})
    return Answer(status, headers, json.dumps(data).encode())
