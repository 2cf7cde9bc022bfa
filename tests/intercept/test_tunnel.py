"""Tests of sidecar.intercept.tunnel: a CONNECT's target and proxy credentials."""

from __future__ import annotations

import base64

import pytest

from sidecar.intercept.names import UpstreamName
from sidecar.intercept.tunnel import connect_target, proxy_password


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("api.example.com:443", UpstreamName("api.example.com", 443)),
        ("API.Example.com:8443", UpstreamName("api.example.com", 8443)),
        ("127.0.0.1:443", UpstreamName("127.0.0.1", 443)),
        ("[::1]:9443", UpstreamName("::1", 9443)),
        ("api.example.com", None),  # the port is required
        ("api.example.com:", None),
        ("api.example.com:0", None),
        ("api.example.com:65536", None),
        ("api.example.com:+443", None),
        ("api.example.com:４４３", None),  # non-ASCII digits
        (":443", None),
        ("::1:443", None),
        ("[::1]", None),
        ("[::1:443", None),
        ("/path", None),
        ("", None),
    ],
)
def test_connect_target(authority: str, expected: UpstreamName | None) -> None:
    assert connect_target(authority) == expected


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_proxy_password() -> None:
    assert proxy_password(basic("user:s3cret:with:colons")) == "s3cret:with:colons"
    assert proxy_password(basic(":token")) == "token"
    assert proxy_password("basic " + basic("u:t")[6:]) == "t"
    assert proxy_password(basic("no colon")) is None
    assert proxy_password("Bearer abc") is None
    assert proxy_password("Basic !!!") is None
    assert proxy_password("Basic " + base64.b64encode(b"u:\xff").decode()) is None
    assert proxy_password(None) is None and proxy_password("") is None
