"""Interception on a route's listener: ``/-/intercept.pem``, CONNECT, TLS inside the tunnel.

Each test starts the sidecar in front of the demo's fake SuccessFactors
(sidecar.demo.app.fake_successfactors, over real mTLS) with interception on
and its certificate kept in the test's folder. Clients verify that
certificate: nothing here turns verification off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sidecar.config import InboundConfig, InterceptConfig, RouteConfig
from sidecar.demo.app import FakeUpstream, demo_config, fake_successfactors
from sidecar.intercept.certificate import route_certificates
from tests.conftest import Running
from tests.support.answers import assert_sidecar_error, fetch

TOKEN = "i" * 32


@dataclass
class Intercepting:
    running: Running
    route: RouteConfig
    upstream: FakeUpstream

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])

    @property
    def cert_file(self) -> Path:
        return route_certificates(self.route, 0).current().cert_path


@pytest.fixture
async def fake_sf(tmp_path: Path) -> AsyncIterator[FakeUpstream]:
    async with fake_successfactors(tmp_path / "sf") as upstream:
        yield upstream


@pytest.fixture
def intercepting(
    fake_sf: FakeUpstream, start_sidecar: Any, tmp_path: Path
) -> Callable[..., Awaitable[Intercepting]]:
    """``await intercepting(enabled=True, token=False, **route_overrides)``."""

    async def start(*, enabled: bool = True, token: bool = False, **overrides: Any) -> Intercepting:
        (demo_route,) = demo_config(fake_sf, 0).routes
        if token:
            overrides["inbound"] = InboundConfig(token_env="SIDECAR_TEST_TOKEN")
        route = dataclasses.replace(
            demo_route,
            name="sf",
            intercept=InterceptConfig(enabled=enabled, cert_dir=tmp_path / "state"),
            **overrides,
        )
        env = {"SIDECAR_TEST_TOKEN": TOKEN} if token else {}
        running = await start_sidecar(route, env=env)
        return Intercepting(running, route, fake_sf)

    return start


# ------------------------------------------------------------ /-/intercept.pem


async def test_intercept_pem_is_the_certificate_without_a_token(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting(token=True)
    answer = await fetch(f"{setup.url}/-/intercept.pem")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/x-pem-file"
    assert answer.body == setup.cert_file.read_bytes()
    (cert,) = x509.load_pem_x509_certificates(answer.body)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert b"PRIVATE KEY" not in answer.body
    head = await fetch(f"{setup.url}/-/intercept.pem", "HEAD")
    assert head.status == 200 and head.body == b""
    # status still needs the token
    assert_sidecar_error(await fetch(f"{setup.url}/-/status"), "inbound_auth_required")


async def test_intercept_pem_is_404_when_interception_is_off(
    intercepting: Callable[..., Awaitable[Intercepting]],
) -> None:
    setup = await intercepting(enabled=False)
    error = assert_sidecar_error(await fetch(f"{setup.url}/-/intercept.pem"), "not_found")
    assert "interception is off for route sf" in error["message"]
    assert "intercept" in error["hint"]
    assert setup.route.intercept.cert_dir is not None
    assert not setup.route.intercept.cert_dir.exists()  # nothing made when off
