"""A route's live state, as the server drives it and the admin endpoints read it.

`RouteRuntime` holds one route's credential source, its upstream client (the
current identity and pool), its counters and its last error; `readiness` and
`route_status` read it for ``/-/ready`` and ``/-/status``. Living here rather
than in the server, it lets admin read a route without importing the server.

A renewed certificate reaches `RouteRuntime.offer`: with
``credentials.probe_before_switch`` it is first tried in one request of its own
(`sidecar.forward.probe`); refused while the current one is still valid, it is
held back as `Pending` and tried again every `pending_retry` seconds, switching
by itself once accepted. A probe that cannot tell (the upstream unreachable)
never switches and never calls the certificate refused.

Choosing a route's credential source (`source_for`) lives here too, above
``sidecar.credentials``, so that the sources' protocol does not import the
Destination Service source that implements it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.config import RouteConfig
from sidecar.credentials.certinfo import identity_summary
from sidecar.credentials.identity import client_ssl_context
from sidecar.credentials.sources import CredentialSource, FileSource, Loaded
from sidecar.errors import SidecarError
from sidecar.forward.handler import RouteProxy
from sidecar.forward.listener import Listener, bound_port
from sidecar.forward.probe import ProbeResult, probe
from sidecar.forward.upstream import Target, UpstreamClient, route_target
from sidecar.telemetry.metrics import RouteStats

log = logging.getLogger("sidecar")

EXPIRY_WARNING_EVERY = 86400.0
PENDING_RETRY = 60.0  # seconds between probes of a held-back renewed certificate
PROBE_TIMEOUT = 10.0  # seconds for each step of that probe (connect, read)


@dataclass
class Pending:
    """A renewed identity held back because the upstream refused it (or could not tell)."""

    loaded: Loaded
    target: Target
    since: str  # ISO time it was first held back
    result: ProbeResult  # the last probe's
    probed_at: str
    next_probe: float  # time.monotonic() of the next probe

    def status(self) -> dict[str, object]:
        summary = identity_summary(self.loaded.identity)
        return {
            "subject": summary["subject"],
            "issuer": summary["issuer"],
            "not_after": summary["not_after"],
            "sha256": summary["sha256"],
            "since": self.since,
            "last_probe": {
                "at": self.probed_at,
                "result": self.result.verdict,
                "message": self.result.message,
            },
            "next_probe_in_seconds": max(0, round(self.next_probe - time.monotonic())),
        }


@dataclass
class RouteRuntime:
    """Everything one route needs while serving."""

    index: int
    route: RouteConfig
    source: CredentialSource
    client: UpstreamClient
    stats: RouteStats
    proxy: RouteProxy | None = None
    last_error: str | None = None
    retry_soon: bool = False  # the last failure was transient: back off, then retry
    site: Listener | None = None
    # Set by every SIGHUP, cleared as a reload starts: a SIGHUP during a reload asks for
    # another one, so each signal is followed by a load that began after it.
    reload_requested: asyncio.Event = field(default_factory=asyncio.Event)
    pending: Pending | None = None
    pending_retry: float = PENDING_RETRY
    _last_expiry_warning: float = 0.0

    @property
    def where(self) -> str:
        return f"routes[{self.index}]"

    @property
    def bound_address(self) -> str:
        """HOST:PORT actually bound (port 0 in the config picks a free one)."""
        host = self.route.listen.host
        port = bound_port(self.site) if self.site is not None else self.route.listen.port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def apply(
        self, loaded: Loaded, *, quiet: bool = False, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Validate the target, then swap the new identity in (``ssl_context``: its
        context when the probe built it already; the key is loaded once)."""
        target = route_target(self.route, loaded, self.where)
        current = self.client.current
        if (
            current is not None
            and current.identity.chain == loaded.identity.chain
            and current.target == target
        ):
            # Nothing changed (a SIGHUP, a touched file): keep the warm connection pool.
            self.last_error = None
            self.retry_soon = False
            self.stats.reloaded(True, None, current.identity.leaf.not_valid_after_utc)
            log.debug("route %s: credentials reloaded, unchanged", self.route.name)
            return
        self.client.install(loaded.identity, target, ssl_context)
        self.last_error = None
        self.retry_soon = False
        leaf = loaded.identity.leaf
        self.stats.reloaded(True, None, leaf.not_valid_after_utc)
        if not quiet:
            log.info("route %s: client certificate loaded: %s (expires %s)", self.route.name,
                     leaf.subject.rfc4514_string(), leaf.not_valid_after_utc.date())  # fmt: skip
        self._last_expiry_warning = 0.0
        self.warn_expiry(loaded.identity.warnings)

    def warn_expiry(self, warnings: tuple[str, ...] = ()) -> None:
        """Warnings at load; the expiry warning again at most once a day."""
        now = time.monotonic()
        if self._last_expiry_warning and now - self._last_expiry_warning < EXPIRY_WARNING_EVERY:
            return
        generation = self.client.current
        if generation is None:
            return
        for w in warnings or generation.identity.warnings:
            log.warning("route %s: %s", self.route.name, w)
        self._last_expiry_warning = now

    def failed(self, exc: SidecarError) -> None:
        self.last_error = str(exc)
        self.retry_soon = exc.transient
        self.stats.reloaded(False, str(exc), None)
        keeping = "keeping the last good certificate" if self.client.current else "not ready"
        log.error("route %s: loading credentials failed (%s): %s", self.route.name, keeping, exc)

    async def reload(self) -> bool:
        """Load again now and offer the result; False when loading failed."""
        try:
            loaded = await self.source.load()
            if loaded is not None:
                await self.offer(loaded)
            return True
        except SidecarError as exc:
            self.failed(exc)
            return False

    async def offer(self, loaded: Loaded, *, retry: bool = False) -> None:
        """A reload's identity: switch to it, unless it is a renewal the upstream refuses.

        Probed first when ``probe_before_switch`` is on, a current identity exists
        and the certificate changed (new headers alone switch at once). Refused or
        untested (the upstream unreachable) while the current one is still valid: held
        back as pending. With the current one expired there is nothing to lose: the
        new one is used whatever the probe said, and a refusal is reported.
        """
        target = route_target(self.route, loaded, self.where)
        current = self.client.current
        if (
            current is None
            or not self.route.credentials.probe_before_switch
            or current.identity.chain == loaded.identity.chain
        ):
            self._settle(None)
            self.apply(loaded)
            return
        context = client_ssl_context(loaded.identity, ca_file=self.route.tls.ca_file)
        result = await probe(self.route, context, target, timeout=PROBE_TIMEOUT)
        if result.accepted:
            self._settle(None)
            log.info("route %s: the upstream accepted the renewed client certificate (%s)",
                     self.route.name, result.message)  # fmt: skip
            self.apply(loaded, ssl_context=context)  # its resumable TLS session too
            return
        if readiness(self) is not None:  # the current one expired meanwhile
            self._settle(None)
            log.error(
                "route %s: the renewed client certificate is used although %s: %s; the current "
                "one can no longer serve. Upload its public chain (mtls-sidecar cert "
                "export-public) to the X.509 certificate mapping in SuccessFactors",
                self.route.name,
                "the upstream refused it" if result.verdict == "rejected" else "it is untested",
                result.message,
            )
            self.apply(loaded, ssl_context=context)
            return
        self._hold(loaded, target, result, reloaded=not retry)

    def _hold(
        self, loaded: Loaded, target: Target, result: ProbeResult, *, reloaded: bool = True
    ) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        before = self.pending
        same = before is not None and before.loaded.identity.chain == loaded.identity.chain
        self._settle(
            Pending(
                loaded=loaded,
                target=target,
                since=before.since if before is not None and same else now,
                result=result,
                probed_at=now,
                next_probe=time.monotonic() + self.pending_retry,
            )
        )
        if reloaded:  # a load that succeeded (a retry of the same one loads nothing)
            self.last_error = None
            self.retry_soon = False
            self.stats.reloaded(True, None, None)
        if same and before is not None and before.result.verdict == result.verdict:
            log.debug("route %s: the renewed client certificate is still pending: %s",
                      self.route.name, result.message)  # fmt: skip
            return
        leaf = loaded.identity.leaf
        current = self.client.current
        assert current is not None
        what = (
            f"the renewed client certificate ({leaf.subject.rfc4514_string()}, expires "
            f"{leaf.not_valid_after_utc.date()}) "
        )
        if result.verdict == "rejected":
            log.warning(
                "route %s: %swas refused by the upstream: %s. Keeping the current one (expires "
                "%s). Upload the new certificate's public chain (mtls-sidecar cert export-public "
                "FILE) to the X.509 certificate mapping in SuccessFactors Security Center; the "
                "sidecar tries it again every %gs and switches by itself once it is accepted",
                self.route.name, what, result.message, current.not_after.date(),
                self.pending_retry,
            )  # fmt: skip
        else:
            log.warning(
                "route %s: %scould not be tested: %s. Keeping the current one; trying again "
                "in %gs",
                self.route.name, what, result.message, self.pending_retry,
            )  # fmt: skip

    def _settle(self, pending: Pending | None) -> None:
        self.pending = pending
        self.stats.set_pending(pending is not None)

    def pending_due(self) -> float | None:
        """Seconds until the pending identity's next probe (None: nothing pending)."""
        if self.pending is None:
            return None
        return max(0.0, self.pending.next_probe - time.monotonic())

    async def retry_pending(self) -> None:
        """Probe the pending identity again (switching to it once accepted).

        A retry that cannot even be made (``tls.ca_file`` unreadable meanwhile) is a
        failed reload, tried again after ``pending_retry``: it must not end the refresh
        loop that calls it, nor make it spin."""
        pending = self.pending
        if pending is None:
            return
        pending.next_probe = time.monotonic() + self.pending_retry
        try:
            await self.offer(pending.loaded, retry=True)
        except SidecarError as exc:
            self.failed(exc)


def readiness(runtime: RouteRuntime, now: dt.datetime | None = None) -> str | None:
    """None when the route can serve, else the reason it cannot."""
    generation = runtime.client.current
    if generation is None:
        return runtime.last_error or "no client certificate loaded yet"
    not_after = generation.not_after
    if (now or dt.datetime.now(dt.UTC)) >= not_after:
        return f"the client certificate expired on {not_after:%Y-%m-%d %H:%M} UTC"
    return None


def route_status(rt: RouteRuntime) -> dict[str, object]:
    """One route's entry in ``/-/status``: public facts and counters, never a secret."""
    generation = rt.client.current
    entry: dict[str, object] = {
        "name": rt.route.name,
        "listen": rt.bound_address,
        "upstream": str(generation.target.upstream) if generation else rt.route.upstream,
        "company_id": generation.target.company_id if generation else rt.route.company_id,
        "credential_source": rt.source.description,
        "ready": readiness(rt) is None,
        "not_ready_reason": readiness(rt),
    }
    if generation is not None:
        summary = identity_summary(generation.identity)
        entry.update(
            subject=summary["subject"],
            issuer=summary["issuer"],
            not_after=summary["not_after"],
            days_left=summary["days_left"],
            sha256=summary["sha256"],
            loaded_at=generation.loaded_at.isoformat(timespec="seconds"),
        )
    s = rt.stats
    entry["last_refresh"] = s.last_reload or None
    entry["counters"] = {"requests": s.requests, "upstream_errors": s.upstream_errors}
    entry["pending"] = rt.pending.status() if rt.pending is not None else None
    # The upstream session: counts and ages (the current identity's), never a value.
    entry["session"] = {
        "reuse": rt.route.session.reuse,
        "csrf": rt.route.session.csrf,
        **(generation.session.status() if generation is not None else {}),
        "sessions_opened": s.sessions,
        "csrf_fetches": s.csrf_fetches,
        "throttled": s.throttled,
    }
    entry["last_upstream_error"] = (
        {"at": s.last_upstream_error.at, "message": s.last_upstream_error.message}
        if s.last_upstream_error
        else None
    )
    return entry


def source_for(
    route: RouteConfig, index: int, env: Mapping[str, str] | None = None
) -> CredentialSource:
    """The credential source a route's config describes."""
    where = f"routes[{index}].credentials"
    if route.credentials.destination is not None:
        # imported here: it loads aiohttp's client, which file-only routes never need
        from sidecar.credentials.destination_source import DestinationSource

        return DestinationSource(route.credentials, where=where, env=env)
    return FileSource(route.credentials, where=where, env=env)
