"""``check --probe``: one real mTLS request to a route's upstream.

It tells apart the three answers a user needs: the server accepted the
client certificate; it refused it (TLS alert, or 401/403 from the API); or
it could not be reached at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from sidecar.config import RouteConfig
from sidecar.identity import ClientIdentity, client_ssl_context
from sidecar.upstream import COMPANY_ID_HEADER
from sidecar.upstream_errors import CLIENT_CERTIFICATE_REJECTED, classify


@dataclass(frozen=True)
class ProbeResult:
    accepted: bool
    handshake: str  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", or why it failed
    status: int | None
    message: str


async def probe(route: RouteConfig, identity: ClientIdentity) -> ProbeResult:
    assert route.upstream is not None
    url = f"{route.upstream}/"
    headers = dict(route.headers)
    if route.company_id:
        headers[COMPANY_ID_HEADER] = route.company_id
    ctx = client_ssl_context(identity, ca_file=route.tls.ca_file)
    timeout = aiohttp.ClientTimeout(sock_connect=route.timeouts.connect, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        try:
            async with session.get(
                url,
                ssl=ctx,
                headers=headers,
                allow_redirects=False,
                server_hostname=route.tls.server_name,
            ) as resp:
                await resp.read()
                status = resp.status
        except Exception as exc:
            fail = classify(exc, upstream=str(route.upstream))
            rejected = fail.code == CLIENT_CERTIFICATE_REJECTED
            return ProbeResult(
                accepted=False,
                handshake="rejected by the server" if rejected else "failed",
                status=None,
                message=f"{fail.message} (hint: {fail.hint})",
            )
    handshake = "completed"
    ssl_object = ctx.last_connection(route.tls.server_name or route.upstream.host)
    if ssl_object is not None and ssl_object.version():
        cipher = ssl_object.cipher()
        handshake = f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()
    if status in (401, 403):
        return ProbeResult(
            accepted=False,
            handshake=handshake,
            status=status,
            message=f"the TLS handshake succeeded but {url} answered {status}: check the "
            "company id and the X.509 certificate mapping (login name) in SuccessFactors "
            "Security Center",
        )
    return ProbeResult(
        accepted=True,
        handshake=handshake,
        status=status,
        message="the server accepted the client certificate",
    )
