"""The SAP BTP Destination Service as a `CredentialSource`.

The binding is found on first use (service key, VCAP_SERVICES or a
Kubernetes service binding); the destination is then fetched at start and
every ``refresh``. Its keystore becomes the client identity, its URL the
upstream and its ``URL.headers.*`` / ``URL.queries.*`` the route's headers
and query parameters (values in the route config win, see sidecar.forward.upstream).
A service that is down raises `DestinationUnavailable` (transient: the
server backs off and retries); anything else is permanent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sidecar.config import CredentialsConfig, DestinationRef, parse_upstream
from sidecar.credentials.destination import DestinationClient, discover_binding
from sidecar.credentials.sources import Loaded
from sidecar.errors import DestinationError


class DestinationSource:
    """Fetches one destination again and again (with If-None-Match)."""

    def __init__(
        self, creds: CredentialsConfig, *, where: str, env: Mapping[str, str] | None = None
    ) -> None:
        assert creds.destination is not None
        self.ref: DestinationRef = creds.destination
        self.warn_before = creds.warn_before
        self.where = where
        self.env = os.environ if env is None else env
        self.poll_interval = self.ref.refresh
        self.description = f"destination {self.ref.name}"
        self._client: DestinationClient | None = None

    def _get_client(self) -> DestinationClient:
        if self._client is None:
            binding = discover_binding(self.ref, self.env)
            self.description = f"destination {self.ref.name} ({binding.source})"
            self._client = DestinationClient(binding)
        return self._client

    async def changed(self) -> bool:
        return True  # the service decides, through ETag / If-None-Match

    async def load(self) -> Loaded | None:
        result = await self._get_client().fetch(self.ref.name)
        if result.not_modified:
            return None
        destination = result.destination
        identity = destination.bundle().identity(warn_before=self.warn_before)
        upstream = None
        if destination.url:
            try:
                upstream = parse_upstream(destination.url)
            except ValueError as exc:
                raise DestinationError(
                    f"destination {destination.name}: its URL cannot be used: {exc}",
                    hint="set the destination's URL to the https:// API server, or set "
                    "upstream in the route",
                ) from None
        return Loaded(
            identity=identity,
            upstream=upstream,
            headers=dict(destination.headers),
            query=dict(destination.queries),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
