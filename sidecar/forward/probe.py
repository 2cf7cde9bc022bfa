"""The probe: one real mTLS request to a route's upstream with an identity.

``check --probe`` and the switch to a renewed certificate (`sidecar.runtime`)
both ask it. It tells apart the three answers a user needs: the server
accepted the client certificate; it refused it (a TLS alert, a TLS 1.3
connection closed right after the handshake, or an HTTP answer
`failures.http_refusal` calls a refusal: 495/496, nginx's 400 pages, 401/403);
or it could not tell (the upstream unreachable, timed out, or untrusted):
*inconclusive*, which must never count as either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from multidict import CIMultiDict

from sidecar.config import RouteConfig
from sidecar.credentials.tls_sessions import ResumingContext
from sidecar.forward.failures import CLIENT_CERTIFICATE_REJECTED, classify, peek_refusal
from sidecar.forward.headers import merge_query
from sidecar.forward.upstream import Target, route_pool

Verdict = Literal["accepted", "rejected", "inconclusive"]


@dataclass(frozen=True)
class ProbeResult:
    verdict: Verdict
    handshake: str  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", or why it failed
    status: int | None
    message: str

    @property
    def accepted(self) -> bool:
        return self.verdict == "accepted"


async def probe(
    route: RouteConfig, ctx: ResumingContext, target: Target, *, timeout: float = 30.0
) -> ProbeResult:
    """GET ``credentials.probe_path`` as the proxy would send it (``route_target`` merged),
    on a connection of its own, each step (connect, read) bounded by ``timeout``."""
    upstream = target.upstream
    probe_path, _, probe_query = route.credentials.probe_path.partition("?")
    url = f"{upstream}{probe_path}"
    query = merge_query(probe_query, target.query)
    path = f"{upstream.path_prefix}{probe_path}" + (f"?{query}" if query else "")
    # The same client as the proxy's, so the probe tries what requests will do.
    pool = route_pool(
        route, target, ctx, connect_timeout=min(route.timeouts.connect, timeout),
        read_timeout=timeout, limit=1, keepalive=1,
    )  # fmt: skip
    try:
        response = await pool.request("GET", path, CIMultiDict(target.set_headers), None)
        try:
            status = response.status
            _, refusal = await peek_refusal(response, "GET")  # the rest is not needed
        finally:
            response.release()
    except Exception as exc:
        fail = classify(exc, upstream=str(upstream))
        rejected = fail.code == CLIENT_CERTIFICATE_REJECTED
        return ProbeResult(
            verdict="rejected" if rejected else "inconclusive",
            handshake="rejected by the server" if rejected else "failed",
            status=None,
            message=f"{fail.message} (hint: {fail.hint})",
        )
    finally:
        await pool.close()
    handshake = "completed"
    ssl_object = ctx.last_connection(route.tls.server_name or upstream.host)
    if ssl_object is not None and ssl_object.version():
        cipher = ssl_object.cipher()
        handshake = f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()
    if refusal is None:
        return ProbeResult(
            verdict="accepted",
            handshake=handshake,
            status=status,
            message="the server accepted the client certificate",
        )
    if refusal.certain:
        fail = refusal.failure(str(upstream))
        message = f"the TLS handshake succeeded but {fail.message} (hint: {fail.hint})"
    else:
        message = (
            f"the TLS handshake succeeded but {url} answered {status}: check the company id "
            "and the X.509 certificate mapping (login name) in SuccessFactors Security Center"
        )
    return ProbeResult(verdict="rejected", handshake=handshake, status=status, message=message)
