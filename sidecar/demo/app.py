"""``mtls-sidecar demo``: the whole product on a machine without an SAP account.

In one process: a throwaway PKI in a private temporary directory, the fake
SuccessFactors API (sidecar.demo.fake_sf) over TLS demanding a client certificate
from that PKI and mapping the demo's one, and the sidecar in front of it on
127.0.0.1. With ``renewal``, the demo then renews the client certificate under
the sidecar's feet, as the yearly renewal does, before anyone told the fake's
X.509 mapping: the sidecar keeps the current one and shows the new one as
pending until its chain is uploaded.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.config import (
    Config,
    CredentialsConfig,
    ListenAddress,
    RouteConfig,
    TLSConfig,
    UpstreamURL,
)
from sidecar.demo.fake_sf import FakeSuccessFactors, fake_successfactors_app
from sidecar.demo.pki import DemoPKI, RenewedClient, write_demo_pki, write_private
from sidecar.forward.listener import bound_port
from sidecar.server import Sidecar

DEMO_COMPANY_ID = "DEMO1234"
NEW_USER = '{"userId": "demo1", "firstName": "Hedy", "lastName": "Lamarr"}'


@dataclass(frozen=True)
class FakeUpstream:
    url: str
    port: int
    pki: DemoPKI
    state: FakeSuccessFactors  # sessions opened, requests seen, users; expire_tokens()


def server_context(pki: DemoPKI) -> ssl.SSLContext:
    """The fake API's TLS: its own certificate, client certificates required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@asynccontextmanager
async def fake_successfactors(
    directory: Path, *, company_id: str = DEMO_COMPANY_ID, users: int = 45
) -> AsyncIterator[FakeUpstream]:
    """Serve the fake SuccessFactors API on 127.0.0.1 with a PKI made in ``directory``."""
    pki = write_demo_pki(directory)
    state = FakeSuccessFactors(users=users)
    client = x509.load_pem_x509_certificate(pki.client_chain.read_bytes())
    state.map_certificate(client.public_bytes(Encoding.DER))  # as done in Security Center
    runner = web.AppRunner(fake_successfactors_app(company_id=company_id, state=state))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki))
    await site.start()
    port = bound_port(site)
    try:
        yield FakeUpstream(url=f"https://localhost:{port}", port=port, pki=pki, state=state)
    finally:
        await runner.cleanup()


def demo_config(upstream: FakeUpstream, port: int) -> Config:
    route = RouteConfig(
        name="demo",
        listen=ListenAddress("127.0.0.1", port),
        upstream=UpstreamURL(host="localhost", port=upstream.port),
        company_id=DEMO_COMPANY_ID,
        credentials=CredentialsConfig(pem=upstream.pki.client_bundle),
        tls=TLSConfig(ca_file=upstream.pki.ca_file),
    )
    return Config(routes=(route,))


def renew_under_the_sidecar(upstream: FakeUpstream) -> RenewedClient:
    """Renew the client certificate and put it where the sidecar reads its bundle, in one
    atomic replace (as a renewal dropped in place does); the fake does not map it yet."""
    renewed = upstream.pki.renew_client()
    write_private(upstream.pki.client_bundle, renewed.bundle.read_bytes())
    return renewed


def renewal_steps(local: str, upstream: FakeUpstream, renewed: RenewedClient) -> str:
    return (
        "Renewal: a renewed client certificate (same subject, new key) now replaces the\n"
        f"sidecar's bundle, {upstream.pki.client_bundle}.\n"
        "The fake SuccessFactors does not accept it yet, so the sidecar keeps the current\n"
        "one and shows the new one as pending:\n"
        f"  curl '{local}/-/status'    # the route's \"pending\": new certificate, last probe\n"
        "Upload its public chain to the fake's X.509 mapping (the sidecar forwards /fake/):\n"
        f"  curl -X POST --data-binary @{renewed.chain} '{local}/fake/x509-mapping'\n"
        f"  curl '{local}/fake/x509-mapping'   # the mapped certificates\n"
        'Then watch /-/status: within a minute "pending" is null and the route\'s\n'
        "fingerprint is the new one; requests keep working all along.\n\n"
    )


async def run_demo(port: int, say: Callable[[str], None], renewal: bool = False) -> None:
    """Run the fake API and the sidecar until SIGINT or SIGTERM; with ``renewal``, a
    renewed client certificate the fake does not accept yet replaces the sidecar's."""
    directory = Path(tempfile.mkdtemp(prefix="mtls-sidecar-demo-"))  # mode 0700
    try:
        async with fake_successfactors(directory) as upstream:
            sidecar = Sidecar(demo_config(upstream, port))
            await sidecar.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, sidecar.request_stop)
            local = f"http://{sidecar.bound_address(sidecar.routes[0])}"
            steps = ""
            if renewal:
                steps = renewal_steps(local, upstream, renew_under_the_sidecar(upstream))
            say(
                f"Fake SuccessFactors API (demands a client certificate): {upstream.url}\n"
                f"mtls-sidecar listening on {local} (company id {DEMO_COMPANY_ID})\n\n"
                "Try, in another terminal:\n"
                f"  curl '{local}/odata/v2/User?$top=3'\n"
                f"  curl '{local}/odata/v2/User'            # 20 per page, follow __next\n"
                f"  curl '{local}/odata/v2/$metadata'\n"
                f"  curl '{local}/-/ready'\n\n"
                "Create a user with a POST: no CSRF token, no cookie (the sidecar keeps both):\n"
                f"  curl '{local}/odata/v2/User' -H 'Content-Type: application/json' \\\n"
                f"       -d '{NEW_USER}'\n"
                f"  curl \"{local}/odata/v2/User('demo1')\"\n"
                f"  curl '{local}/fake/sessions'          # login sessions the fake opened\n\n"
                f"{steps}"
                "Press Ctrl-C to stop."
            )
            try:
                await sidecar.wait()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
                await sidecar.close()
                say(
                    f"The fake SuccessFactors opened {upstream.state.sessions_opened} "
                    f"session(s) for {upstream.state.requests_served} request(s)."
                )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
