"""Tests of sidecar.intercept.names: the only host:port pairs interception serves."""

from __future__ import annotations

from sidecar.config import parse_upstream
from sidecar.intercept.names import UpstreamName, host_names, upstream_names


def test_the_host_its_plain_twin_and_rewrite_hosts() -> None:
    names = upstream_names(
        parse_upstream("https://API10.cert.successfactors.com"),
        ("other.example.com", "alt.example.com:8443", "[::1]:9443", "API10.successfactors.com"),
    )
    assert names == (
        UpstreamName("api10.cert.successfactors.com", 443),
        UpstreamName("api10.successfactors.com", 443),
        UpstreamName("other.example.com", 443),
        UpstreamName("alt.example.com", 8443),
        UpstreamName("::1", 9443),
    )
    assert host_names(names) == (
        "api10.cert.successfactors.com",
        "api10.successfactors.com",
        "other.example.com",
        "alt.example.com",
        "::1",
    )
    assert str(names[-1]) == "[::1]:9443" and names[-1].is_ip and not names[0].is_ip


def test_the_twin_keeps_the_upstream_port_and_a_plain_host_has_none() -> None:
    names = upstream_names(parse_upstream("https://api.cert.example.com:8443/odata"), ())
    assert names == (
        UpstreamName("api.cert.example.com", 8443),
        UpstreamName("api.example.com", 8443),
    )
    assert upstream_names(parse_upstream("https://cert.example.com"), ()) == (
        UpstreamName("cert.example.com", 443),
    )
