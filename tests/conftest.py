"""Shared fixtures: a throwaway PKI made once per test session.

Every certificate and key is generated here with `cryptography`; the
repository holds no key material.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import os
import shutil
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import (
    Config,
    CredentialsConfig,
    ListenAddress,
    RouteConfig,
    SessionConfig,
    TLSConfig,
    parse_upstream,
)
from sidecar.demo.app import FakeUpstream, demo_config, fake_successfactors
from sidecar.demo.pki import CA, Issued
from sidecar.forward.listener import bound_port
from sidecar.server import Sidecar

ROOT = Path(__file__).resolve().parents[1]


def missing_tool(reason: str, *, ci_installs_it: bool = True) -> NoReturn:
    """Skip a test for want of a tool; fail instead under CI (``CI=true``) if CI installs it.

    .ci/run installs every tool it can, so one missing there is a broken install
    that a skip would hide.
    """
    if ci_installs_it and os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run must install it)", pytrace=False)
    pytest.skip(reason)


LOCAL_NEWMAN = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "newman"


def newman_runner(local: Path = LOCAL_NEWMAN) -> str:
    """Postman's CLI runner: .ci/run's install in .ci/node, else one on PATH.

    Missing, a test needing it is skipped, except under CI with npm present:
    then .ci/run's `npm install` of newman failed, and the test fails.
    """
    found = str(local) if local.exists() else shutil.which("newman")
    if found is None:
        missing_tool(
            "newman (Postman's CLI runner) is not installed: needs Node.js; .ci/run installs "
            "it with `npm install --prefix .ci/node newman@6`",
            ci_installs_it=shutil.which("npm") is not None,
        )
    return found


@pytest.fixture
def newman() -> str:
    return newman_runner()


# ------------------------------------------------------------ event loops

# The modules that drive requests through the forwarding path (listener, handler,
# rewriting, pool, failures, TLS session reuse) run on both loops: asyncio, which
# macOS and Windows get, and uvloop, which the image and `run` use when installed
# (cli.py). The other modules run on asyncio only, which keeps the suite's time down.
BOTH_LOOPS = frozenset(
    {
        "forward/test_proxy",
        "forward/test_upstream_errors",
        "forward/test_rewrite_proxy",
        "forward/test_session",
        "forward/test_intercept",
        "test_hardening",
        "credentials/test_tls_sessions",
        "test_event_loops",  # checks that the loop named in a test id is the one running
    }
)


def _uvloop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        missing_tool("uvloop is not installed: `pip install -e '.[test]'` installs it")
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The event loops an async test runs on; the name shows in its id, e.g. ``[uvloop]``."""
    module = item.path.resolve().relative_to(ROOT / "tests").with_suffix("").as_posix()
    if module in BOTH_LOOPS and sys.platform != "win32":
        return {"asyncio": asyncio.new_event_loop, "uvloop": _uvloop}
    return {"asyncio": asyncio.new_event_loop}


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
        return f"https://localhost:{bound_port(site)}"

    yield start
    for r in runners:
        await r.cleanup()


#: for tests that count what reaches the upstream: no CSRF token fetch before a write
#: (the session's own requests are tested in tests/forward/test_session.py)
NO_CSRF = SessionConfig(csrf=False)


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


async def eventually(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]],
    *,
    within: float,
    what: str,
    every: float = 0.05,
) -> bool:
    """Poll ``check`` (sync or async) every ``every`` s, without blocking the loop,
    until it is true; fail with ``what`` after ``within`` s. The one ``eventually``
    of the suite; returns True, so ``assert await eventually(...)`` reads as it runs."""
    deadline = asyncio.get_running_loop().time() + within

    async def holds() -> bool:
        result = check()
        return bool(await result) if inspect.isawaitable(result) else bool(result)

    while not await holds():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(every)
    return True


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
