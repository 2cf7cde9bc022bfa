"""The upstream session a route keeps for clients that keep none.

SuccessFactors opens a login session for every call without a session cookie,
and refuses a write without a CSRF token of its session (403 with
``X-CSRF-Token: Required``). For clients that keep neither (curl loops, shell
scripts), one `UpstreamSession` per identity holds:

- a cookie jar (aiohttp's `CookieJar`: RFC 6265 path and expiry rules), filled
  only from answers to requests it governs and sent only to the route's
  upstream. It belongs to one `Generation`: a new certificate is another login,
  so a rotation starts a new session;
- the CSRF token per service root, fetched once however many writes wait for
  it (single flight), and fetched again at most once per refused token.

Which requests it governs is `governs()`: those whose client sent neither
``Cookie`` nor ``Authorization``, or sent back only cookies this session handed
out (Postman and newman keep the cookies they see; those are still the
sidecar's session, not the client's own). The handler does the I/O (the token
fetch is its request); this module only decides and remembers. Values leave it
only in the headers it builds: status shows counts and ages.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import CookieJar
from multidict import CIMultiDictProxy
from yarl import URL

from sidecar.config import SessionConfig, UpstreamURL
from sidecar.http_rules import CSRF_HEADER

#: methods that change state: they carry the CSRF token
WRITES = frozenset({"POST", "PUT", "PATCH", "MERGE", "DELETE"})
#: a refused write is sent once more only if its body is at most this (kept in memory)
RETRY_BODY = 1024 * 1024
#: seconds before asking again an upstream whose answer to a fetch held no token
NO_TOKEN_AGAIN = 300.0
_HANDED_OUT = 8  # values per cookie name remembered as the sidecar's own
_ROOTS = 64  # service roots whose token is kept at most
_SERVICE_ROOT = re.compile(r"^.*?/odata/v2/", re.IGNORECASE)
# Names of cookies that carry a login session (JSESSIONID, SAP's MYSAPSSO2 and
# sap-usercontext, PHPSESSID, connect.sid, ...): a new value is a new session.
_SESSION_COOKIE = re.compile(r"sess|sid|sso|^sap-", re.IGNORECASE)


def service_root(path: str) -> str:
    """Where a write's CSRF token is fetched: SuccessFactors' ``/odata/v2/`` service
    root (behind any upstream prefix), else the path's parent (OData V4 services)."""
    match = _SERVICE_ROOT.match(path)
    if match:
        return match.group(0)
    return path[: path.rfind("/") + 1] or "/"


def refuses_token(status: int, headers: CIMultiDictProxy[str]) -> bool:
    """The upstream refused a write for want of a valid CSRF token."""
    return status == 403 and headers.get(CSRF_HEADER, "").strip().lower() == "required"


@dataclass
class _Token:
    value: str | None  # None: the upstream offered no token
    at: float  # time.monotonic() when fetched


class FetchFailed(Exception):
    """A token fetch got no usable answer (none, or a server error): not remembered,
    unlike an answer that offers no token, so the next write asks again."""


#: the token fetch: the token, None when the upstream offers none, or FetchFailed
Fetch = Callable[[], Awaitable[str | None]]


class UpstreamSession:
    """One identity's session cookies and CSRF tokens at its upstream."""

    def __init__(self, upstream: UpstreamURL, config: SessionConfig) -> None:
        self.reuse, self.csrf = config.reuse, config.csrf
        # Cookies are matched against the upstream's own URL, never the client's.
        self._url = URL.build(scheme="https", host=upstream.host, port=upstream.port)
        self._jar = CookieJar(unsafe=True, quote_cookie=False) if config.reuse else None
        self._ours: dict[str, deque[str]] = {}
        self._tokens: dict[str, _Token] = {}
        self._fetches: dict[str, asyncio.Task[str | None]] = {}
        self.opened_at: float | None = None  # monotonic time of the last session opened

    # ------------------------------------------------------------------ cookies

    def governs(self, headers: CIMultiDictProxy[str]) -> bool:
        """Whether a client's request uses this session (see the module's docstring)."""
        if "Authorization" in headers:
            return False
        sent = headers.getall("Cookie", ())
        if not sent:
            return True
        pairs = [pair for value in sent for pair in _pairs(value)]
        return bool(pairs) and all(value in self._ours.get(name, ()) for name, value in pairs)

    def cookie_header(self, path: str) -> str | None:
        """The ``Cookie`` value for a request to ``path`` (no query), or None."""
        if self._jar is None or not len(self._jar):  # the common case: no session yet
            return None
        cookies = self._jar.filter_cookies(self._url.with_path(path, encoded=True))
        return "; ".join(f"{m.key}={m.coded_value}" for m in cookies.values()) or None

    def inherit(self, old: UpstreamSession) -> None:
        """Know the cookies a previous identity's session handed out: a client that keeps
        and echoes them (Postman) is still on the sidecar's session, now a new one."""
        for name, values in old._ours.items():
            self._ours.setdefault(name, deque(maxlen=_HANDED_OUT)).extend(values)

    def store(self, set_cookie: Sequence[str], path: str) -> bool:
        """Keep the cookies an answer set; True when they open a new session.

        A new session is a cookie the jar did not hold before (a first answer, or
        the upstream replacing an expired session), or a session cookie (by its
        name) with another value. A load balancer's cookie that changes on every
        answer (AWSALB) is kept but opens nothing; a deletion opens nothing.
        """
        if self._jar is None or not set_cookie:
            return False
        url = self._url.with_path(path, encoded=True)
        before = {m.key: m.value for m in self._jar.filter_cookies(url).values()}
        self._jar.update_cookies_from_headers(list(set_cookie), url)
        opened = False
        for morsel in self._jar.filter_cookies(url).values():
            was = before.get(morsel.key)
            if was != morsel.value:
                values = self._ours.setdefault(morsel.key, deque(maxlen=_HANDED_OUT))
                values.append(morsel.coded_value)
                opened = opened or was is None or bool(_SESSION_COOKIE.search(morsel.key))
        if opened:
            self.opened_at = time.monotonic()
            # Tokens belong to the session they were fetched in.
            self._tokens.clear()
        return opened

    # ------------------------------------------------------------------ tokens

    async def token(self, root: str, fetch: Fetch) -> str | None:
        """The cached token for ``root``, else one fetched (once for all who wait)."""
        cached = self._tokens.get(root)
        if cached is not None and (
            cached.value is not None or time.monotonic() - cached.at < NO_TOKEN_AGAIN
        ):
            return cached.value
        return await self._fetched(root, fetch)

    async def fresh_token(self, root: str, refused: str | None, fetch: Fetch) -> str | None:
        """A token other than ``refused``: fetched anew unless another write already did,
        or the upstream said lately that it offers none (then None: nothing to resend with)."""
        cached = self._tokens.get(root)
        if cached is not None and (
            cached.value != refused
            or (cached.value is None and time.monotonic() - cached.at < NO_TOKEN_AGAIN)
        ):
            return cached.value
        if root not in self._fetches:
            self._tokens.pop(root, None)
        return await self._fetched(root, fetch)

    async def _fetched(self, root: str, fetch: Fetch) -> str | None:
        task = self._fetches.get(root)
        if task is None:
            # A task of its own: a waiting client that goes away cancels only its wait.
            task = self._fetches[root] = asyncio.ensure_future(self._fetch(root, fetch))
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _fetch(self, root: str, fetch: Fetch) -> str | None:
        try:
            value = await fetch()
        except FetchFailed:
            return None  # this write goes without; the next one asks again
        finally:
            del self._fetches[root]
        if len(self._tokens) >= _ROOTS and root not in self._tokens:
            self._tokens.pop(next(iter(self._tokens)))
        self._tokens[root] = _Token(value, time.monotonic())
        return value

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, object]:
        """Counts and ages for ``/-/status``: never a cookie or token value."""
        now = time.monotonic()
        tokens = [t for t in self._tokens.values() if t.value is not None]
        cookies = 0
        if self._jar is not None:
            self._jar.filter_cookies(self._url)  # drops the expired ones
            cookies = len(self._jar)
        return {
            "cookies": cookies,
            "session_age_seconds": None if self.opened_at is None else round(now - self.opened_at),
            "csrf_tokens": len(tokens),
            "csrf_token_age_seconds": min((round(now - t.at) for t in tokens), default=None),
        }


def _retrieve(task: asyncio.Task[str | None]) -> None:
    # Every waiter may have gone away: the fetch's failure is still retrieved.
    if not task.cancelled():
        task.exception()


def _pairs(cookie: str) -> list[tuple[str, str]]:
    """``a=1; b=2`` as name/value pairs, as a Cookie header sends them (RFC 6265 4.2.1)."""
    pairs = []
    for part in cookie.split(";"):
        name, eq, value = part.strip().partition("=")
        if name and eq:
            pairs.append((name, value))
    return pairs
