"""Shared fixtures: a throwaway PKI made once per test session.

Every certificate and key is generated here with `cryptography`; the
repository holds no key material.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import (
    Config,
    CredentialsConfig,
    ListenAddress,
    RouteConfig,
    TLSConfig,
    parse_upstream,
)
from sidecar.demo import FakeUpstream, demo_config, fake_successfactors
from sidecar.pki import CA, Issued
from sidecar.server import Sidecar


@dataclass(frozen=True)
class PKI:
    root: CA
    intermediate: CA
    server: Issued  # for localhost, 127.0.0.1 and ::1, issued by root
    client: Issued  # clientAuth leaf issued by the intermediate (BTP-like chain)
    other_ca: CA  # a CA that neither side trusts

    def server_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        """A server context trusting the root (which signed the intermediate)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_chain(ctx, self.server)
        ctx.load_verify_locations(cadata=self.root.cert_pem().decode())
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return ctx


def load_chain(ctx: ssl.SSLContext, issued: Issued, directory: Path | None = None) -> None:
    """Load a test certificate and key into a server context (test keys may touch disk)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cert = Path(d) / "cert.pem"
        key = Path(d) / "key.pem"
        cert.write_bytes(issued.chain_pem())
        key.write_bytes(issued.key_pem())
        ctx.load_cert_chain(cert, key)


def key_material(issued: Issued, *pems: bytes) -> list[str]:
    """Strings whose presence in any output would leak ``issued``'s private key.

    The base64 lines of its PEM forms (and of ``pems``, e.g. an encrypted export),
    the hex of its DER, and the PEM marker itself.
    """
    found = ["PRIVATE KEY"]
    for pem in (issued.key_pem(), issued.key_pem(legacy=True), *pems):
        in_key = False
        for line in pem.decode().splitlines():
            if line.startswith("-----BEGIN"):
                in_key = "PRIVATE KEY" in line
            elif in_key and not line.startswith("-----") and len(line) >= 16:
                found.append(line)
    der = base64.b64decode("".join(issued.key_pem().decode().splitlines()[1:-1]))
    found.append(der.hex())
    return found


@pytest.fixture(scope="session")
def pki() -> PKI:
    root = CA.create()
    inter = root.intermediate()
    return PKI(
        root=root,
        intermediate=inter,
        server=root.server("localhost", "127.0.0.1", "::1"),
        client=inter.client(),
        other_ca=CA.create("some other CA"),
    )


@pytest.fixture
def ca_file(pki: PKI, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(pki.root.cert_pem())
    return path


@pytest.fixture
def bundle_file(pki: PKI, tmp_path: Path) -> Path:
    """The BTP export: key, leaf, intermediate, root, mode 0600."""
    path = tmp_path / "client-bundle.pem"
    path.write_bytes(pki.client.btp_bundle())
    path.chmod(0o600)
    return path


# ------------------------------------------------------------ servers on loopback


@dataclass
class Running:
    """A started sidecar: its base URL and the object, for inspection."""

    url: str
    sidecar: Sidecar


@pytest.fixture
async def tls_upstream(pki: PKI) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start an aiohttp app over TLS on 127.0.0.1; returns its https://localhost:PORT URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, *, require_client_cert: bool = True) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        ctx = pki.server_context(require_client_cert=require_client_cert)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        runners.append(runner)
        server = site._server
        assert isinstance(server, asyncio.Server)
        return f"https://localhost:{server.sockets[0].getsockname()[1]}"

    yield start
    for r in runners:
        await r.cleanup()


def route_config(
    upstream: str, bundle: Path, ca: Path, *, name: str = "test", **overrides: Any
) -> RouteConfig:
    """A route on 127.0.0.1:0 to ``upstream`` presenting ``bundle``."""
    fields: dict[str, Any] = {
        "name": name,
        "listen": ListenAddress("127.0.0.1", 0),
        "upstream": parse_upstream(upstream),
        "company_id": "ACME1234",
        "credentials": CredentialsConfig(pem=bundle),
        "tls": TLSConfig(ca_file=ca),
    }
    fields.update(overrides)
    return RouteConfig(**fields)


@pytest.fixture
async def start_sidecar() -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Start a sidecar for some routes in this test's event loop; closed afterwards."""
    started: list[Sidecar] = []

    async def start(*routes: RouteConfig, env: dict[str, str] | None = None) -> Running:
        sidecar = Sidecar(Config(routes=tuple(routes)), env=env or {})
        await sidecar.start()
        started.append(sidecar)
        return Running(f"http://{sidecar.bound_address(sidecar.routes[0])}", sidecar)

    yield start
    for s in started:
        await s.close()


def write_private(path: Path, data: bytes) -> None:
    """Write key material as a user should keep it: mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)


def sidecar_env() -> dict[str, str]:
    """This environment without SIDECAR_* variables, unbuffered: for sidecar processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client (modules that need other options define their own)."""
    async with aiohttp.ClientSession() as session:
        yield session


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (bound, noted, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Poll the async ``check`` until it is true; fail with ``what`` after ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Demo:
    upstream: FakeUpstream
    url: str  # the sidecar, http://127.0.0.1:PORT


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    """The demo (fake SuccessFactors and the sidecar) in this test's event loop."""
    async with fake_successfactors(tmp_path / "sf") as upstream:
        sidecar = Sidecar(demo_config(upstream, 0), env={})
        await sidecar.start()
        try:
            yield Demo(upstream, f"http://{sidecar.bound_address(sidecar.routes[0])}")
        finally:
            await sidecar.close()
