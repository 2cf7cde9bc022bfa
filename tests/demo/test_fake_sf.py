"""The demo's fake SuccessFactors, spoken to directly over mTLS (no sidecar).

Sessions (JSESSIONID and route cookies), CSRF tokens per session, the User
writes, upsert, ``$batch`` and ``throttle=N`` behave as the real service does
on the wire; the 401 company-id check still guards ``/odata``, and the X.509
certificate mapping lets in only the client certificates it holds. The client keeps
no cookies of its own (a DummyCookieJar): every test says which cookie it sends.
"""

from __future__ import annotations

import email
import json
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message
from http.cookies import SimpleCookie
from pathlib import Path
from ssl import SSLContext
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from multidict import CIMultiDictProxy

from sidecar.credentials.certinfo import fingerprint
from sidecar.demo.app import DEMO_COMPANY_ID, FakeUpstream, fake_successfactors
from sidecar.demo.fake_sf import CSRF_REFUSAL, NODE, FakeSuccessFactors
from sidecar.demo.pki import CA

COMPANY = {"successfactors-companyid": DEMO_COMPANY_ID}


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def cookies(self) -> SimpleCookie:
        jar: SimpleCookie = SimpleCookie()
        for line in self.headers.getall("Set-Cookie", []):
            jar.load(line)
        return jar


@dataclass(frozen=True)
class Login:
    """A session as a client keeps it: the cookies the fake set, and the token fetched."""

    cookie: str
    token: str | None


@dataclass
class Fake:
    upstream: FakeUpstream
    http: aiohttp.ClientSession
    ssl: ssl.SSLContext
    sent: list[str] = field(default_factory=list)

    async def send(
        self,
        method: str,
        path: str,
        *,
        login: Login | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
        data: bytes | None = None,
        tls: SSLContext | None = None,  # (the field `ssl` hides the module here)
    ) -> Answer:
        """One request: the company id, the login's cookie and token (or ``token``);
        with the demo's client certificate, or the one ``tls`` presents."""
        all_headers = {**COMPANY, **(headers or {})}
        if login is not None:
            all_headers["Cookie"] = login.cookie
            if login.token is not None:
                all_headers.setdefault("X-CSRF-Token", login.token)
        if token is not None:
            all_headers["X-CSRF-Token"] = token
        if body is not None:
            data = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        url = self.upstream.url + path
        async with self.http.request(
            method, url, headers=all_headers, data=data, ssl=tls or self.ssl
        ) as resp:
            return Answer(resp.status, resp.headers, await resp.read())

    async def login(self) -> Login:
        answer = await self.send("GET", "/odata/v2/", headers={"X-CSRF-Token": "Fetch"})
        assert answer.status == 200
        cookies = answer.cookies()
        cookie = "; ".join(f"{name}={morsel.value}" for name, morsel in cookies.items())
        return Login(cookie, answer.headers["X-CSRF-Token"])

    def users(self) -> dict[str, dict[str, str | None]]:
        return self.upstream.state.snapshot()


def presenting(upstream: FakeUpstream, bundle: Path) -> ssl.SSLContext:
    """A client TLS context trusting the fake and presenting ``bundle`` (key and chain)."""
    ctx = ssl.create_default_context(cafile=str(upstream.pki.ca_file))
    ctx.load_cert_chain(str(bundle))
    return ctx


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Fake]:
    async with fake_successfactors(tmp_path / "sf") as upstream:
        ctx = presenting(upstream, upstream.pki.client_bundle)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            yield Fake(upstream, http, ctx)


def assert_sf_error(answer: Answer, status: int, code: str, *words: str) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["message"]["lang"] == "en-US"
    for word in words:
        assert word in error["message"]["value"], error


def assert_csrf_refused(answer: Answer) -> None:
    assert answer.status == 403, answer.body
    assert answer.headers["X-CSRF-Token"] == "Required"
    assert answer.body.decode() == CSRF_REFUSAL


# -------------------------------------------------------------------- sessions


async def test_each_cookie_less_request_opens_a_session(fake: Fake) -> None:
    ids = set()
    for _ in range(3):
        answer = await fake.send("GET", "/odata/v2/User('u0001')")
        assert answer.status == 200
        lines = answer.headers.getall("Set-Cookie")
        assert len(lines) == 2
        for line in lines:
            attributes = {a.strip().lower() for a in line.split(";")[1:]}
            assert attributes == {"path=/", "secure", "httponly"}, line
        cookies = answer.cookies()
        assert re.fullmatch(r"[0-9A-F]{32}\." + re.escape(NODE), cookies["JSESSIONID"].value)
        assert re.fullmatch(r"[0-9a-f]{40}", cookies["route"].value)
        ids.add(cookies["JSESSIONID"].value)
    assert len(ids) == 3
    assert fake.upstream.state.sessions_opened == 3


async def test_the_session_cookie_continues_the_session(fake: Fake) -> None:
    login = await fake.login()
    for path in ("/odata/v2/User?$top=1", "/odata/v2/$metadata", "/odata/v2/User('nobody')"):
        answer = await fake.send("GET", path, login=login)
        assert answer.status in (200, 404)
        assert "Set-Cookie" not in answer.headers
    assert fake.upstream.state.sessions_opened == 1

    # A session the fake does not know (timed out, another server's) is replaced.
    stale = Login("JSESSIONID=0123456789ABCDEF0123456789ABCDEF." + NODE, login.token)
    answer = await fake.send("GET", "/odata/v2/", login=stale)
    assert answer.status == 200
    assert answer.cookies()["JSESSIONID"].value != stale.cookie
    assert fake.upstream.state.sessions_opened == 2


async def test_fetch_issues_one_token_per_session(fake: Fake) -> None:
    first = await fake.login()
    again = await fake.send("GET", "/odata/v2/User", login=first, token="fetch")  # any case
    assert again.headers["X-CSRF-Token"] == first.token
    assert "Set-Cookie" not in again.headers

    second = await fake.login()
    assert second.token != first.token
    assert second.cookie != first.cookie

    # Without Fetch, no token; HEAD fetches as GET does; a write cannot fetch.
    plain = await fake.send("GET", "/odata/v2/", login=first, headers={"X-CSRF-Token": ""})
    assert "X-CSRF-Token" not in plain.headers
    head = await fake.send("HEAD", "/odata/v2/", login=first, token="Fetch")
    assert head.headers["X-CSRF-Token"] == first.token
    post = await fake.send("POST", "/odata/v2/User", login=first, token="Fetch", body={})
    assert_csrf_refused(post)


# ---------------------------------------------------------------------- CSRF


@dataclass(frozen=True)
class Write:
    method: str
    path: str
    body: Any
    status: int  # with a valid token
    headers: dict[str, str] = field(default_factory=dict)


NEW = {"userId": "hl1", "firstName": "Hedy", "lastName": "Lamarr"}
BATCH_BOUNDARY = "batch_1"


def batch_body(*parts: str, boundary: str = BATCH_BOUNDARY, newline: str = "\r\n") -> bytes:
    text = "".join(f"--{boundary}\n{part}\n" for part in parts) + f"--{boundary}--\n"
    return text.replace("\n", newline).encode()


def http_part(request_line: str, body: Any = None, *, content_id: str | None = None) -> str:
    mime = "Content-Type: application/http\nContent-Transfer-Encoding: binary\n"
    if content_id is not None:
        mime += f"Content-ID: {content_id}\n"
    if body is None:
        return f"{mime}\n{request_line} HTTP/1.1\n"
    payload = json.dumps(body)
    return f"{mime}\n{request_line} HTTP/1.1\nContent-Type: application/json\n\n{payload}"


def changeset(*parts: str, boundary: str = "changeset_1") -> str:
    inner = "".join(f"--{boundary}\n{part}\n" for part in parts) + f"--{boundary}--"
    return f"Content-Type: multipart/mixed; boundary={boundary}\n\n{inner}"


BATCH_CREATE = batch_body(changeset(http_part("POST User", NEW)))
BATCH_TYPE = {"Content-Type": f"multipart/mixed; boundary={BATCH_BOUNDARY}"}

WRITES = {
    "create": Write("POST", "/odata/v2/User", NEW, 201),
    "merge": Write("MERGE", "/odata/v2/User('u0001')", {"firstName": "Hedy"}, 204),
    "merge tunnelled": Write(
        "POST", "/odata/v2/User('u0001')", {"firstName": "Hedy"}, 204, {"X-HTTP-Method": "MERGE"}
    ),
    "patch": Write("PATCH", "/odata/v2/User('u0001')", {"firstName": "Hedy"}, 204),
    "put": Write("PUT", "/odata/v2/User('u0001')", {"firstName": "Hedy"}, 204),
    "delete": Write("DELETE", "/odata/v2/User('u0001')", None, 204),
    "upsert": Write("POST", "/odata/v2/upsert", NEW, 200),
    "batch": Write("POST", "/odata/v2/$batch", BATCH_CREATE, 202, BATCH_TYPE),
}


async def send_write(fake: Fake, write: Write, **kwargs: Any) -> Answer:
    if isinstance(write.body, bytes):
        return await fake.send(
            write.method, write.path, data=write.body, headers=write.headers, **kwargs
        )
    return await fake.send(
        write.method, write.path, body=write.body, headers=write.headers, **kwargs
    )


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
async def test_a_write_needs_the_current_token_of_its_own_session(fake: Fake, write: Write) -> None:
    mine = await fake.login()
    other = await fake.login()
    before = fake.users()
    no_cookie = Login("", mine.token)
    refusals = {
        "no token": await send_write(fake, write, login=Login(mine.cookie, None)),
        "another session's token": await send_write(fake, write, login=mine, token=other.token),
        "a token without its cookie": await send_write(fake, write, login=no_cookie),
        "a wrong token": await send_write(fake, write, login=mine, token=f"{mine.token}x"),
    }
    fake.upstream.state.expire_tokens()
    refusals["an expired token"] = await send_write(fake, write, login=mine)
    for case, answer in refusals.items():
        assert answer.status == 403, case
        assert_csrf_refused(answer)
    assert fake.users() == before

    # A new Fetch in the same session brings a new token, and the write goes through.
    renewed = await fake.send("GET", "/odata/v2/", login=mine, token="Fetch")
    token = renewed.headers["X-CSRF-Token"]
    assert token != mine.token
    answer = await send_write(fake, write, login=Login(mine.cookie, token))
    assert answer.status == write.status, answer.body
    assert "Set-Cookie" not in answer.headers
    assert fake.users() != before


async def test_a_refused_write_without_a_cookie_still_opens_a_session(fake: Fake) -> None:
    # As on the real service: the 403 carries the new session's cookies, so a client
    # can fetch a token in that session and send the write again.
    answer = await fake.send("POST", "/odata/v2/User", body=NEW)
    assert_csrf_refused(answer)
    assert "JSESSIONID" in answer.cookies()
    assert fake.upstream.state.sessions_opened == 1


# -------------------------------------------------------------------- writes


async def test_create_read_update_delete(fake: Fake) -> None:
    login = await fake.login()
    origin = f"https://localhost:{fake.upstream.port}"
    uri = f"{origin}/odata/v2/User('hl1')"

    created = await fake.send("POST", "/odata/v2/User", login=login, body=NEW)
    assert created.status == 201
    assert created.headers["Location"] == uri
    d = created.json()["d"]
    assert d["__metadata"] == {"uri": uri, "type": "SFOData.User"}
    assert d["manager"] == {"__deferred": {"uri": f"{uri}/manager"}}
    assert {k: d[k] for k in NEW} == NEW
    assert d["email"] is None

    merged = await fake.send(
        "MERGE", "/odata/v2/User('hl1')", login=login, body={"email": "hedy@example.com"}
    )
    assert merged.status == 204 and merged.body == b""
    read = (await fake.send("GET", "/odata/v2/User('hl1')", login=login)).json()["d"]
    assert (read["firstName"], read["email"]) == ("Hedy", "hedy@example.com")

    # PUT replaces: what it does not send is cleared.
    put = await fake.send("PUT", "/odata/v2/User('hl1')", login=login, body={"lastName": "L."})
    assert put.status == 204
    assert fake.users()["hl1"] == {
        "userId": "hl1",
        "firstName": None,
        "lastName": "L.",
        "email": None,
    }

    # The new user is paged like the others, at the end.
    last = await fake.send("GET", "/odata/v2/User?$skiptoken=40", login=login)
    assert [u["userId"] for u in last.json()["d"]["results"]][-1] == "hl1"

    deleted = await fake.send("DELETE", "/odata/v2/User('hl1')", login=login)
    assert deleted.status == 204
    gone = await fake.send("GET", "/odata/v2/User('hl1')", login=login)
    assert_sf_error(gone, 404, "COE_RESOURCE_NOT_FOUND", "hl1")


@pytest.mark.parametrize("method", ["MERGE", "PATCH", "PUT", "DELETE"])
async def test_a_write_to_an_unknown_user_is_404(fake: Fake, method: str) -> None:
    login = await fake.login()
    body = None if method == "DELETE" else {"firstName": "X"}
    answer = await fake.send(method, "/odata/v2/User('nobody')", login=login, body=body)
    assert_sf_error(answer, 404, "COE_RESOURCE_NOT_FOUND", "nobody")
    assert "nobody" not in fake.users()


BAD_BODIES = {
    "not JSON": (b"{firstName: Hedy", "not valid JSON"),
    "not UTF-8": (b"\xff\xfe", "not valid JSON"),
    "a list": (b'[{"userId": "x"}]', "JSON object"),
    "an unknown property": (b'{"userId": "x", "salary": "1"}', "User/salary"),
    "a number": (b'{"userId": "x", "firstName": 7}', "firstName"),
}


@pytest.mark.parametrize(("data", "words"), BAD_BODIES.values(), ids=BAD_BODIES.keys())
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/odata/v2/User"), ("MERGE", "/odata/v2/User('u0001')")],
)
async def test_a_bad_body_is_400_and_changes_nothing(
    fake: Fake, method: str, path: str, data: bytes, words: str
) -> None:
    login = await fake.login()
    before = fake.users()
    headers = {"Content-Type": "application/json"}
    answer = await fake.send(method, path, login=login, data=data, headers=headers)
    assert_sf_error(answer, 400, "COE_GENERAL_BAD_REQUEST", words)
    assert fake.users() == before


@pytest.mark.parametrize(
    ("method", "path", "body", "words"),
    [
        ("POST", "/odata/v2/User", {"firstName": "No id"}, "userId is required"),
        ("POST", "/odata/v2/User", {"userId": "u0001"}, "exists already"),
        ("MERGE", "/odata/v2/User('u0001')", {"userId": "u0002"}, "cannot change"),
    ],
)
async def test_a_write_that_makes_no_sense_is_400(
    fake: Fake, method: str, path: str, body: Any, words: str
) -> None:
    login = await fake.login()
    before = fake.users()
    answer = await fake.send(method, path, login=login, body=body)
    assert_sf_error(answer, 400, "COE_GENERAL_BAD_REQUEST", words)
    assert fake.users() == before


async def test_unknown_paths_and_methods_answer_sf_errors(fake: Fake) -> None:
    login = await fake.login()
    missing = await fake.send("GET", "/odata/v2/Position", login=login)
    assert_sf_error(missing, 404, "COE_RESOURCE_NOT_FOUND", "Position")
    wrong = await fake.send("DELETE", "/odata/v2/User", login=login)
    assert_sf_error(wrong, 405, "COE_METHOD_NOT_ALLOWED", "DELETE", "GET, POST")
    batch_get = await fake.send("GET", "/odata/v2/$batch", login=login)
    assert_sf_error(batch_get, 405, "COE_METHOD_NOT_ALLOWED", "$batch takes POST")


# -------------------------------------------------------------------- upsert


async def test_upsert_answers_one_result_per_entity(fake: Fake) -> None:
    login = await fake.login()
    entities = [
        NEW,  # new, by userId
        {"__metadata": {"uri": "User('u0002')"}, "firstName": "Grace"},  # existing, by uri
        {"firstName": "Nobody"},  # no key
        {"userId": "x", "salary": "1"},
    ]
    answer = await fake.send("POST", "/odata/v2/upsert", login=login, body=entities)
    assert answer.status == 200
    results = answer.json()["d"]
    ok = {"status": "OK", "editStatus": "UPSERTED", "message": None, "httpCode": 204}
    assert results[0] == {"key": "User/userId='hl1'", **ok, "index": 0, "inlineResults": None}
    assert results[1] == {"key": "User/userId='u0002'", **ok, "index": 1, "inlineResults": None}
    for index in (2, 3):
        assert results[index]["status"] == "ERROR"
        assert results[index]["editStatus"] is None
        assert results[index]["httpCode"] == 400
        assert results[index]["index"] == index
        assert results[index]["message"]
    assert "userId or __metadata.uri" in results[2]["message"]
    assert "User/salary" in results[3]["message"]

    users = fake.users()
    assert users["hl1"]["firstName"] == "Hedy"
    assert users["u0002"]["firstName"] == "Grace"
    assert users["u0002"]["email"] == "alan.allen2@example.com"  # MERGE-like: kept
    assert "x" not in users

    # One object instead of a list is one entity.
    single = await fake.send("POST", "/odata/v2/upsert", login=login, body={"userId": "solo"})
    assert single.json()["d"][0]["key"] == "User/userId='solo'"
    bad = await fake.send("POST", "/odata/v2/upsert", login=login, data=b"[", headers={})
    assert_sf_error(bad, 400, "COE_GENERAL_BAD_REQUEST", "not valid JSON")


# -------------------------------------------------------------------- $batch


def batch_answer(answer: Answer) -> list[Message]:
    """The parts of a multipart/mixed answer, read with the stdlib's MIME parser."""
    assert answer.status == 202, answer.body
    head = f"Content-Type: {answer.headers['Content-Type']}\r\n\r\n".encode()
    return message_parts(email.message_from_bytes(head + answer.body))


def message_parts(message: Message) -> list[Message]:
    assert message.is_multipart()
    parts = message.get_payload()
    assert isinstance(parts, list)
    messages = [part for part in parts if isinstance(part, Message)]
    assert len(messages) == len(parts)
    return messages


def http_answer(part: Message) -> tuple[int, dict[str, str], str]:
    assert part.get_content_type() == "application/http"
    text = part.get_payload()
    assert isinstance(text, str)
    head, _, body = text.partition("\r\n\r\n")
    status_line, *lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert int(headers["Content-Length"]) == len(body.encode())
    return int(status_line.split()[1]), headers, body


async def send_batch(fake: Fake, login: Login, data: bytes, **headers: str) -> Answer:
    return await fake.send(
        "POST", "/odata/v2/$batch", login=login, data=data, headers={**BATCH_TYPE, **headers}
    )


async def test_batch_with_a_read_and_a_changeset(fake: Fake) -> None:
    login = await fake.login()
    origin = f"https://localhost:{fake.upstream.port}"
    data = batch_body(
        http_part("GET User('u0003')?$format=json"),
        changeset(
            http_part("POST User", NEW, content_id="1"),
            http_part(f"MERGE {origin}/odata/v2/User('u0001')", {"lastName": "X"}, content_id="2"),
            http_part("DELETE /odata/v2/User('u0002')"),
        ),
        http_part("GET User('hl1')"),
    )
    parts = batch_answer(await send_batch(fake, login, data))
    assert len(parts) == 3

    status, headers, body = http_answer(parts[0])
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["d"]["__metadata"]["uri"] == f"{origin}/odata/v2/User('u0003')"

    assert parts[1].get_content_type() == "multipart/mixed"
    writes = message_parts(parts[1])
    answers = [http_answer(w) for w in writes]
    assert [a[0] for a in answers] == [201, 204, 204]
    assert json.loads(answers[0][2])["d"]["userId"] == "hl1"
    assert [w["Content-ID"] for w in writes] == ["1", "2", None]

    # The read after the changeset sees its writes.
    status, _, body = http_answer(parts[2])
    assert (status, json.loads(body)["d"]["firstName"]) == (200, "Hedy")
    users = fake.users()
    assert users["u0001"]["lastName"] == "X" and "u0002" not in users


async def test_a_failing_write_fails_its_changeset(fake: Fake) -> None:
    login = await fake.login()
    before = fake.users()
    data = batch_body(
        changeset(
            http_part("POST User", NEW),
            http_part("MERGE User('u0001')", {"firstName": "Changed"}),
            http_part("MERGE User('nobody')", {"firstName": "X"}),
            http_part("DELETE User('u0002')"),
        ),
        http_part("GET User('u0001')"),
    )
    parts = batch_answer(await send_batch(fake, login, data))
    # The failed changeset is answered by its error alone, and none of its writes stay.
    assert len(parts) == 2
    status, headers, body = http_answer(parts[0])
    assert status == 404
    assert json.loads(body)["error"]["code"] == "COE_RESOURCE_NOT_FOUND"
    status, _, body = http_answer(parts[1])
    assert json.loads(body)["d"]["firstName"] == before["u0001"]["firstName"]
    assert fake.users() == before


async def test_a_batch_with_bare_newlines_is_read_too(fake: Fake) -> None:
    login = await fake.login()
    data = batch_body(http_part("GET User('u0001')"), newline="\n")
    parts = batch_answer(await send_batch(fake, login, data))
    assert http_answer(parts[0])[0] == 200


BAD_BATCHES = {
    "no boundary": (BATCH_CREATE, {"Content-Type": "multipart/mixed"}, "no boundary"),
    "not multipart": (BATCH_CREATE, {"Content-Type": "application/json"}, "multipart/mixed"),
    "no close delimiter": (BATCH_CREATE.rsplit(b"--batch_1--", 1)[0], {}, "close delimiter"),
    "no parts": (b"--batch_1--\r\n", {}, "no part"),
    "a write outside a changeset": (
        batch_body(http_part("POST User", NEW)),
        {},
        "writes belong in a changeset",
    ),
    "a read inside a changeset": (
        batch_body(changeset(http_part("GET User"))),
        {},
        "a changeset holds writes only",
    ),
    "a part of another type": (
        batch_body("Content-Type: text/plain\n\nGET User HTTP/1.1"),
        {},
        "application/http",
    ),
    "no request line": (
        batch_body("Content-Type: application/http\n\nGET User"),
        {},
        "not an HTTP request line",
    ),
    "a nested changeset": (
        batch_body(changeset(changeset(http_part("POST User", NEW), boundary="cs2"))),
        {},
        "application/http",
    ),
}


@pytest.mark.parametrize(("data", "headers", "words"), BAD_BATCHES.values(), ids=BAD_BATCHES)
async def test_a_malformed_batch_is_400_and_changes_nothing(
    fake: Fake, data: bytes, headers: dict[str, str], words: str
) -> None:
    login = await fake.login()
    before = fake.users()
    answer = await send_batch(fake, login, data, **headers)
    assert_sf_error(answer, 400, "COE_GENERAL_BAD_REQUEST", "$batch", words)
    assert fake.users() == before


# ---------------------------------------------------------- throttle, counts


async def test_throttle_answers_429_with_retry_after_and_touches_nothing(fake: Fake) -> None:
    before = fake.users()
    for method, body in (("GET", None), ("POST", NEW)):
        answer = await fake.send(method, "/odata/v2/User?throttle=7", body=body)
        assert_sf_error(answer, 429, "COE_TOO_MANY_REQUESTS", "7 seconds")
        assert answer.headers["Retry-After"] == "7"
        assert "Set-Cookie" not in answer.headers
    assert fake.upstream.state.sessions_opened == 0
    assert fake.users() == before

    bad = await fake.send("GET", "/odata/v2/User?throttle=soon")
    assert_sf_error(bad, 400, "COE_GENERAL_BAD_REQUEST", "throttle")


async def test_fake_sessions_shows_the_counts(fake: Fake) -> None:
    for _ in range(3):
        await fake.send("GET", "/odata/v2/User?$top=1")
    login = await fake.login()
    await fake.send("GET", "/odata/v2/", login=login)
    # No company id needed, no session opened, not counted itself.
    async with fake.http.get(fake.upstream.url + "/fake/sessions", ssl=fake.ssl) as resp:
        assert resp.status == 200
        assert "Set-Cookie" not in resp.headers
        assert await resp.json() == {"sessions_opened": 4, "requests": 5}


async def test_the_request_log_says_whether_a_session_and_a_token_came(fake: Fake) -> None:
    login = await fake.login()
    await fake.send("POST", "/odata/v2/User", login=login, body=NEW)
    await fake.send("DELETE", "/odata/v2/User('hl1')")
    seen = [(r.method, r.path, r.session, r.token) for r in fake.upstream.state.requests]
    assert seen == [
        ("GET", "/odata/v2/", False, True),
        ("POST", "/odata/v2/User", True, True),
        ("DELETE", "/odata/v2/User('hl1')", False, False),
    ]


async def test_the_company_id_check_still_guards_odata(fake: Fake) -> None:
    login = await fake.login()
    for header in ({}, {"successfactors-companyid": "OTHER"}):
        answer = await fake.send(
            "POST",
            "/odata/v2/User",
            login=login,
            body=NEW,
            headers={"successfactors-companyid": "", **header},
        )
        assert_sf_error(answer, 401, "AuthenticationFailed", "X.509")
        assert "Set-Cookie" not in answer.headers
    assert "hl1" not in fake.users()
    assert fake.upstream.state.sessions_opened == 1


# ------------------------------------------------------ X.509 certificate mapping


def leaf_fingerprint(chain: Path) -> str:
    return fingerprint(x509.load_pem_x509_certificate(chain.read_bytes()))


async def mapping(fake: Fake) -> list[dict[str, str]]:
    answer = await fake.send("GET", "/fake/x509-mapping", headers={"successfactors-companyid": ""})
    assert answer.status == 200, answer.body
    assert b"PRIVATE" not in answer.body
    certificates: list[dict[str, str]] = answer.json()["certificates"]
    return certificates


async def test_a_renewed_certificate_is_refused_until_its_chain_is_uploaded(fake: Fake) -> None:
    renewed = fake.upstream.pki.renew_client()
    new_tls = presenting(fake.upstream, renewed.bundle)
    new_sha256 = leaf_fingerprint(renewed.chain)
    subject = "CN=sidecar-technical-user,O=SAP Cloud Platform Clients"
    demo_cert = {"subject": subject, "sha256": leaf_fingerprint(fake.upstream.pki.client_chain)}
    assert await mapping(fake) == [demo_cert]

    # Issued by the CA the TLS layer trusts, but not mapped: SuccessFactors' 401.
    refused = await fake.send("GET", "/odata/v2/User?$top=1", tls=new_tls)
    assert_sf_error(refused, 401, "AuthenticationFailed", "X.509 certificate", "not mapped")
    assert new_sha256 in refused.json()["error"]["message"]["value"]
    assert "Set-Cookie" not in refused.headers  # no login session for it
    assert fake.upstream.state.sessions_opened == 0

    # The demo user uploads the public chain, as in Security Center; no company id needed,
    # and it may come from the very certificate that is not mapped yet.
    upload = await fake.send(
        "POST", "/fake/x509-mapping", data=renewed.chain.read_bytes(), tls=new_tls,
        headers={"successfactors-companyid": "", "Content-Type": "application/x-pem-file"},
    )  # fmt: skip
    assert upload.status == 201, upload.body
    assert upload.json() == {"mapped": {"subject": subject, "sha256": new_sha256}}
    assert await mapping(fake) == [demo_cert, {"subject": subject, "sha256": new_sha256}]

    accepted = await fake.send("GET", "/odata/v2/User?$top=1", tls=new_tls)
    assert accepted.status == 200, accepted.body
    assert (await fake.send("GET", "/odata/v2/User?$top=1")).status == 200  # both work

    # Removing the old mapping (the end of a renewal) refuses the old certificate.
    fake.upstream.state.unmap(demo_cert["sha256"].lower().replace(":", ""))
    old = await fake.send("GET", "/odata/v2/User?$top=1")
    assert_sf_error(old, 401, "AuthenticationFailed", "not mapped", demo_cert["sha256"])
    assert (await fake.send("GET", "/odata/v2/User?$top=1", tls=new_tls)).status == 200


async def test_the_mapping_also_guards_paths_outside_odata(fake: Fake) -> None:
    # A probe of the upstream's root learns as much as one of the service root.
    fake.upstream.state.unmap(leaf_fingerprint(fake.upstream.pki.client_chain))
    answer = await fake.send("GET", "/")
    assert_sf_error(answer, 401, "AuthenticationFailed", "not mapped")
    fake.upstream.state.map_certificate(leaf_fingerprint(fake.upstream.pki.client_chain))
    assert (await fake.send("GET", "/")).status == 404


async def test_an_upload_other_than_a_public_chain_is_400_and_maps_nothing(fake: Fake) -> None:
    renewed = fake.upstream.pki.renew_client()
    before = await mapping(fake)
    for upload, words in (
        (renewed.bundle.read_bytes(), "holds a private key"),
        (b"not a certificate", "not a PEM certificate chain"),
    ):
        answer = await fake.send("POST", "/fake/x509-mapping", data=upload)
        assert_sf_error(answer, 400, "COE_GENERAL_BAD_REQUEST", words, "cert export-public")
    assert await mapping(fake) == before
    refused = await fake.send("GET", "/odata/v2/", tls=presenting(fake.upstream, renewed.bundle))
    assert refused.status == 401


def test_map_by_fingerprint_and_by_der_are_one_entry() -> None:
    state = FakeSuccessFactors(users=0)
    cert = x509.load_pem_x509_certificates(CA.create().cert_pem())[0]
    der = cert.public_bytes(Encoding.DER)
    hex_digits = fingerprint(cert).replace(":", "").lower()
    assert state.map_certificate(hex_digits) == fingerprint(cert)
    assert state.mapping() == [{"subject": None, "sha256": fingerprint(cert)}]
    state.map_certificate(der)  # the subject becomes known
    assert state.mapping() == [
        {"subject": cert.subject.rfc4514_string(), "sha256": fingerprint(cert)}
    ]
    assert state.is_mapped(der)
    state.unmap(der)
    assert not state.is_mapped(der) and state.mapping() == []
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        state.map_certificate("AB:CD")
