"""The upstream's own names: the only ``host:port`` pairs interception ever serves.

A route's upstream is reached under several names (DESIGN.md, "Rewriting"):
its host, the host's plain twin (the same name without its ``cert`` label),
and every ``rewrite_hosts`` entry. Scripts written against SuccessFactors use
any of them, so a CONNECT to any of them is served, and the interception
certificate names exactly these hosts, nothing else. The twin and the
``rewrite_hosts`` grammar are `sidecar.forward.rewrite`'s, so both features
always agree on what the upstream's names are.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sidecar.config import UpstreamURL
from sidecar.http_rules import host_and_port, plain_twin


@dataclass(frozen=True)
class UpstreamName:
    """One ``host:port`` a client may CONNECT to (host in lower case, IPv6 unbracketed)."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def upstream_names(
    upstream: UpstreamURL, rewrite_hosts: tuple[str, ...]
) -> tuple[UpstreamName, ...]:
    """The upstream host and its plain twin on the upstream's port, then each
    ``rewrite_hosts`` entry on its own port (443 unless it names one); no duplicates."""
    found = [UpstreamName(upstream.host.lower(), upstream.port)]
    twin = plain_twin(upstream.host)
    if twin is not None:
        found.append(UpstreamName(twin.lower(), upstream.port))
    for entry in rewrite_hosts:
        host, port = host_and_port(entry.strip())
        if host:
            found.append(UpstreamName(host.lower(), port))
    return tuple(dict.fromkeys(found))


def host_names(names: tuple[UpstreamName, ...]) -> tuple[str, ...]:
    """The distinct hosts of ``names``, in order: what the certificate vouches for."""
    return tuple(dict.fromkeys(n.host for n in names))
