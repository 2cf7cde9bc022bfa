"""A route's live state, as the server drives it and the admin endpoints read it.

For now: choosing a route's credential source (`source_for`). It lives above
``sidecar.credentials`` so that the sources' protocol does not import the
Destination Service source that implements it.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.config import RouteConfig
from sidecar.credentials.sources import CredentialSource, FileSource


def source_for(
    route: RouteConfig, index: int, env: Mapping[str, str] | None = None
) -> CredentialSource:
    """The credential source a route's config describes."""
    where = f"routes[{index}].credentials"
    if route.credentials.destination is not None:
        # imported here: it loads aiohttp's client, which file-only routes never need
        from sidecar.credentials.destination_source import DestinationSource

        return DestinationSource(route.credentials, where=where, env=env)
    return FileSource(route.credentials, where=where, env=env)
