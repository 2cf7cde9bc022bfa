"""TLS session resumption for asyncio client connections.

asyncio gives no way to pass a saved TLS session to a new connection, so a
client that opens a new upstream connection would pay a full mTLS handshake
(certificate chain, signature) every time. `ResumingContext` remembers, per
server name, the last client connection it created and offers that
connection's session (a TLS 1.2 session id or a TLS 1.3 ticket, which arrives
after the handshake and is read only when needed) to the next one. A server
that declines simply does a full handshake.
"""

from __future__ import annotations

import ssl
from typing import Any


class ResumingContext(ssl.SSLContext):
    """A client `SSLContext` whose new connections resume the previous session."""

    _last: dict[str | None, ssl.SSLObject]
    _sessions: dict[str | None, ssl.SSLSession]

    def __new__(
        cls, protocol: int = ssl.PROTOCOL_TLS_CLIENT, *args: Any, **kwargs: Any
    ) -> ResumingContext:
        self = super().__new__(cls, protocol, *args, **kwargs)
        self._last = {}
        self._sessions = {}
        return self

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        key = server_hostname.decode() if isinstance(server_hostname, bytes) else server_hostname
        if not server_side and session is None:
            session = self._resumable(key)
        obj = super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        if not server_side:
            self._last[key] = obj
        return obj

    def last_connection(self, server_hostname: str | None) -> ssl.SSLObject | None:
        """The TLS object of the newest connection to ``server_hostname`` (for reports)."""
        return self._last.get(server_hostname)

    def _resumable(self, key: str | None) -> ssl.SSLSession | None:
        previous = self._last.get(key)
        if previous is not None:
            try:
                fresh = previous.session
            except (ValueError, ssl.SSLError):
                fresh = None
            if fresh is not None and (fresh.has_ticket or fresh.id):
                self._sessions[key] = fresh
        return self._sessions.get(key)
