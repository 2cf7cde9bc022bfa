"""XSUAA access tokens for the Destination Service (OAuth client credentials).

A client secret goes as HTTP Basic; an X.509 binding's certificate and key go as
the TLS client identity towards XSUAA's ``certurl``. Tokens are cached until
shortly before they expire; a refused token can be forgotten and asked anew.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp

from sidecar.credentials import identity
from sidecar.credentials.destination.binding import Binding
from sidecar.credentials.destination.replies import error_detail, json_body, read_body, unavailable
from sidecar.errors import DestinationError, DestinationUnavailable

TOKEN_MARGIN = 60.0  # seconds before expires_in a token counts as expired (at most)
DEFAULT_TOKEN_LIFETIME = 300.0  # when a token response has no expires_in


class Tokens:
    """The access token of one binding, fetched through the session ``session()`` gives."""

    def __init__(
        self,
        binding: Binding,
        *,
        session: Callable[[], aiohttp.ClientSession],
        ca_file: Path | None,
        clock: Callable[[], float],
    ) -> None:
        self.binding = binding
        self._session = session
        self._ca_file = ca_file
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()

    async def get(self) -> str:
        """An access token for the Destination Service, cached until shortly before expiry."""
        async with self._token_lock:
            now = self._clock()
            if self._token is not None and now < self._token_expires:
                return self._token
            token, lifetime = await self._request_token()
            self._token = token
            self._token_expires = now + lifetime - min(TOKEN_MARGIN, lifetime / 10)
            return token

    def forget(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def _request_token(self) -> tuple[str, float]:
        b = self.binding
        endpoint = b.token_endpoint
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json"}
        tls: ssl.SSLContext | None = None
        if b.uses_x509:
            form["client_id"] = b.client_id
            if endpoint.startswith("https:"):
                tls = self._mtls_context()
        else:
            # aiohttp.BasicAuth is deprecated and encode_basic_auth is too new (3.14).
            pair = f"{b.client_id}:{b.client_secret or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        what = f"XSUAA {endpoint}"
        session = self._session()
        try:
            async with session.post(
                endpoint,
                data=form,
                headers=headers,
                allow_redirects=False,
                ssl=tls if tls is not None else True,  # True: the session's context
            ) as resp:
                status, body = resp.status, await read_body(resp, what)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise unavailable(what, exc) from exc
        if status == 200:
            data = json_body(body, what)
            token = data.get("access_token")
            if not isinstance(token, str) or not token:
                raise DestinationError(f"{what}: the token response has no access_token")
            expires = data.get("expires_in")
            lifetime = (
                float(expires)
                if isinstance(expires, int | float) and expires > 0
                else DEFAULT_TOKEN_LIFETIME
            )
            return token, lifetime
        detail = self.scrub(error_detail(body))
        if status in (400, 401, 403):
            how = "client certificate" if b.uses_x509 else "client id and secret"
            raise DestinationError(
                f"{what} refused the {how} of {b.source} (HTTP {status}{detail})",
                hint="the service key may have been deleted or renewed: create a new service "
                "key (or rebind) and use its JSON",
            )
        if status in (408, 429) or status >= 500:
            raise DestinationUnavailable(f"{what}: HTTP {status}{detail}")
        raise DestinationError(f"{what}: unexpected answer HTTP {status}{detail}")

    def _mtls_context(self) -> ssl.SSLContext:
        # Built for each token request (a few a day), so an expired binding
        # certificate is reported as such rather than as XSUAA's refusal.
        b = self.binding
        assert b.certificate is not None and b.key is not None
        bundle = identity.read_bundle_bytes(
            (b.certificate + "\n" + b.key).encode(), source=f"{b.source}: certificate and key"
        )
        return identity.client_ssl_context(bundle.identity(), ca_file=self._ca_file)

    def scrub(self, text: str) -> str:
        """``text`` without any secret we hold (a server might echo what we sent)."""
        for secret in (self.binding.client_secret, self._token):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text
