"""A small fake of the SuccessFactors OData v2 API, for the demo and the tests.

It behaves like the real mTLS API server where a client can tell:

- it demands a client certificate (the TLS server context does that) and
  answers 401 with SuccessFactors' ``AuthenticationFailed`` error when the
  ``successfactors-companyid`` header is missing or wrong;
- the X.509 certificate mapping of Security Center: only the client leaf
  certificates it holds (by SHA-256 fingerprint) are let in; any other one,
  though issued by a trusted CA, is refused with 401 ``AuthenticationFailed``
  (the renewed certificate whose chain nobody uploaded yet);
- it pages ``/User`` on the server side with absolute ``__next`` links, and
  writes every absolute link as ``https://host:PORT/...`` with the port spelled
  out, as the real service does with ``:443``;
- sessions: an answer to a request without a valid ``JSESSIONID`` cookie opens
  a new login session and sets ``JSESSIONID=<id>.<node>`` and a load balancer
  ``route`` cookie (``Path=/; Secure; HttpOnly``); a request with the cookie
  continues its session. The real service opens a session per cookie-less
  call too, which is why SAP asks integrations to reuse them;
- CSRF: a GET with ``X-CSRF-Token: Fetch`` is answered with the session's
  token in ``X-CSRF-Token``; a write (POST, PUT, PATCH, MERGE, DELETE, also as
  POST with ``X-HTTP-Method``) without the current token of its own session is
  refused with 403, ``X-CSRF-Token: Required`` and the text SAP's servers send;
- writes: create, MERGE/PATCH, PUT and DELETE of ``User``, the ``upsert``
  function import, and ``$batch`` (sidecar.demo.fake_sf_batch) with reads and
  changesets, which succeed or fail as a whole;
- throttling on request: any request whose query has ``throttle=N`` is answered
  429 with ``Retry-After: N`` and SuccessFactors' error JSON; no session is
  opened and nothing changes, only the request log records it.

`FakeSuccessFactors` holds the state (users, sessions, a log of requests, the
certificate mapping) for the tests and the demo; the app keeps it under
`FAKE_SF`. Outside ``/odata``, for the demo's user (no company id needed, any
client certificate of the CA): ``GET /fake/sessions`` shows its counts as JSON,
``POST /fake/x509-mapping`` with a PEM body maps its first certificate (the
leaf of ``cert export-public``'s chain), ``GET /fake/x509-mapping`` lists the
mapped subjects and fingerprints.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from multidict import CIMultiDict
from yarl import URL

from sidecar.credentials.certinfo import fingerprint
from sidecar.demo.fake_sf_batch import (
    BatchSyntaxError,
    Changeset,
    Reply,
    Request,
    parse_batch,
    write_batch,
)
from sidecar.http_rules import COMPANY_ID_HEADER

FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")
PROPERTIES = ("userId", "firstName", "lastName", "email")

SERVICE_ROOT = "/odata/v2/"
NODE = "mc-sfdemo-bsfapi-01"  # the node suffix of JSESSIONID, as SuccessFactors' load balancer adds
WRITES = frozenset({"POST", "PUT", "PATCH", "MERGE", "DELETE"})
FAKE_ADMIN = "/fake/"  # the demo user's calls: no certificate mapping, no company id
MAX_MAPPING_UPLOAD = 64 * 1024  # a chain of a few certificates; a key is refused anyway
# What SAP's servers answer, as text/plain, to a write without a valid token.
CSRF_REFUSAL = "CSRF token validation failed"

METADATA = """<?xml version="1.0" encoding="utf-8"?>
<edmx:Edmx Version="1.0" xmlns:edmx="http://schemas.microsoft.com/ado/2007/06/edmx">
  <edmx:DataServices m:DataServiceVersion="2.0"
      xmlns:m="http://schemas.microsoft.com/ado/2007/08/dataservices/metadata">
    <Schema Namespace="SFOData" xmlns="http://schemas.microsoft.com/ado/2008/09/edm">
      <EntityType Name="User">
        <Key><PropertyRef Name="userId"/></Key>
        <Property Name="userId" Type="Edm.String" Nullable="false"/>
        <Property Name="firstName" Type="Edm.String"/>
        <Property Name="lastName" Type="Edm.String"/>
        <Property Name="email" Type="Edm.String"/>
        <NavigationProperty Name="manager" Relationship="SFOData.user_manager"
            FromRole="user" ToRole="manager"/>
      </EntityType>
      <EntityContainer Name="EntityContainer" m:IsDefaultEntityContainer="true">
        <EntitySet Name="User" EntityType="SFOData.User"/>
        <FunctionImport Name="upsert" ReturnType="Collection(SFOData.UpsertResult)"
            m:HttpMethod="POST"/>
      </EntityContainer>
    </Schema>
  </edmx:DataServices>
</edmx:Edmx>
"""

User = dict[str, str | None]


def make_users(count: int) -> list[User]:
    users: list[User] = []
    for i in range(1, count + 1):
        first = FIRST_NAMES[i % len(FIRST_NAMES)]
        last = LAST_NAMES[(i * 7) % len(LAST_NAMES)]
        users.append(
            {
                "userId": f"u{i:04d}",
                "firstName": first,
                "lastName": last,
                "email": f"{first}.{last}{i}@example.com".lower(),
            }
        )
    return users


@dataclass(frozen=True)
class SeenRequest:
    """One request in the log: whether it brought a valid session cookie and a token."""

    method: str
    path: str
    session: bool
    token: bool


def _fingerprint_of(cert: bytes | str) -> str:
    """``AB:CD:...`` (as ``/-/status`` prints it) of a certificate's DER, or of its
    SHA-256 fingerprint in hex (colons and case optional)."""
    if isinstance(cert, bytes):
        return fingerprint(x509.load_der_x509_certificate(cert))
    digits = cert.replace(":", "").strip().upper()
    if len(digits) != 64 or any(c not in "0123456789ABCDEF" for c in digits):
        raise ValueError(f"not a SHA-256 fingerprint: {cert!r}")
    return bytes.fromhex(digits).hex(":").upper()


class FakeSuccessFactors:
    """The fake's state: the users, the login sessions and their CSRF tokens, a request
    log, and the X.509 certificate mapping (the client certificates let in)."""

    def __init__(
        self,
        *,
        users: int = 45,
        log_size: int = 1000,
        max_sessions: int = 10_000,
        check_mapping: bool = True,
    ):
        # check_mapping=False lets in any certificate the TLS layer accepted: for tests
        # about something else than the mapping, whose certificates change.
        self.check_mapping = check_mapping
        self.users: dict[str, User] = {u["userId"] or "": u for u in make_users(users)}
        self.sessions_opened = 0
        self.requests_served = 0
        self.requests: deque[SeenRequest] = deque(maxlen=log_size)
        self._tokens: dict[str, str | None] = {}  # JSESSIONID → its CSRF token, once fetched
        self._max_sessions = max_sessions
        self._mapped: dict[str, str | None] = {}  # fingerprint → subject, when known

    # ----------------------------------------------------- certificate mapping

    def map_certificate(self, cert: bytes | str) -> str:
        """Let a client certificate in (its DER, or its SHA-256 fingerprint); its fingerprint."""
        sha256 = _fingerprint_of(cert)
        subject = None
        if isinstance(cert, bytes):
            subject = x509.load_der_x509_certificate(cert).subject.rfc4514_string()
        self._mapped[sha256] = subject or self._mapped.get(sha256)
        return sha256

    def unmap(self, cert: bytes | str) -> None:
        """Refuse a client certificate from now on (its DER, or its SHA-256 fingerprint)."""
        self._mapped.pop(_fingerprint_of(cert), None)

    def is_mapped(self, der: bytes) -> bool:
        return _fingerprint_of(der) in self._mapped

    def mapping(self) -> list[dict[str, str | None]]:
        """The mapped certificates, as ``GET /fake/x509-mapping`` lists them."""
        return [{"subject": s, "sha256": f} for f, s in self._mapped.items()]

    # ------------------------------------------------------ sessions and tokens

    def has_session(self, session_id: str | None) -> bool:
        return session_id in self._tokens

    def open_session(self) -> str:
        if len(self._tokens) >= self._max_sessions:  # the oldest one times out, as on a server
            del self._tokens[next(iter(self._tokens))]
        session_id = f"{secrets.token_hex(16).upper()}.{NODE}"
        self._tokens[session_id] = None
        self.sessions_opened += 1
        return session_id

    def fetch_token(self, session_id: str) -> str:
        """The session's token, created on its first fetch (and after expire_tokens)."""
        token = self._tokens.get(session_id)
        if token is None:
            token = self._tokens[session_id] = secrets.token_urlsafe(24)
        return token

    def token_valid(self, session_id: str, token: str | None) -> bool:
        current = self._tokens.get(session_id)
        if current is None or token is None:
            return False
        return hmac.compare_digest(current.encode(), token.encode())

    def expire_tokens(self) -> None:
        """Invalidate every session's token: writes are refused until a new Fetch."""
        self._tokens = dict.fromkeys(self._tokens)

    def snapshot(self) -> dict[str, User]:
        return {user_id: dict(user) for user_id, user in self.users.items()}


FAKE_SF = web.AppKey("fake_sf", FakeSuccessFactors)


def error_reply(status: int, code: str, message: str, *headers: tuple[str, str]) -> Reply:
    """SuccessFactors' OData error JSON."""
    body = {"error": {"code": code, "message": {"lang": "en-US", "value": message}}}
    return json_reply(body, status, *headers)


def json_reply(data: Any, status: int = 200, *headers: tuple[str, str]) -> Reply:
    content_type = ("Content-Type", "application/json;charset=utf-8")
    return Reply(status, json.dumps(data).encode(), (content_type, *headers))


def as_response(reply: Reply) -> web.Response:
    return web.Response(status=reply.status, body=reply.body, headers=CIMultiDict(reply.headers))


def authentication_failed(message: str) -> web.Response:
    return as_response(
        error_reply(401, "AuthenticationFailed", f"Authentication failed: {message}")
    )


@dataclass(frozen=True)
class Call:
    """One OData request, from HTTP or from a ``$batch`` part."""

    method: str  # after X-HTTP-Method
    path: str  # below the service root: "", "$metadata", "User", "User('u0001')", ...
    query: Mapping[str, str]
    body: bytes
    origin: str  # https://host:PORT, for absolute links

    def json_body(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:  # UnicodeDecodeError is one too
            raise BadRequest(f"The request body is not valid JSON: {exc}") from exc


class BadRequest(Exception):
    """A request the fake answers with 400 and this message."""


def effective_method(method: str, headers: Mapping[str, str]) -> str:
    """POST with ``X-HTTP-Method: MERGE`` (for clients that cannot send MERGE) is a MERGE."""
    tunnelled = headers.get("X-HTTP-Method", "").strip().upper()
    return tunnelled if method == "POST" and tunnelled else method


class ODataService:
    """What the fake answers, apart from HTTP: one `answer` per call, also for batch parts."""

    ENTITY = re.compile(r"User\('([^']*)'\)")

    def __init__(self, state: FakeSuccessFactors, *, page_size: int) -> None:
        self.state = state
        self.page_size = page_size

    def answer(self, call: Call) -> Reply:
        try:
            return self._route(call)
        except BadRequest as exc:
            return error_reply(400, "COE_GENERAL_BAD_REQUEST", str(exc))

    def _route(self, call: Call) -> Reply:
        entity = self.ENTITY.fullmatch(call.path)
        routes: dict[str, Callable[[], Reply]]
        if call.path == "":
            routes = {"GET": lambda: json_reply({"d": {"EntitySets": ["User"]}})}
        elif call.path == "$metadata":
            xml = ("Content-Type", "application/xml;charset=utf-8")
            routes = {"GET": lambda: Reply(200, METADATA.encode(), (xml,))}
        elif call.path == "User":
            routes = {"GET": lambda: self.user_list(call), "POST": lambda: self.create(call)}
        elif entity is not None:
            user_id = entity.group(1)
            routes = {
                "GET": lambda: self.read(call, user_id),
                "MERGE": lambda: self.update(call, user_id, replace=False),
                "PATCH": lambda: self.update(call, user_id, replace=False),
                "PUT": lambda: self.update(call, user_id, replace=True),
                "DELETE": lambda: self.delete(user_id),
            }
        elif call.path == "upsert":
            routes = {"POST": lambda: self.upsert(call)}
        else:
            return error_reply(404, "COE_RESOURCE_NOT_FOUND", f"Resource not found: {call.path}")
        route = routes.get(call.method)
        if route is None:
            return error_reply(
                405,
                "COE_METHOD_NOT_ALLOWED",
                f"{call.method} is not supported on {call.path or 'the service root'}; "
                f"supported: {', '.join(routes)}",
            )
        return route()

    # ------------------------------------------------------------------ reads

    def entity(self, origin: str, user: User) -> dict[str, Any]:
        uri = f"{origin}{SERVICE_ROOT}User('{user['userId']}')"
        return {
            "__metadata": {"uri": uri, "type": "SFOData.User"},
            **user,
            "manager": {"__deferred": {"uri": f"{uri}/manager"}},
        }

    def user_list(self, call: Call) -> Reply:
        people = list(self.state.users.values())
        try:
            size = int(call.query.get("customPageSize", self.page_size))
            skip = int(call.query.get("$skiptoken", "0") or 0)
            top = call.query.get("$top")
            end = min(skip + size, int(top)) if top is not None else skip + size
        except ValueError as exc:
            raise BadRequest(f"customPageSize, $skiptoken and $top take numbers: {exc}") from exc
        page = people[skip:end]
        d: dict[str, Any] = {"results": [self.entity(call.origin, u) for u in page]}
        if end < len(people) and top is None:
            d["__next"] = f"{call.origin}{SERVICE_ROOT}User?$format=json&$skiptoken={end}"
            if size != self.page_size:
                d["__next"] += f"&customPageSize={size}"
        return json_reply({"d": d})

    def read(self, call: Call, user_id: str) -> Reply:
        user = self.state.users.get(user_id)
        if user is None:
            return not_found(user_id)
        return json_reply({"d": self.entity(call.origin, user)})

    # ----------------------------------------------------------------- writes

    def create(self, call: Call) -> Reply:
        user = properties(call.json_body())
        user_id = user.get("userId")
        if not user_id:
            raise BadRequest("userId is required to create a User")
        if user_id in self.state.users:
            raise BadRequest(f"User('{user_id}') exists already; use MERGE or upsert")
        self.state.users[user_id] = {p: user.get(p) for p in PROPERTIES}
        body = self.entity(call.origin, self.state.users[user_id])
        location = ("Location", body["__metadata"]["uri"])
        return json_reply({"d": body}, 201, location)

    def update(self, call: Call, user_id: str, *, replace: bool) -> Reply:
        user = self.state.users.get(user_id)
        if user is None:
            return not_found(user_id)
        changes = properties(call.json_body())
        if changes.get("userId", user_id) != user_id:
            raise BadRequest(f"userId cannot change from {user_id!r} to {changes['userId']!r}")
        if replace:  # PUT: the properties not sent are cleared
            changes = {p: changes.get(p) for p in PROPERTIES}
        user.update(changes, userId=user_id)
        return Reply(204)

    def delete(self, user_id: str) -> Reply:
        if self.state.users.pop(user_id, None) is None:
            return not_found(user_id)
        return Reply(204)

    def upsert(self, call: Call) -> Reply:
        """SuccessFactors' upsert: 200 with one result per entity, each OK or ERROR."""
        sent = call.json_body()
        entities = sent if isinstance(sent, list) else [sent]
        results = []
        for index, item in enumerate(entities):
            key: str | None = None
            try:
                user = properties(item)
                user_id = user.get("userId") or key_from_uri(item)
                key = f"User/userId='{user_id}'"
                existing = self.state.users.setdefault(user_id, dict.fromkeys(PROPERTIES))
                existing.update(user, userId=user_id)
                outcome = {"status": "OK", "editStatus": "UPSERTED", "message": None}
                code = 204
            except BadRequest as exc:
                outcome = {"status": "ERROR", "editStatus": None, "message": str(exc)}
                code = 400
            results.append(
                {"key": key, **outcome, "index": index, "httpCode": code, "inlineResults": None}
            )
        return json_reply({"d": results})

    # ----------------------------------------------------------------- $batch

    def run(self, operation: Request | Changeset, origin: str) -> Reply | list[Reply]:
        """A batch read's reply; a changeset's replies, or its first error after undoing it."""
        if isinstance(operation, Request):
            return self.answer_part(operation, origin)
        before = self.state.snapshot()
        replies = []
        for request in operation.requests:
            reply = self.answer_part(request, origin)
            if reply.status >= 400:  # a changeset succeeds or fails as a whole
                self.state.users = before
                return reply
            replies.append(reply)
        return replies

    def answer_part(self, request: Request, origin: str) -> Reply:
        target = URL(request.target)  # relative to the service root, or absolute
        call = Call(
            method=effective_method(request.method, request.headers),
            path=target.path.removeprefix(SERVICE_ROOT),
            query=target.query,
            body=request.body,
            origin=origin,
        )
        reply = self.answer(call)
        return Reply(reply.status, reply.body, reply.headers, request.content_id)


def not_found(user_id: str) -> Reply:
    return error_reply(404, "COE_RESOURCE_NOT_FOUND", f"User('{user_id}') not found")


def properties(sent: Any) -> User:
    """The User properties of a JSON entity, checked; ``__metadata`` and links are ignored."""
    if not isinstance(sent, dict):
        raise BadRequest(f"A User entity must be a JSON object, not {type(sent).__name__}")
    user = {k: v for k, v in sent.items() if not k.startswith("__") and k != "manager"}
    unknown = sorted(set(user) - set(PROPERTIES))
    if unknown:
        raise BadRequest(f"Invalid property names: {', '.join(f'User/{k}' for k in unknown)}")
    wrong = sorted(k for k, v in user.items() if v is not None and not isinstance(v, str))
    if wrong:
        raise BadRequest(f"Edm.String properties take strings: {', '.join(wrong)}")
    return user


def key_from_uri(sent: dict[str, Any]) -> str:
    uri = (
        sent.get("__metadata", {}).get("uri") if isinstance(sent.get("__metadata"), dict) else None
    )
    found = ODataService.ENTITY.search(str(uri or ""))
    if found is None:
        raise BadRequest("An upserted User needs userId or __metadata.uri like User('id')")
    return found.group(1)


def origin(request: web.Request) -> str:
    host = request.host if ":" in request.host.rsplit("]", 1)[-1] else f"{request.host}:443"
    return f"https://{host}"


def peer_certificate(request: web.Request) -> bytes | None:
    """The DER of the client certificate of the request's TLS connection."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None


def leaf_of_upload(body: bytes) -> x509.Certificate:
    """The first certificate of an uploaded PEM chain; a private key is refused."""
    if b"PRIVATE KEY-----" in body:
        raise BadRequest(
            "the upload holds a private key: upload the public chain only, "
            "from 'mtls-sidecar cert export-public FILE'"
        )
    try:
        return x509.load_pem_x509_certificates(body)[0]
    except ValueError as exc:
        raise BadRequest(
            f"the upload is not a PEM certificate chain ({exc}): upload the file "
            "'mtls-sidecar cert export-public FILE' writes"
        ) from exc


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fake_successfactors_app(
    *,
    company_id: str,
    users: int = 45,
    page_size: int = 20,
    state: FakeSuccessFactors | None = None,
) -> web.Application:
    """The OData v2 subset: service document, ``$metadata``, ``User``, ``upsert``, ``$batch``."""
    state = state if state is not None else FakeSuccessFactors(users=users)
    service = ODataService(state, page_size=page_size)

    def odata(request: web.Request) -> bool:
        return request.path.startswith("/odata/")

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if odata(request):
            state.requests_served += 1
            session = state.has_session(request.cookies.get("JSESSIONID"))
            token = "X-CSRF-Token" in request.headers
            state.requests.append(SeenRequest(request.method, request.path, session, token))
        return await handler(request)

    @web.middleware
    async def throttle(request: web.Request, handler: Handler) -> web.StreamResponse:
        seconds = request.query.get("throttle")
        if seconds is None:
            return await handler(request)
        if not seconds.isdigit():
            reply = error_reply(400, "COE_GENERAL_BAD_REQUEST", "throttle takes whole seconds")
        else:
            message = f"Too many requests: rate limit exceeded, retry after {seconds} seconds."
            retry = ("Retry-After", seconds)
            reply = error_reply(429, "COE_TOO_MANY_REQUESTS", message, retry)
        return as_response(reply)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(FAKE_ADMIN):
            return await handler(request)
        der = peer_certificate(request)
        if state.check_mapping and (der is None or not state.is_mapped(der)):
            what = (
                "no client certificate was presented" if der is None
                else f"the X.509 certificate {_fingerprint_of(der)} is not mapped to a user"
            )  # fmt: skip
            return authentication_failed(
                f"{what}; upload its public chain to the X.509 certificate mapping "
                "in Security Center."
            )
        if odata(request) and request.headers.get(COMPANY_ID_HEADER) != company_id:
            return authentication_failed("no company id matching the X.509 certificate mapping.")
        return await handler(request)

    @web.middleware
    async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not odata(request):
            return await handler(request)
        session_id = request.cookies.get("JSESSIONID", "")
        new_session = not state.has_session(session_id)
        if new_session:
            session_id = state.open_session()
        method = effective_method(request.method, request.headers)
        response: web.StreamResponse
        if method in WRITES and not state.token_valid(
            session_id, request.headers.get("X-CSRF-Token")
        ):
            response = web.Response(
                status=403, text=CSRF_REFUSAL, headers={"X-CSRF-Token": "Required"}
            )
        else:
            response = await handler(request)
            fetch = request.headers.get("X-CSRF-Token", "").lower() == "fetch"
            if fetch and request.method in ("GET", "HEAD"):
                response.headers["X-CSRF-Token"] = state.fetch_token(session_id)
        if new_session:  # like SuccessFactors: the session, and the load balancer's route
            response.set_cookie("JSESSIONID", session_id, path="/", secure=True, httponly=True)
            route = secrets.token_hex(20)
            response.set_cookie("route", route, path="/", secure=True, httponly=True)
        return response

    async def call_of(request: web.Request) -> Call:
        return Call(
            method=effective_method(request.method, request.headers),
            path=request.path.removeprefix(SERVICE_ROOT),
            query=request.query,
            body=await request.read(),
            origin=origin(request),
        )

    async def odata_handler(request: web.Request) -> web.Response:
        return as_response(service.answer(await call_of(request)))

    async def batch(request: web.Request) -> web.Response:
        call = await call_of(request)
        if call.method != "POST":
            return as_response(error_reply(405, "COE_METHOD_NOT_ALLOWED", "$batch takes POST"))
        try:
            operations = parse_batch(call.body, request.headers.get("Content-Type", ""))
        except BatchSyntaxError as exc:
            return as_response(error_reply(400, "COE_GENERAL_BAD_REQUEST", f"$batch: {exc}"))
        body, content_type = write_batch([service.run(op, call.origin) for op in operations])
        return web.Response(status=202, body=body, headers={"Content-Type": content_type})

    async def fake_sessions(request: web.Request) -> web.Response:
        counts = {"sessions_opened": state.sessions_opened, "requests": state.requests_served}
        return web.json_response(counts)

    async def list_mapping(request: web.Request) -> web.Response:
        return web.json_response({"certificates": state.mapping()})

    async def add_mapping(request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_MAPPING_UPLOAD:
            message = f"the upload is larger than {MAX_MAPPING_UPLOAD} bytes: a chain is smaller"
            return as_response(error_reply(413, "COE_GENERAL_BAD_REQUEST", message))
        try:
            leaf = leaf_of_upload(await request.read())
        except BadRequest as exc:
            return as_response(error_reply(400, "COE_GENERAL_BAD_REQUEST", str(exc)))
        sha256 = state.map_certificate(leaf.public_bytes(Encoding.DER))
        mapped = {"subject": leaf.subject.rfc4514_string(), "sha256": sha256}
        return web.json_response({"mapped": mapped}, status=201)

    app = web.Application(
        middlewares=[record, throttle, authenticate, sessions], client_max_size=8 * 1024**2
    )
    app[FAKE_SF] = state
    app.router.add_route("*", "/odata/v2/$batch", batch)
    app.router.add_route("*", "/odata/v2/{path:.*}", odata_handler)
    app.router.add_get(FAKE_ADMIN + "sessions", fake_sessions)
    app.router.add_get(FAKE_ADMIN + "x509-mapping", list_mapping)
    app.router.add_post(FAKE_ADMIN + "x509-mapping", add_mapping)
    return app
