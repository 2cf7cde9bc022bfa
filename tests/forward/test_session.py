"""The upstream session the sidecar keeps for clients that keep none (DESIGN.md,
"SuccessFactors sessions and CSRF tokens").

End to end: real clients (aiohttp without a cookie jar, the ``curl`` binary,
``requests.Session``) through a real sidecar to the fake SuccessFactors over
real mTLS. The fake (`SF`) is the demo's, with a watch in front that records
what each request brought (its cookie and token) and every value the fake
handed out, and can stand in for a broken upstream (`SF.intercept`). Then the
pieces of sidecar.forward.session on their own: service roots, the jar's
path, host and expiry rules, which requests a session governs, the single
flight of token fetches.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import LimitsConfig, SessionConfig, Timeouts, UpstreamURL
from sidecar.credentials.sources import FileSource
from sidecar.demo.fake_sf import CSRF_REFUSAL, FakeSuccessFactors, fake_successfactors_app
from sidecar.forward import session as session_module
from sidecar.forward.session import UpstreamSession, refuses_token, service_root
from sidecar.telemetry.logs import JsonFormatter, TextFormatter, access_logger
from tests.conftest import PKI, Running, eventually, route_config
from tests.support.admin import admin_json, metric, route_status
from tests.support.answers import Answer, assert_sidecar_error, raw_exchange
from tests.support.upstreams import FakeUpstream, header_values

COMPANY = "ACME1234"  # route_config's company id
USERS = "/odata/v2/User"
ROOT = "/odata/v2/"


# ------------------------------------------------------------------ the fake, watched

Intercept = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


@dataclass(frozen=True)
class Seen:
    """One request as the fake received it."""

    method: str
    path: str  # with the query
    cookie: str | None
    token: str | None  # X-CSRF-Token as sent: "Fetch", a token, or None
    authorization: str | None


@dataclass
class SF:
    """The demo's fake SuccessFactors, and what it saw and handed out."""

    # The mapping is tested in tests/demo; here certificates rotate freely.
    state: FakeSuccessFactors = field(
        default_factory=lambda: FakeSuccessFactors(check_mapping=False)
    )
    seen: list[Seen] = field(default_factory=list)
    issued: set[str] = field(default_factory=set)  # cookie values and CSRF tokens
    intercept: Intercept | None = None  # answers instead of the fake when it returns one

    def app(self) -> web.Application:
        app = fake_successfactors_app(company_id=COMPANY, state=self.state)
        app.middlewares.insert(0, self._watch)
        return app

    @web.middleware
    async def _watch(self, request: web.Request, handler: Any) -> web.StreamResponse:
        h = request.headers
        self.seen.append(
            Seen(
                request.method,
                request.path_qs,
                h.get("Cookie"),
                h.get("X-CSRF-Token"),
                h.get("Authorization"),
            )
        )
        response = await self.intercept(request) if self.intercept is not None else None
        if response is None:
            response = await handler(request)
        self.issued.update(morsel.value for morsel in response.cookies.values())
        token = response.headers.get("X-CSRF-Token")
        if token is not None and token != "Required":
            self.issued.add(token)
        return response

    def writes(self, path: str = USERS) -> list[Seen]:
        return [s for s in self.seen if s.method != "GET" and s.path.startswith(path)]

    def fetches(self) -> list[Seen]:
        return [s for s in self.seen if s.token == "Fetch"]

    def session_ids(self) -> list[str | None]:
        """The JSESSIONID each request brought (None: none), in order."""
        return [_cookies(s.cookie).get("JSESSIONID") for s in self.seen]


def _cookies(header: str | None) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    jar.load(header or "")
    return {name: morsel.value for name, morsel in jar.items()}


@dataclass
class Setup:
    sf: SF
    upstream: str  # the fake, https://localhost:PORT
    running: Running
    bundle: Path
    ca: Path

    @property
    def url(self) -> str:
        return self.running.url

    async def session(self) -> dict[str, Any]:
        """The route's ``session`` block of ``/-/status``."""
        block: dict[str, Any] = (await route_status(self.url, "test"))["session"]
        return block


@pytest.fixture
async def serve(
    tls_upstream: Any, start_sidecar: Any, ca_file: Path, bundle_file: Path
) -> Callable[..., Awaitable[Setup]]:
    """``await serve(*more_routes, sf=SF(...), **route_overrides)`` → a sidecar in front of
    ``sf`` (a fresh `SF` by default)."""

    async def start(*more: Any, sf: SF | None = None, **overrides: Any) -> Setup:
        sf = sf if sf is not None else SF()
        upstream = await tls_upstream(sf.app())
        route = route_config(upstream, bundle_file, ca_file, **overrides)
        running = await start_sidecar(route, *more)
        return Setup(sf, upstream, running, bundle_file, ca_file)

    return start


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps no cookies, as curl and shell scripts do."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield http


async def send(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    async with http.request(method, url, **kwargs) as resp:
        return Answer(resp.status, CIMultiDict(resp.headers), await resp.read())


def user(user_id: str, **more: str) -> dict[str, str]:
    return {"userId": user_id, "firstName": "Hedy", "lastName": "Lamarr", **more}


def assert_csrf_refusal(answer: Answer) -> None:
    """The fake's 403 as the upstream sent it: status, header and text body."""
    assert answer.status == 403, answer
    assert answer.headers["X-CSRF-Token"] == "Required", answer
    assert answer.body.decode() == CSRF_REFUSAL, answer


@dataclass
class Logs:
    """The sidecar's log records at debug level, and how each format writes them."""

    records: list[logging.LogRecord]

    def text(self) -> str:
        formatter = TextFormatter()
        return "\n".join(formatter.format(r) for r in self.records)

    def json(self) -> str:
        formatter = JsonFormatter()
        return "\n".join(formatter.format(r) for r in self.records)

    def access(self, method: str, path: str) -> list[logging.LogRecord]:
        return [
            r
            for r in self.records
            if r.name == access_logger.name
            and getattr(r, "method", None) == method
            and str(getattr(r, "path", "")).startswith(path)
        ]


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.kept = records

    def emit(self, record: logging.LogRecord) -> None:
        self.kept.append(record)


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Every record of the ``sidecar`` loggers at debug level, access lines included."""
    sidecar_logger = logging.getLogger("sidecar")
    saved = (sidecar_logger.level, access_logger.disabled)
    kept: list[logging.LogRecord] = []
    handler = _Keep(kept)
    sidecar_logger.addHandler(handler)
    sidecar_logger.setLevel(logging.DEBUG)
    access_logger.disabled = False
    try:
        yield Logs(kept)
    finally:
        sidecar_logger.removeHandler(handler)
        sidecar_logger.setLevel(saved[0])
        access_logger.disabled = saved[1]


async def curl(*args: str) -> tuple[int, bytes]:
    """The real ``curl`` binary: (status, body). No cookie jar, no token: curl's defaults."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    body, _, code = out.rpartition(b"\n")
    return int(code), body


# ------------------------------------------------------------------ sessions


@pytest.mark.parametrize(("reuse", "sessions"), [(True, 1), (False, 100)])
async def test_cookie_less_gets_share_one_upstream_session(
    serve: Any, client: aiohttp.ClientSession, reuse: bool, sessions: int
) -> None:
    setup = await serve(session=SessionConfig(reuse=reuse))
    for i in range(100):
        answer = await send(client, "GET", f"{setup.url}{USERS}('u{i % 45 + 1:04d}')")
        assert answer.status == 200, answer
        # Set-Cookie still reaches the client, on the answer that opened the session.
        assert bool(answer.headers.getall("Set-Cookie", [])) == (i == 0 or not reuse)
    assert setup.sf.state.sessions_opened == sessions
    ids = setup.sf.session_ids()
    if reuse:
        assert ids[0] is None and len(set(ids[1:])) == 1 and ids[1] in setup.sf.issued
    else:
        assert ids == [None] * 100
    status = await setup.session()
    assert status["reuse"] is reuse
    assert status["sessions_opened"] == (1 if reuse else 0)
    assert status["cookies"] == (2 if reuse else 0)  # JSESSIONID and the route cookie
    assert await metric(setup.url, "sidecar_upstream_sessions_total", route="test") == (
        1 if reuse else 0
    )


def _direct_login(setup: Setup, pki: PKI, tmp: Path) -> tuple[requests.Session, dict[str, str]]:
    """A `requests.Session` that logged in at the fake itself: its cookies and token."""
    bundle = tmp / "own-client.pem"
    bundle.write_bytes(pki.client.btp_bundle())
    http = requests.Session()
    http.cert = str(bundle)
    answer = http.get(
        setup.upstream + ROOT,
        headers={"successfactors-companyid": COMPANY, "X-CSRF-Token": "Fetch"},
        verify=str(setup.ca),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    own = {c.name: c.value or "" for c in http.cookies}
    assert set(own) == {"JSESSIONID", "route"}
    http.cert = None
    # The same cookies for the sidecar's origin: the fake's are Secure, for localhost.
    http.cookies.clear()
    for name, value in own.items():
        http.cookies.set(name, value)
    http.headers["X-CSRF-Token"] = answer.headers["X-CSRF-Token"]
    return http, own


async def test_a_client_with_its_own_cookie_jar_keeps_its_own_session(
    serve: Any, pki: PKI, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    http, own = await asyncio.to_thread(_direct_login, setup, pki, tmp_path)
    assert setup.sf.state.sessions_opened == 1
    with http:
        got = await asyncio.to_thread(http.get, f"{setup.url}{USERS}('u0001')", timeout=10)
        assert got.status_code == 200, got.text
        made = await asyncio.to_thread(
            http.post, f"{setup.url}{USERS}", json=user("own1"), timeout=10
        )
        assert made.status_code == 201, made.text  # with its own token, in its own session
    assert "own1" in setup.sf.state.users
    through = setup.sf.seen[1:]
    assert [s.method for s in through] == ["GET", "POST"]
    assert all(_cookies(s.cookie) == own for s in through), through
    assert setup.sf.state.sessions_opened == 1  # its session went on; none opened for it
    assert not setup.sf.fetches()[1:]  # the sidecar fetched no token for it
    status = await setup.session()
    assert (status["cookies"], status["sessions_opened"], status["csrf_fetches"]) == (0, 0, 0)


async def test_set_cookie_to_a_client_with_its_own_cookie_never_enters_the_jar(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    # A cookie the fake does not know: it opens a session, and tells the client.
    answer = await send(
        client, "GET", f"{setup.url}{USERS}('u0001')", headers={"Cookie": "JSESSIONID=stale"}
    )
    assert answer.status == 200
    told = {SimpleCookie(line).popitem()[0] for line in answer.headers.getall("Set-Cookie")}
    assert told == {"JSESSIONID", "route"}
    assert setup.sf.state.sessions_opened == 1
    assert setup.sf.seen[-1].cookie == "JSESSIONID=stale"
    status = await setup.session()
    assert (status["cookies"], status["sessions_opened"]) == (0, 0)
    # The sidecar's own session is still to open, for the first client without cookies.
    assert (await send(client, "GET", f"{setup.url}{USERS}('u0002')")).status == 200
    assert setup.sf.seen[-1].cookie is None
    assert setup.sf.state.sessions_opened == 2
    assert (await setup.session())["sessions_opened"] == 1


async def test_a_client_sending_authorization_is_left_alone(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    assert (await send(client, "GET", f"{setup.url}{ROOT}")).status == 200  # the jar fills
    before = await setup.session()
    assert before["cookies"] == 2
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    got = await send(client, "GET", f"{setup.url}{USERS}('u0001')", headers=basic)
    assert got.status == 200 and got.headers.getall("Set-Cookie")  # a session of its own
    wrote = await send(client, "POST", f"{setup.url}{USERS}", json=user("a1"), headers=basic)
    assert_csrf_refusal(wrote)  # its own business: no token supplied, no resend
    seen = setup.sf.seen[1:]
    assert [(s.method, s.cookie, s.token, s.authorization) for s in seen] == [
        ("GET", None, None, basic["Authorization"]),
        ("POST", None, None, basic["Authorization"]),
    ]
    after = await setup.session()
    assert (after["cookies"], after["sessions_opened"], after["csrf_fetches"]) == (2, 1, 0)


async def test_curl_creates_merges_and_deletes_without_a_token_or_a_cookie(
    serve: Any,
) -> None:
    setup = await serve()
    json_type = ("-H", "Content-Type: application/json")
    status, body = await curl(f"{setup.url}{USERS}", *json_type, "-d", json.dumps(user("c1")))
    assert status == 201, body
    assert json.loads(body)["d"]["userId"] == "c1"
    status, body = await curl(
        "-X", "MERGE", f"{setup.url}{USERS}('c1')", *json_type, "-d", '{"lastName": "Merged"}'
    )
    assert status == 204, body
    assert setup.sf.state.users["c1"]["lastName"] == "Merged"
    status, body = await curl(
        "-X", "PATCH", f"{setup.url}{USERS}('u0001')", *json_type, "-d", '{"email": "p@x"}'
    )
    assert status == 204, body
    assert setup.sf.state.users["u0001"]["email"] == "p@x"
    status, body = await curl("-X", "DELETE", f"{setup.url}{USERS}('c1')")
    assert status == 204, body
    assert "c1" not in setup.sf.state.users
    # One session, one token fetch, every write in that session with its token.
    assert setup.sf.state.sessions_opened == 1
    assert len(setup.sf.fetches()) == 1
    writes = setup.sf.writes()
    assert [s.method for s in writes] == ["POST", "MERGE", "PATCH", "DELETE"]
    assert all(s.cookie and s.token and s.token in setup.sf.issued for s in writes)


async def test_curl_expecting_100_continue_gets_its_refused_write_sent_again(
    serve: Any, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    setup = await serve()
    assert (await send(client, "POST", f"{setup.url}{USERS}", json=user("x1"))).status == 201
    setup.sf.state.expire_tokens()
    body = tmp_path / "x2.json"
    body.write_text(json.dumps(user("x2", email="e" * 200_000)))  # kept: under 1 MiB
    status, answer = await curl(
        f"{setup.url}{USERS}", "-H", "Content-Type: application/json", "-H",
        "Expect: 100-continue", "--data-binary", f"@{body}",
    )  # fmt: skip
    assert status == 201, answer
    assert setup.sf.state.users["x2"]["email"] == "e" * 200_000
    assert len(setup.sf.writes()) == 3


async def test_an_expired_token_is_fetched_again_and_the_write_sent_once_more(
    serve: Any, client: aiohttp.ClientSession, logs: Logs
) -> None:
    setup = await serve()
    assert (await send(client, "POST", f"{setup.url}{USERS}", json=user("t1"))).status == 201
    setup.sf.state.expire_tokens()
    answer = await send(client, "POST", f"{setup.url}{USERS}", json=user("t2"))
    assert answer.status == 201, answer
    assert "t2" in setup.sf.state.users
    writes = setup.sf.writes()
    assert len(writes) == 3  # t1; t2 refused with the old token, then sent again
    assert writes[1].token == writes[0].token != writes[2].token
    assert len(setup.sf.fetches()) == 2
    assert await metric(setup.url, "sidecar_csrf_fetches_total", route="test") == 2
    first, second = logs.access("POST", USERS)  # one access line per client request
    assert first.supplied == "csrf,session"  # type: ignore[attr-defined]
    assert second.supplied == "csrf,session,csrf-retry"  # type: ignore[attr-defined]
    assert "supplied=csrf,session,csrf-retry" in logs.text()


async def test_a_write_refused_again_after_a_new_token_is_sent_twice_never_more(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()

    async def refuse_writes(request: web.Request) -> web.StreamResponse | None:
        # Every write refused, and its token made stale: a fetch brings a new one each time.
        if request.method != "POST":
            return None
        setup.sf.state.expire_tokens()
        refusal = {"X-CSRF-Token": "Required"}
        return web.Response(status=403, text=CSRF_REFUSAL, headers=refusal)

    setup.sf.intercept = refuse_writes
    answer = await send(client, "POST", f"{setup.url}{USERS}", json=user("n1"))
    assert_csrf_refusal(answer)
    writes = setup.sf.writes()
    assert len(writes) == 2 and writes[0].token != writes[1].token
    assert len(setup.sf.fetches()) == 2


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_large_write_refused_for_csrf_is_answered_unchanged_and_sent_once(
    serve: Any, client: aiohttp.ClientSession, chunked: bool
) -> None:
    setup = await serve()
    assert (await send(client, "POST", f"{setup.url}{USERS}", json=user("l1"))).status == 201
    setup.sf.state.expire_tokens()  # the cached token is stale now
    big = json.dumps(user("l2", email="x" * (2 * 1024 * 1024))).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    headers = {"Content-Type": "application/json"}
    answer = await send(
        client,
        "POST",
        f"{setup.url}{USERS}",
        data=pieces() if chunked else io.BytesIO(big),
        headers=headers,
    )
    assert_csrf_refusal(answer)
    assert "l2" not in setup.sf.state.users
    assert len(setup.sf.writes()) == 2  # l1, then l2 once
    assert len(setup.sf.fetches()) == 1  # no token fetched for a write that is not resent
    # The next small write refreshes the token and goes through.
    assert (await send(client, "POST", f"{setup.url}{USERS}", json=user("l3"))).status == 201


async def test_a_session_the_upstream_dropped_is_replaced_and_the_write_goes_through(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    # The fake keeps one session: another caller's login ends the sidecar's.
    setup = await serve(sf=SF(FakeSuccessFactors(max_sessions=1, check_mapping=False)))
    assert (await send(client, "POST", f"{setup.url}{USERS}", json=user("d1"))).status == 201
    first = setup.sf.session_ids()[-1]
    other = {"Authorization": "Basic b3RoZXI6eA=="}  # not the sidecar's session: its own
    assert (await send(client, "GET", f"{setup.url}{ROOT}", headers=other)).status == 200
    answer = await send(client, "POST", f"{setup.url}{USERS}", json=user("d2"))
    assert answer.status == 201, answer
    writes = setup.sf.writes()
    assert len(writes) == 3  # d1; d2 in the dropped session (refused), then in the new one
    new = _cookies(writes[2].cookie)["JSESSIONID"]
    assert _cookies(writes[1].cookie)["JSESSIONID"] == first != new
    assert setup.sf.state.sessions_opened == 3
    status = await setup.session()
    assert (status["sessions_opened"], status["csrf_fetches"]) == (2, 2)


async def test_concurrent_writes_share_one_fetch_and_one_refresh(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()

    async def create(prefix: str) -> list[int]:
        answers = await asyncio.gather(
            *(
                send(client, "POST", f"{setup.url}{USERS}", json=user(f"{prefix}{i}"))
                for i in range(20)
            )
        )
        return [a.status for a in answers]

    assert await create("a") == [201] * 20
    assert len(setup.sf.fetches()) == 1
    assert await metric(setup.url, "sidecar_csrf_fetches_total", route="test") == 1
    assert setup.sf.state.sessions_opened == 1
    setup.sf.state.expire_tokens()
    assert await create("b") == [201] * 20
    assert len(setup.sf.fetches()) == 2  # one refresh for the 20 refused writes
    assert await metric(setup.url, "sidecar_csrf_fetches_total", route="test") == 2
    assert all(f"b{i}" in setup.sf.state.users for i in range(20))
    assert setup.sf.state.sessions_opened == 1


async def test_a_client_sending_its_own_token_is_not_touched(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    answer = await send(
        client, "POST", f"{setup.url}{USERS}", json=user("m1"), headers={"X-CSRF-Token": "mine"}
    )
    assert_csrf_refusal(answer)
    assert [s.token for s in setup.sf.writes()] == ["mine"]  # as sent, and sent once
    assert setup.sf.fetches() == []
    assert (await setup.session())["csrf_fetches"] == 0


async def test_a_client_that_echoes_the_session_cookies_still_gets_csrf_handling(
    serve: Any,
) -> None:
    setup = await serve()
    # A client keeping every cookie it sees (Postman, newman, a browser-like jar).
    jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=setup.url)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        assert (await send(http, "GET", f"{setup.url}{ROOT}")).status == 200
        assert {m.key for m in jar} == {"JSESSIONID", "route"}
        made = await send(http, "POST", f"{setup.url}{USERS}", json=user("e1"))
        assert made.status == 201, made
        merged = await send(http, "MERGE", f"{setup.url}{USERS}('e1')", json={"lastName": "E"})
        assert merged.status == 204, merged
    assert setup.sf.state.users["e1"]["lastName"] == "E"
    assert setup.sf.state.sessions_opened == 1
    assert all(s.token in setup.sf.issued for s in setup.sf.writes())


async def test_batch_with_a_changeset_works_without_a_token(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    body = (
        "--batch_1\r\n"
        "Content-Type: multipart/mixed; boundary=changeset_1\r\n\r\n"
        "--changeset_1\r\n"
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        "POST User HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"
        f"{json.dumps(user('b1'))}\r\n"
        "--changeset_1--\r\n"
        "--batch_1--\r\n"
    )
    answer = await send(
        client,
        "POST",
        f"{setup.url}/odata/v2/$batch",
        data=body.encode(),
        headers={"Content-Type": "multipart/mixed; boundary=batch_1"},
    )
    assert answer.status == 202, answer
    assert b"HTTP/1.1 201 Created" in answer.body, answer
    assert setup.sf.state.users["b1"]["firstName"] == "Hedy"
    assert len(setup.sf.fetches()) == 1


async def test_a_client_fetching_its_own_token_without_cookies_writes_in_the_sidecars_session(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    # pyodata's way without a cookie jar: it fetches a token, then sends it on writes.
    setup = await serve()
    fetched = await send(client, "GET", f"{setup.url}{ROOT}", headers={"X-CSRF-Token": "Fetch"})
    assert fetched.status == 200
    token = fetched.headers["X-CSRF-Token"]
    made = await send(
        client, "POST", f"{setup.url}{USERS}", json=user("p1"), headers={"X-CSRF-Token": token}
    )
    assert made.status == 201, made
    assert [s.token for s in setup.sf.writes()] == [token]  # its own, sent once
    assert setup.sf.state.sessions_opened == 1
    assert (await setup.session())["csrf_fetches"] == 0


async def test_without_reuse_a_write_is_sent_at_most_twice(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    # Without kept cookies a session-bound token cannot be used: still bounded.
    setup = await serve(session=SessionConfig(reuse=False))
    async with asyncio.timeout(10):
        answer = await send(client, "POST", f"{setup.url}{USERS}", json=user("w1"))
    print(
        f"\nreuse off, csrf on: {answer.status}, {len(setup.sf.writes())} write(s), "
        f"{len(setup.sf.fetches())} fetch(es), {setup.sf.state.sessions_opened} sessions"
    )
    assert len(setup.sf.writes()) <= 2
    assert len(setup.sf.fetches()) <= 2


async def test_a_client_echoing_cookies_from_before_a_rotation_gets_a_new_session(
    serve: Any, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FileSource, "poll_interval", 3600.0)
    setup = await serve()
    jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=setup.url)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        assert (await send(http, "GET", f"{setup.url}{ROOT}")).status == 200
        old_id = setup.sf.session_ids()[-1] or next(m.value for m in jar if m.key == "JSESSIONID")
        runtime = setup.running.sidecar.routes[0]
        old = runtime.client.current
        tmp = setup.bundle.with_name("rotated.pem")
        tmp.write_bytes(pki.intermediate.client().btp_bundle())
        tmp.chmod(0o600)
        os.replace(tmp, setup.bundle)
        setup.running.sidecar.reload_all()
        assert await eventually(
            lambda: runtime.client.current is not old, within=2, what="the new certificate"
        )
        seen = len(setup.sf.seen)
        assert (await send(http, "GET", f"{setup.url}{USERS}('u0001')")).status == 200
    assert old_id not in setup.sf.session_ids()[seen:]
    # the first certificate's, the probe's before the switch (its own), the new one's
    assert setup.sf.state.sessions_opened == 3


# ------------------------------------------------------------------ throttling


async def test_429_and_503_with_retry_after_pass_through_and_are_counted(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()

    async def unavailable(request: web.Request) -> web.StreamResponse | None:
        seconds = request.query.get("unavailable")
        if seconds is None:
            return None
        headers = {"Retry-After": seconds} if seconds else {}
        return web.Response(status=503, text="maintenance", headers=headers)

    setup.sf.intercept = unavailable
    throttled = await send(client, "GET", f"{setup.url}{USERS}?throttle=7")
    assert throttled.status == 429
    assert throttled.headers["Retry-After"] == "7"
    assert json.loads(throttled.body)["error"]["code"] == "COE_TOO_MANY_REQUESTS"
    down = await send(client, "GET", f"{setup.url}{USERS}?unavailable=30")
    assert (down.status, down.headers["Retry-After"], down.body) == (503, "30", b"maintenance")
    plain = await send(client, "GET", f"{setup.url}{USERS}?unavailable=")
    assert plain.status == 503 and "Retry-After" not in plain.headers  # not a throttle
    assert await metric(setup.url, "sidecar_upstream_throttled_total", route="test") == 2
    assert (await setup.session())["throttled"] == 2


# ------------------------------------------------------------------ where values go


async def test_session_values_never_reach_another_host_logs_status_or_metrics(
    serve: Any,
    tls_upstream: Any,
    bundle_file: Path,
    ca_file: Path,
    client: aiohttp.ClientSession,
    logs: Logs,
) -> None:
    other = FakeUpstream()
    other_url = await tls_upstream(other.app())
    second = route_config(other_url, bundle_file, ca_file, name="other")
    setup = await serve(second)
    other_side = f"http://{setup.running.sidecar.bound_address(setup.running.sidecar.routes[1])}"
    assert (await send(client, "GET", f"{setup.url}{USERS}('u0001')")).status == 200
    assert (await send(client, "POST", f"{setup.url}{USERS}", json=user("s1"))).status == 201
    values = sorted(setup.sf.issued)
    assert len(values) == 3  # JSESSIONID, route, token
    # Every value and the random part of JSESSIONID (its node suffix is public).
    values += [v.split(".")[0] for v in values if "." in v]

    # The other route's upstream: a read and a write, echoed back as received.
    echoed = [
        json.loads((await send(client, method, f"{other_side}/x/odata/v2/y", data=b"{}")).body)
        for method in ("GET", "POST")
    ]
    # An absolute-form request (the sidecar as http_proxy) for the other host is refused.
    refused = await raw_exchange(
        setup.url,
        f"GET {other_url.replace('https', 'http')}/steal HTTP/1.1\r\n"
        f"Host: {other_url.removeprefix('https://')}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert_sidecar_error(refused, "forbidden_target")
    assert all(e["path"] != "/steal" for e in echoed)
    assert other.requests == 3  # the read, the token fetch for the write, the write
    for echo in echoed:
        assert header_values(echo, "Cookie") == []
        assert header_values(echo, "X-CSRF-Token") in ([], ["Fetch"])

    status = json.dumps(await admin_json(setup.url, "status"))
    metrics = (await raw_exchange(
        setup.url, b"GET /-/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )).body.decode()  # fmt: skip
    assert logs.access("POST", USERS), "the debug logs were captured"
    for where, text in [
        ("status", status),
        ("metrics", metrics),
        ("text log", logs.text()),
        ("json log", logs.json()),
    ]:
        leaked = [v for v in values if v in text]
        assert leaked == [], f"{where} shows {leaked}"


async def test_a_certificate_rotation_starts_a_new_session(
    serve: Any, pki: PKI, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FileSource, "poll_interval", 3600.0)  # only the reload brings it in
    setup = await serve()
    for _ in range(2):
        assert (await send(client, "GET", f"{setup.url}{USERS}('u0001')")).status == 200
    old_id = setup.sf.session_ids()[-1]
    assert old_id is not None and setup.sf.state.sessions_opened == 1
    runtime = setup.running.sidecar.routes[0]
    old = runtime.client.current
    fresh = pki.intermediate.client()
    tmp = setup.bundle.with_name("rotated.pem")
    tmp.write_bytes(fresh.btp_bundle())
    tmp.chmod(0o600)
    os.replace(tmp, setup.bundle)
    setup.running.sidecar.reload_all()  # what SIGHUP does
    assert await eventually(
        lambda: runtime.client.current is not old, within=2, what="the new certificate in use"
    )
    seen = len(setup.sf.seen)
    for _ in range(3):
        assert (await send(client, "GET", f"{setup.url}{USERS}('u0002')")).status == 200
    after = setup.sf.session_ids()[seen:]
    assert after[0] is None  # a new login: the old certificate's cookies stay behind
    assert old_id not in after
    assert after[1] == after[2] is not None
    # the first certificate's, the probe's before the switch (its own), the new one's
    assert setup.sf.state.sessions_opened == 3
    assert (await setup.session())["sessions_opened"] == 2  # the sidecar's own sessions


# ------------------------------------------------------------------ bad paths


async def _closing(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    return web.Response(status=500)


@pytest.mark.parametrize("fetch", ["500", "close"])
async def test_a_failed_token_fetch_sends_the_write_without_one_and_relays_the_answer(
    serve: Any, client: aiohttp.ClientSession, fetch: str, logs: Logs
) -> None:
    setup = await serve()

    async def broken_fetch(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("X-CSRF-Token") != "Fetch":
            return None
        if fetch == "close":
            return await _closing(request)
        return web.Response(status=500, text="token service down")

    setup.sf.intercept = broken_fetch
    async with asyncio.timeout(10):  # never a hang
        answer = await send(client, "POST", f"{setup.url}{USERS}", json=user("f1"))
    assert_csrf_refusal(answer)  # what the upstream said to the write without a token
    assert [s.token for s in setup.sf.writes()] == [None]
    # Fetched again once after the refusal (the pool may resend a GET once on a new
    # connection when a kept-alive one closes under it, so the fake may see one more).
    assert await metric(setup.url, "sidecar_csrf_fetches_total", route="test") == 2
    assert any("CSRF token" in r.getMessage() for r in logs.records if r.levelno >= logging.INFO)


async def test_no_token_offered_writes_go_without_and_are_not_fetched_again(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()

    async def no_csrf(request: web.Request) -> web.StreamResponse | None:
        # An upstream without CSRF protection: fetches get no token, writes succeed.
        if request.headers.get("X-CSRF-Token") == "Fetch":
            return web.json_response({"d": {}})
        if request.method == "POST":
            return web.json_response({"d": {}}, status=201)
        return None

    setup.sf.intercept = no_csrf
    for i in range(5):
        assert (await send(client, "POST", f"{setup.url}{USERS}", json=user(f"n{i}"))).status == 201
    assert [s.token for s in setup.sf.writes()] == [None] * 5
    assert len(setup.sf.fetches()) == 1
    assert (await setup.session())["csrf_tokens"] == 0


async def test_no_token_offered_and_writes_refused_fetches_not_for_each_write(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()

    async def no_token(request: web.Request) -> web.StreamResponse | None:
        # Fetches answered without a token, writes refused for want of one.
        if request.headers.get("X-CSRF-Token") == "Fetch":
            return web.json_response({"d": {}})
        return None

    setup.sf.intercept = no_token
    for i in range(5):
        assert_csrf_refusal(await send(client, "POST", f"{setup.url}{USERS}", json=user(f"r{i}")))
    assert len(setup.sf.writes()) == 5  # each once: no other token to send it with
    assert len(setup.sf.fetches()) <= 2, setup.sf.fetches()


async def test_a_failed_token_fetch_is_not_remembered(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve()
    failures = 1

    async def fails_once(request: web.Request) -> web.StreamResponse | None:
        nonlocal failures
        if request.headers.get("X-CSRF-Token") == "Fetch" and failures:
            failures -= 1
            return web.Response(status=503, text="try again")
        return None

    setup.sf.intercept = fails_once
    # Refused without a token, then sent again with the one the next fetch brings.
    assert (await send(client, "POST", f"{setup.url}{USERS}", json=user("o1"))).status == 201
    assert [s.token is None for s in setup.sf.writes()] == [True, False]
    assert (await send(client, "POST", f"{setup.url}{USERS}", json=user("o2"))).status == 201
    assert len(setup.sf.fetches()) == 2


async def test_a_stalled_body_being_kept_is_answered_408(serve: Any) -> None:
    setup = await serve(timeouts=Timeouts(read=0.5))
    answer = await raw_exchange(
        setup.url,
        f"POST {USERS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n'.encode(),
    )
    assert_sidecar_error(answer, "request_timeout")
    assert setup.sf.writes() == []


async def test_a_too_large_body_being_kept_is_answered_413(
    serve: Any, client: aiohttp.ClientSession
) -> None:
    setup = await serve(limits=LimitsConfig(max_body=1000))

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 500

    async with client.post(f"{setup.url}{USERS}", data=pieces()) as resp:
        answer = Answer(resp.status, CIMultiDict(resp.headers), await resp.read())
    assert_sidecar_error(answer, "request_too_large")
    assert setup.sf.writes() == []


# ------------------------------------------------------------------ the pieces


@pytest.mark.parametrize(
    ("path", "root"),
    [
        ("/odata/v2/User('x')", "/odata/v2/"),
        ("/odata/v2/$batch", "/odata/v2/"),
        ("/sf/api/odata/v2/User", "/sf/api/odata/v2/"),  # behind an upstream prefix
        ("/ODATA/V2/upsert", "/ODATA/V2/"),
        ("/odata/v2/User('/odata/v2/')", "/odata/v2/"),  # the first root, not the last
        ("/api/v4/Books(1)", "/api/v4/"),  # OData V4: the parent
        ("/x", "/"),
        ("", "/"),
    ],
)
def test_service_root(path: str, root: str) -> None:
    assert service_root(path) == root


@pytest.mark.parametrize(
    ("status", "headers", "refused"),
    [
        (403, {"X-CSRF-Token": "Required"}, True),
        (403, {"x-csrf-token": " required "}, True),
        (403, {}, False),
        (403, {"X-CSRF-Token": "abc"}, False),
        (401, {"X-CSRF-Token": "Required"}, False),
        (200, {"X-CSRF-Token": "Required"}, False),
    ],
)
def test_refuses_token(status: int, headers: dict[str, str], refused: bool) -> None:
    assert refuses_token(status, CIMultiDictProxy(CIMultiDict(headers))) is refused


def _session(reuse: bool = True) -> UpstreamSession:
    """A session to a made-up host (its jar needs a running loop: async tests only)."""
    return UpstreamSession(UpstreamURL(host="api.example.test", port=443), SessionConfig(reuse))


def _h(**headers: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in headers.items()}))


async def test_governs_clients_that_send_no_identity_or_only_its_cookies() -> None:
    s = _session()
    assert s.governs(_h())
    assert not s.governs(_h(Authorization="Bearer x"))
    assert not s.governs(_h(Cookie="JSESSIONID=theirs"))
    assert s.store(["JSESSIONID=ours1; Path=/", "route=r1; Path=/"], "/odata/v2/")
    assert s.governs(_h(Cookie="JSESSIONID=ours1; route=r1"))
    assert s.governs(_h(Cookie="route=r1"))
    assert not s.governs(_h(Cookie="JSESSIONID=ours1; mine=1"))  # mixed: the client's own
    assert not s.governs(_h(Cookie="JSESSIONID=ours1", Authorization="Basic x"))
    # A session replaced by a newer one: cookies echoed from the old one are still ours...
    assert s.store(["JSESSIONID=ours2; Path=/"], "/odata/v2/")
    assert s.governs(_h(Cookie="JSESSIONID=ours1; route=r1"))
    # ...for the last few sessions only.
    for i in range(3, 12):
        s.store([f"JSESSIONID=ours{i}; Path=/"], "/")
    assert not s.governs(_h(Cookie="JSESSIONID=ours1"))
    assert s.governs(_h(Cookie="JSESSIONID=ours11"))


async def test_the_jar_follows_cookie_paths_and_stays_with_its_host() -> None:
    s = _session()
    assert s.cookie_header("/odata/v2/User") is None
    # No Path: the default path is the request path's directory (RFC 6265 5.1.4).
    s.store(["a=1", "b=2; Path=/odata", "c=3; Path=/other", "d=4; Domain=elsewhere.test"],
            "/odata/v2/User")  # fmt: skip
    # (RFC 6265 5.4 would list the longer path first; aiohttp's jar does not: no matter)
    assert sorted(str(s.cookie_header("/odata/v2/User('x')")).split("; ")) == ["a=1", "b=2"]
    assert s.cookie_header("/odata/v3") == "b=2"
    assert s.cookie_header("/other/x") == "c=3"
    assert s.cookie_header("/") is None
    assert "d=4" not in str(s.cookie_header("/odata/v2/x"))  # another host's cookie: refused


async def test_the_jar_forgets_expired_and_deleted_cookies(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _session()
    assert s.store(["JSESSIONID=1; Path=/", "short=1; Path=/; Max-Age=60"], "/")
    assert s.status()["cookies"] == 2
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)  # aiohttp's jar reads time.time()
    assert s.cookie_header("/") == "JSESSIONID=1"
    assert s.status()["cookies"] == 1
    monkeypatch.undo()
    # A deletion is not a new session.
    assert not s.store(["JSESSIONID=; Path=/; Max-Age=0"], "/")
    assert s.cookie_header("/") is None


async def test_a_new_session_value_counts_once_and_drops_the_tokens() -> None:
    s = _session()
    s._tokens["/odata/v2/"] = session_module._Token("t", 0.0)
    assert s.store(["JSESSIONID=1; Path=/", "route=r; Path=/"], "/x")  # one session, two cookies
    assert s._tokens == {}
    s._tokens["/odata/v2/"] = session_module._Token("t", 0.0)
    assert not s.store(["JSESSIONID=1; Path=/"], "/x")  # the same again: not a new session
    assert "/odata/v2/" in s._tokens
    assert s.store(["JSESSIONID=2; Path=/"], "/x")
    status = s.status()
    assert status["cookies"] == 2 and status["csrf_tokens"] == 0


async def test_a_load_balancer_cookie_changing_on_every_answer_opens_no_session() -> None:
    s = _session()
    assert s.store(["JSESSIONID=1; Path=/", "AWSALB=a1; Path=/"], "/x")  # the first answer
    s._tokens["/odata/v2/"] = session_module._Token("t", 0.0)
    assert not s.store(["AWSALB=a2; Path=/"], "/x")  # stickiness, not a login
    assert "/odata/v2/" in s._tokens
    assert s.cookie_header("/x") is not None and "AWSALB=a2" in str(s.cookie_header("/x"))
    assert s.governs(_h(Cookie="JSESSIONID=1; AWSALB=a1"))  # either value is ours
    assert s.store(["MYSAPSSO2=new; Path=/"], "/x")  # a new name: a new login
    assert s.store(["JSESSIONID=2; Path=/"], "/x")  # a session cookie's new value too


async def test_a_new_identity_knows_the_cookies_the_old_one_handed_out() -> None:
    old, new = _session(), _session()
    old.store(["JSESSIONID=old; Path=/"], "/")
    assert not new.governs(_h(Cookie="JSESSIONID=old"))
    new.inherit(old)
    assert new.governs(_h(Cookie="JSESSIONID=old"))
    assert new.cookie_header("/") is None  # known as ours, never sent again


async def test_without_reuse_nothing_is_kept() -> None:
    s = _session(reuse=False)
    assert not s.store(["JSESSIONID=1; Path=/"], "/")
    assert s.cookie_header("/") is None
    assert s.status()["cookies"] == 0


class _Fetches:
    """A token fetch the test releases; counts its calls."""

    def __init__(self, *values: str | None) -> None:
        self.values = list(values)
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self) -> str | None:
        self.calls += 1
        await self.release.wait()
        return self.values.pop(0)


async def test_waiting_writes_share_one_fetch() -> None:
    s, fetch = _session(), _Fetches("t1")
    waiting = [asyncio.ensure_future(s.token(ROOT, fetch)) for _ in range(10)]
    await asyncio.sleep(0)
    fetch.release.set()
    assert await asyncio.gather(*waiting) == ["t1"] * 10
    assert await s.token(ROOT, fetch) == "t1"  # cached
    assert fetch.calls == 1
    assert s.status()["csrf_tokens"] == 1


async def test_a_refused_token_is_refreshed_once_for_all_who_hold_it() -> None:
    s, fetch = _session(), _Fetches("t1", "t2")
    fetch.release.set()
    assert await s.token(ROOT, fetch) == "t1"
    fetch.release.clear()
    refreshing = [asyncio.ensure_future(s.fresh_token(ROOT, "t1", fetch)) for _ in range(10)]
    await asyncio.sleep(0)
    fetch.release.set()
    assert await asyncio.gather(*refreshing) == ["t2"] * 10
    assert await s.fresh_token(ROOT, "t1", fetch) == "t2"  # a late refusal of t1: no fetch
    assert fetch.calls == 2


async def test_a_waiter_that_goes_away_does_not_cancel_the_fetch() -> None:
    s, fetch = _session(), _Fetches("t1")
    first = asyncio.ensure_future(s.token(ROOT, fetch))
    second = asyncio.ensure_future(s.token(ROOT, fetch))
    await asyncio.sleep(0)
    first.cancel()
    fetch.release.set()
    assert await second == "t1"
    assert first.cancelled() and fetch.calls == 1


async def test_a_failing_fetch_fails_its_waiters_and_the_next_write_fetches_again() -> None:
    s = _session()
    calls = 0

    async def failing() -> str | None:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    results = await asyncio.gather(
        s.token(ROOT, failing), s.token(ROOT, failing), return_exceptions=True
    )
    assert [type(r) for r in results] == [RuntimeError, RuntimeError] and calls == 1
    with pytest.raises(RuntimeError):
        await s.token(ROOT, failing)
    assert calls == 2


async def test_no_token_offered_is_remembered_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s, fetch = _session(), _Fetches(None, "t1")
    fetch.release.set()
    assert await s.token(ROOT, fetch) is None
    assert await s.token(ROOT, fetch) is None
    assert fetch.calls == 1
    monkeypatch.setattr(session_module, "NO_TOKEN_AGAIN", 0.0)
    assert await s.token(ROOT, fetch) == "t1"
    assert fetch.calls == 2
    assert s.status()["csrf_token_age_seconds"] == 0


async def test_no_token_offered_is_not_fetched_again_for_a_refused_write() -> None:
    s, fetch = _session(), _Fetches(None, "t1")
    fetch.release.set()
    assert await s.token(ROOT, fetch) is None
    assert await s.fresh_token(ROOT, None, fetch) is None  # no other token to resend with
    assert fetch.calls == 1


async def test_a_failed_fetch_is_not_remembered() -> None:
    s = _session()
    calls = 0

    async def fails() -> str | None:
        nonlocal calls
        calls += 1
        raise session_module.FetchFailed

    assert await s.token(ROOT, fails) is None
    assert await s.token(ROOT, fails) is None
    assert calls == 2 and s.status()["csrf_tokens"] == 0
