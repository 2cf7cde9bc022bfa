"""The SAP BTP Destination Service: binding discovery, OAuth token, destination lookup.

    DestinationRef + environment
        │ discover_binding()    service_key file → VCAP_SERVICES → $SERVICE_BINDING_ROOT
        ▼
    Binding                     uri, XSUAA url / certurl, client id, secret or X.509
        │ DestinationClient.token()      POST {url|certurl}/oauth/token, client credentials
        │ DestinationClient.fetch(name)  GET {uri}/destination-configuration/v1/destinations/{name}
        ▼
    FetchResult(Destination, not_modified, etag)
        │ Destination.bundle()  certificates[Name == KeyStoreLocation] → identity.read_bundle_bytes
        ▼
    identity.Bundle ──.identity()──▶ ClientIdentity   (the caller checks and uses it)

Discovery and parsing are pure; `DestinationClient` owns the only I/O (one
aiohttp session). Key material goes straight to `sidecar.identity`: the
binding's X.509 key becomes the token request's TLS context, the keystore
bytes become a `Bundle`; neither is logged, printed or put in a message.

The rooms, in that order: ``binding`` (discovery), ``token`` (XSUAA client
credentials), ``lookup`` (the destination fetch and its parsing), ``replies``
(reading the services' answers, shared by token and lookup).

Two kinds of failure, so the caller knows whether to retry:

    DestinationError           permanent: a wrong binding, a refused client, a
    │                          destination that does not exist or is not
    │                          ClientCertificateAuthentication
    └── DestinationUnavailable transient: connection errors, timeouts, 429 and
                               5xx answers — retry with backoff

A keystore or an X.509 binding that cannot be read raises
`sidecar.errors.CredentialError` (also permanent), as every bundle does.
"""

from sidecar.credentials.destination.binding import Binding, discover_binding
from sidecar.credentials.destination.lookup import (
    Destination,
    DestinationClient,
    FetchResult,
    describe,
)
from sidecar.errors import DestinationUnavailable

__all__ = [
    "Binding",
    "Destination",
    "DestinationClient",
    "DestinationUnavailable",
    "FetchResult",
    "describe",
    "discover_binding",
]
