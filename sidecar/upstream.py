"""A route's connection to its upstream: identity, SSL context, pooled client.

`UpstreamClient` holds the current client identity and the aiohttp session
whose pooled keep-alive connections present it. A new identity replaces the
old one atomically: new requests get a new session at once, while the old
session is closed only when its requests in flight have finished.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

import aiohttp

from sidecar.config import RouteConfig, UpstreamURL
from sidecar.errors import ConfigError
from sidecar.identity import ClientIdentity, client_ssl_context
from sidecar.rewrite import upstream_bases
from sidecar.sources import Loaded
from sidecar.tasks import TaskGroup

log = logging.getLogger("sidecar.upstream")

POOL_LIMIT = 100  # open upstream connections per route at most
KEEPALIVE = 30.0  # seconds an idle upstream connection is kept


COMPANY_ID_HEADER = "successfactors-companyid"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
TOKEN_HEADER = "X-Sidecar-Token"
REQUEST_ID_HEADER = "X-Request-ID"


@dataclass(frozen=True)
class Target:
    """Where and how to forward, computed once per identity (not per request)."""

    upstream: UpstreamURL
    set_headers: tuple[tuple[str, str], ...]
    drop: frozenset[str]  # client headers not forwarded (replaced or ours)
    query: dict[str, str]
    rewrite_bases: tuple[bytes, ...]  # upstream URLs to rewrite; empty: rewriting is off


def route_target(route: RouteConfig, loaded: Loaded, where: str = "route") -> Target:
    """Merge the route's config with what the source said; the config wins."""
    upstream = route.upstream or loaded.upstream
    if upstream is None:
        raise ConfigError(f"{where}.upstream: no upstream URL configured or supplied")
    headers = {k.lower(): v for k, v in loaded.headers.items()}
    headers.update(route.headers)
    if route.company_id:
        headers[COMPANY_ID_HEADER] = route.company_id
    drop = {"host", "expect", TOKEN_HEADER.lower(), REQUEST_ID_HEADER.lower(), *headers}
    return Target(
        upstream=upstream,
        set_headers=tuple(headers.items()),
        drop=frozenset(drop),
        query={**loaded.query, **route.query},
        rewrite_bases=upstream_bases(upstream, route.rewrite_hosts) if route.rewrite_links else (),
    )


@dataclass(frozen=True)
class Generation:
    """One identity, where it sends requests, and the session that presents it."""

    identity: ClientIdentity
    target: Target
    session: aiohttp.ClientSession
    loaded_at: dt.datetime


class UpstreamClient:
    """The pooled mTLS client of one route."""

    def __init__(self, route: RouteConfig, tasks: TaskGroup) -> None:
        self.route = route
        self._tasks = tasks
        self.current: Generation | None = None
        self._retiring: set[aiohttp.ClientSession] = set()

    def install(self, identity: ClientIdentity, target: Target) -> Generation:
        """Start presenting ``identity``; the previous session retires gracefully."""
        ctx = client_ssl_context(identity, ca_file=self.route.tls.ca_file)
        connector = aiohttp.TCPConnector(
            ssl=ctx,
            limit=POOL_LIMIT,
            keepalive_timeout=KEEPALIVE,
            enable_cleanup_closed=False,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            # A proxy passes bytes through: no decompression, no cookie jar
            # shared between clients, no headers the client did not send.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.route.timeouts.connect,
                sock_read=self.route.timeouts.read,
            ),
            raise_for_status=False,
        )
        old, self.current = (
            self.current,
            Generation(identity, target, session, dt.datetime.now(dt.UTC)),
        )
        if old is not None:
            self._retire(old.session)
        return self.current

    def _retire(self, session: aiohttp.ClientSession) -> None:
        self._retiring.add(session)
        self._tasks.create(self._close_when_idle(session), name=f"retire-{self.route.name}")

    async def _close_when_idle(self, session: aiohttp.ClientSession) -> None:
        # Requests in flight finish on the old connections, however long a download takes:
        # each read is bounded by timeouts.read, so a stalled one ends on its own.
        connector = session.connector
        while connector is not None and _busy(connector):
            await asyncio.sleep(0.2)
        await session.close()
        self._retiring.discard(session)

    async def close(self) -> None:
        sessions = list(self._retiring)
        if self.current is not None:
            sessions.append(self.current.session)
        self.current = None
        for s in sessions:
            await s.close()

    def open_connections(self) -> int:
        """Upstream connections open now, idle or busy, across live sessions."""
        sessions = list(self._retiring)
        if self.current is not None:
            sessions.append(self.current.session)
        total = 0
        for s in sessions:
            c = s.connector
            if c is not None:
                total += len(getattr(c, "_acquired", ())) + sum(
                    len(v) for v in getattr(c, "_conns", {}).values()
                )
        return total


def _busy(connector: aiohttp.BaseConnector) -> bool:
    acquired = getattr(connector, "_acquired", None)
    return bool(acquired)
