"""The HTTP header rulebook: which names, values and hosts are valid (RFC 9110, 9112).

Pure and at the bottom of the layering, so the config validator
(`sidecar.config.validate`) and the request path (`sidecar.forward.headers`,
which builds and filters the headers on this rulebook) apply the same rules: the
header names the sidecar reads or sets, the header-name, Host and request-id
grammars, the hop-by-hop and framing headers, the one control-character rule,
and what a route may set (`header_problem`).
"""

from __future__ import annotations

import re

#: SuccessFactors' company id, set from the route's ``company_id``
COMPANY_ID_HEADER = "successfactors-companyid"
#: the inbound token a client sends when the route has ``inbound.token_env``; never forwarded
TOKEN_HEADER = "X-Sidecar-Token"
#: a request id the client may send; echoed back and logged, never forwarded
REQUEST_ID_HEADER = "X-Request-ID"
#: SAP's CSRF token: ``Fetch`` asks for one, ``Required`` refuses a write without a valid one
CSRF_HEADER = "X-CSRF-Token"
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
#: a Host header value: a bracketed IP literal or a reg-name, and an optional port
HOST_VALUE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~!$&'()*+,;=%]+)(:[0-9]{1,5})?$")
#: a Host value safe to write into JSON and XML bodies as a link's origin (rewritten links):
#: `HOST_VALUE` without a reg-name's sub-delimiters and percent-encoding
ORIGIN_HOST_VALUE = re.compile(r"^(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
#: an X-Request-ID a client may send: visible ASCII, at most 200 characters
REQUEST_ID_VALUE = re.compile(r"^[\x21-\x7e]{1,200}$")
# The one control-character rule: none in a header, but a tab; CR and LF only end its line.
_CONTROL_CLASS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f"
#: a control character in a whole request head, whose lines CR LF end
CONTROL_IN_HEAD = re.compile(f"[{_CONTROL_CLASS}]")
_CONTROL = re.compile(rf"[{_CONTROL_CLASS}\r\n]")  # in a field value


def has_control(value: str) -> bool:
    """A line break or control character (not a tab) in a field value: never sent on."""
    return _CONTROL.search(value) is not None


def header_problem(name: str, value: str) -> str | None:
    """Why a route (or its destination) may not set ``name: value``; None if it may."""
    if not HEADER_NAME.match(name):
        return "is not a valid HTTP header name"
    if name.lower() in FRAMING:
        return "cannot be set: the sidecar frames each request itself"
    if has_control(value):
        return "has a line break or control character in its value"
    return None


def plain_twin(host: str) -> str | None:
    """The host name without its ``cert`` label, or None when it has none.

    ``api10.cert.successfactors.com`` → ``api10.successfactors.com``. Only a
    label with a name before it and a registrable domain (two labels) after it
    counts, so ``cert.example.com`` has no twin.
    """
    labels = host.split(".")
    for i, label in enumerate(labels):
        if label.lower() == "cert" and i > 0 and len(labels) - i - 1 >= 2:
            return ".".join(labels[:i] + labels[i + 1 :])
    return None


def host_and_port(entry: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    return host, int(port) if port.isdigit() else 443
