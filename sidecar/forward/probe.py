"""``check --probe``: one real mTLS request to a route's upstream.

It tells apart the three answers a user needs: the server accepted the
client certificate; it refused it (a TLS alert, a TLS 1.3 connection closed
right after the handshake, or an HTTP answer `failures.http_refusal`
calls a refusal: 495/496, nginx's 400 pages, 401/403); or it could not be
reached at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDict

from sidecar.config import RouteConfig
from sidecar.credentials.tls_sessions import ResumingContext
from sidecar.forward.failures import CLIENT_CERTIFICATE_REJECTED, classify, peek_refusal
from sidecar.forward.headers import merge_query
from sidecar.forward.upstream import Target, route_pool


@dataclass(frozen=True)
class ProbeResult:
    accepted: bool
    handshake: str  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", or why it failed
    status: int | None
    message: str


async def probe(route: RouteConfig, ctx: ResumingContext, target: Target) -> ProbeResult:
    """GET the upstream's root as the proxy would send it (``route_target`` merged)."""
    upstream = target.upstream
    url = f"{upstream}/"
    query = merge_query("", target.query)
    path = f"{upstream.path_prefix}/" + (f"?{query}" if query else "")
    # The same client as the proxy's, so the probe tries what requests will do.
    pool = route_pool(route, target, ctx, read_timeout=30, limit=1, keepalive=1)
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
            accepted=False,
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
            accepted=True,
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
    return ProbeResult(accepted=False, handshake=handshake, status=status, message=message)
