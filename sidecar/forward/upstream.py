"""A route's connection to its upstream: identity, SSL context, pooled client.

`UpstreamClient` holds the current client identity and the connection pool
whose keep-alive connections present it. A new identity replaces the old one
atomically: new requests get a new pool at once, while the old pool is closed
only when its requests in flight have finished.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import ssl
from dataclasses import dataclass

from sidecar.config import RouteConfig, UpstreamURL
from sidecar.credentials.identity import ClientIdentity, client_ssl_context
from sidecar.credentials.sources import Loaded
from sidecar.errors import ConfigError
from sidecar.forward.headers import route_headers
from sidecar.forward.pool import ConnectionPool
from sidecar.forward.rewrite import upstream_bases
from sidecar.forward.session import UpstreamSession
from sidecar.http_rules import COMPANY_ID_HEADER
from sidecar.tasks import TaskGroup

log = logging.getLogger("sidecar.upstream")

KEEPALIVE = 30.0  # seconds an idle upstream connection is kept
RETIRE_POLL = 0.2  # seconds between checks whether a retired pool is idle


@dataclass(frozen=True)
class Target:
    """Where and how to forward, computed once per identity (not per request)."""

    upstream: UpstreamURL
    set_headers: tuple[tuple[str, str], ...]
    drop: frozenset[str]  # client headers not forwarded (replaced or ours)
    query: dict[str, str]
    rewrite_bases: tuple[bytes, ...]  # upstream URLs to rewrite; empty: rewriting is off

    @property
    def company_id(self) -> str | None:
        """The company id sent, whatever the case of its name (a destination may send
        ``SuccessFactors-CompanyId``)."""
        for name, value in self.set_headers:
            if name.lower() == COMPANY_ID_HEADER:
                return value
        return None


def route_target(route: RouteConfig, loaded: Loaded, where: str = "route") -> Target:
    """Merge the route's config with what the source said; the config wins."""
    upstream = route.upstream or loaded.upstream
    if upstream is None:
        raise ConfigError(f"{where}.upstream: no upstream URL configured or supplied")
    set_headers, drop = route_headers(loaded.headers, route.headers, route.company_id, where)
    return Target(
        upstream=upstream,
        set_headers=set_headers,
        drop=drop,
        query={**loaded.query, **route.query},
        rewrite_bases=upstream_bases(upstream, route.rewrite_hosts) if route.rewrite_links else (),
    )


def route_pool(
    route: RouteConfig,
    target: Target,
    ssl_context: ssl.SSLContext,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    limit: int | None = None,
    keepalive: float = KEEPALIVE,
) -> ConnectionPool:
    """A pool to ``target``'s upstream with the route's TLS name, timeouts and limits.

    The timeouts default to the route's ``timeouts``, ``limit`` to its
    ``limits.upstream_connections``.
    """
    return ConnectionPool(
        target.upstream.host,
        target.upstream.port,
        ssl_context,
        server_hostname=route.tls.server_name,
        connect_timeout=route.timeouts.connect if connect_timeout is None else connect_timeout,
        read_timeout=route.timeouts.read if read_timeout is None else read_timeout,
        limit=route.limits.upstream_connections if limit is None else limit,
        keepalive=keepalive,
    )


@dataclass(frozen=True)
class Generation:
    """One identity, where it sends requests, the pool that presents it, and its
    upstream session (a new certificate is a new login: its own cookies and tokens)."""

    identity: ClientIdentity
    target: Target
    pool: ConnectionPool
    loaded_at: dt.datetime
    session: UpstreamSession

    @functools.cached_property
    def not_after(self) -> dt.datetime:
        """The leaf's expiry, read once (readiness asks on every request)."""
        return self.identity.leaf.not_valid_after_utc


class UpstreamClient:
    """The pooled mTLS client of one route."""

    def __init__(self, route: RouteConfig, tasks: TaskGroup) -> None:
        self.route = route
        self._tasks = tasks
        self.current: Generation | None = None
        self._retiring: set[ConnectionPool] = set()

    def install(
        self, identity: ClientIdentity, target: Target, ssl_context: ssl.SSLContext | None = None
    ) -> Generation:
        """Start presenting ``identity`` (``ssl_context``: its context, if built already);
        the previous pool retires gracefully."""
        if ssl_context is None:
            ssl_context = client_ssl_context(identity, ca_file=self.route.tls.ca_file)
        pool = route_pool(self.route, target, ssl_context)
        old, self.current = (
            self.current,
            Generation(
                identity,
                target,
                pool,
                dt.datetime.now(dt.UTC),
                UpstreamSession(target.upstream, self.route.session),
            ),
        )
        if old is not None:
            self.current.session.inherit(old.session)
            self._retire(old.pool)
        return self.current

    def _retire(self, pool: ConnectionPool) -> None:
        self._retiring.add(pool)
        self._tasks.create(self._close_when_idle(pool), name=f"retire-{self.route.name}")

    async def _close_when_idle(self, pool: ConnectionPool) -> None:
        # Requests in flight finish on the old connections, however long a download takes:
        # each read is bounded by timeouts.read, so a stalled one ends on its own.
        while pool.busy:
            await asyncio.sleep(RETIRE_POLL)
        await pool.close()
        self._retiring.discard(pool)

    async def close(self) -> None:
        pools = list(self._retiring)
        if self.current is not None:
            pools.append(self.current.pool)
        self.current = None
        for pool in pools:
            await pool.close()

    def open_connections(self) -> int:
        """Upstream connections open now, idle or busy, across live pools."""
        pools = list(self._retiring)
        if self.current is not None:
            pools.append(self.current.pool)
        return sum(pool.open_connections() for pool in pools)
