"""Which HTTP headers the sidecar forwards, and which a route may set (RFC 9110, 9112).

One place for the rules that the config reader, the route target and the
proxy all apply, so a header refused in a config file is refused the same
way when a destination supplies it.
"""

from __future__ import annotations

import re

#: SuccessFactors' company id, set from the route's ``company_id``
COMPANY_ID_HEADER = "successfactors-companyid"
#: the inbound token a client sends when the route has ``inbound.token_env``; never forwarded
TOKEN_HEADER = "X-Sidecar-Token"
#: a request id the client may send; echoed back and logged, never forwarded
REQUEST_ID_HEADER = "X-Request-ID"
#: RFC 9110 field name (a token)
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: connection-level headers: never forwarded either way
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: headers that frame a message: the sidecar sets them itself, a route may not
FRAMING = HOP_BY_HOP | {"content-length"}
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # in a field value (a tab is fine)


def header_problem(name: str, value: str) -> str | None:
    """Why a route (or its destination) may not set ``name: value``; None if it may."""
    if not HEADER_NAME.match(name):
        return "is not a valid HTTP header name"
    if name.lower() in FRAMING:
        return "cannot be set: the sidecar frames each request itself"
    if _CONTROL.search(value):
        return "has a line break or control character in its value"
    return None
