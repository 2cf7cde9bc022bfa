"""What a CONNECT request asks for, read strictly: its target and its proxy credentials.

Pure functions on header and request-line text; `sidecar.forward.handler`
decides with them whether interception serves a CONNECT, and
`sidecar.forward.listener` opens the tunnel.
"""

from __future__ import annotations

import base64
import binascii

from sidecar.intercept.names import UpstreamName


def connect_target(authority: str) -> UpstreamName | None:
    """``host:port`` or ``[v6]:port`` of a CONNECT (RFC 9110 9.3.6: the port is required),
    or None when it is anything else."""
    if authority.startswith("["):
        host, closed, rest = authority[1:].partition("]")
        if not closed or not rest.startswith(":"):
            return None
        port = rest[1:]
    else:
        host, colon, port = authority.rpartition(":")
        if not colon or ":" in host:
            return None
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return UpstreamName(host.lower(), int(port))


def proxy_password(value: str | None) -> str | None:
    """The password of ``Proxy-Authorization: Basic base64(user:password)``, else None.

    What clients send for a proxy URL like ``http://user:TOKEN@127.0.0.1:8080``.
    """
    if not value:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon else None
