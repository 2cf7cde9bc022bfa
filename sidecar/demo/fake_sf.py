"""A small fake of the SuccessFactors OData v2 API, for the demo and the tests.

It behaves like the real mTLS API server where a client can tell: it demands
a client certificate (the TLS server context does that), answers 401 with
SuccessFactors' ``AuthenticationFailed`` error when the
``successfactors-companyid`` header is missing or wrong, pages ``/User`` on
the server side with absolute ``__next`` links, and writes every absolute
link as ``https://host:PORT/...`` with the port spelled out, as the real
service does with ``:443``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from sidecar.http_rules import COMPANY_ID_HEADER

FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")

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
      </EntityContainer>
    </Schema>
  </edmx:DataServices>
</edmx:Edmx>
"""


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"code": code, "message": {"lang": "en-US", "value": message}}}
    return web.json_response(body, status=status)


def make_users(count: int) -> list[dict[str, str]]:
    users = []
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


def fake_successfactors_app(
    *, company_id: str, users: int = 45, page_size: int = 20
) -> web.Application:
    """The OData v2 subset: service document, ``$metadata``, ``User`` and ``User('id')``."""
    people = make_users(users)
    by_id = {u["userId"]: u for u in people}

    @web.middleware
    async def authenticate(
        request: web.Request, handler: Any
    ) -> web.StreamResponse:  # pragma: no cover - trivial
        if request.headers.get(COMPANY_ID_HEADER) != company_id:
            return _error(
                401,
                "AuthenticationFailed",
                "Authentication failed: no company id matching the X.509 certificate mapping.",
            )
        response: web.StreamResponse = await handler(request)
        return response

    def origin(request: web.Request) -> str:
        host = request.host if ":" in request.host.rsplit("]", 1)[-1] else f"{request.host}:443"
        return f"https://{host}"

    def entity(request: web.Request, user: dict[str, str]) -> dict[str, Any]:
        uri = f"{origin(request)}/odata/v2/User('{user['userId']}')"
        return {
            "__metadata": {"uri": uri, "type": "SFOData.User"},
            **user,
            "manager": {"__deferred": {"uri": f"{uri}/manager"}},
        }

    async def service_document(request: web.Request) -> web.Response:
        return web.json_response({"d": {"EntitySets": ["User"]}})

    async def metadata(request: web.Request) -> web.Response:
        return web.Response(text=METADATA, content_type="application/xml")

    async def user_list(request: web.Request) -> web.Response:
        size = int(request.query.get("customPageSize", page_size))
        skip = int(request.query.get("$skiptoken", "0") or 0)
        top = request.query.get("$top")
        end = skip + size
        if top is not None:
            end = min(end, int(top))
        page = people[skip:end]
        d: dict[str, Any] = {"results": [entity(request, u) for u in page]}
        if end < len(people) and top is None:
            d["__next"] = f"{origin(request)}/odata/v2/User?$format=json&$skiptoken={end}"
            if size != page_size:
                d["__next"] += f"&customPageSize={size}"
        return web.Response(
            text=json.dumps({"d": d}), content_type="application/json", charset="utf-8"
        )

    async def user_by_id(request: web.Request) -> web.Response:
        user = by_id.get(request.match_info["id"])
        if user is None:
            return _error(404, "COE_RESOURCE_NOT_FOUND", "User not found")
        return web.json_response({"d": entity(request, user)})

    app = web.Application(middlewares=[authenticate])
    app.router.add_get("/odata/v2/", service_document)
    app.router.add_get("/odata/v2/$metadata", metadata)
    app.router.add_get("/odata/v2/User", user_list)
    app.router.add_get("/odata/v2/User('{id}')", user_by_id)
    return app
