"""An mTLS upstream with an X.509 certificate mapping, switchable while it runs.

SuccessFactors accepts a client certificate only once its chain is uploaded
to the X.509 mapping. `MappedUpstream` plays that part for the tests of a
renewal: it answers the certificates it maps with ``200 {"serial": "<decimal>"}``
and refuses the others, one of two ways (``refuse``):

- ``"http400"``: the handshake succeeds, the answer is nginx's ``400 No required
  SSL certificate was sent`` page (what a front proxy answers);
- ``"alert"``: the handshake fails with a TLS alert. Python's ``ssl`` has no
  verify callback, so the refusal is by CA: the server trusts only the roots of
  the mapped certificates, and a certificate to be refused must come from
  another CA (``pki.other_ca``).

    with MappedUpstream(pki, [pki.client], refuse="alert") as upstream:
        ... upstream.url ...
        upstream.map(renewed)       # from now on, new connections accept it too
        upstream.seen               # [(path, serial)] of every request that arrived

It is the blocking `TLSServer` of tests/support/tls_servers.py (so an alert
really goes out), keeping connections alive as the real one does.

`Load`: concurrent request loops through the sidecar for the
whole of a test, recording every answer, so a test can assert that none failed.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from sidecar.demo.pki import Issued
from tests.conftest import PKI, eventually
from tests.support.tls_servers import TLSServer, read_request, server_context

Refusal = Literal["http400", "alert"]

NGINX_400 = (
    b"<html>\r\n<head><title>400 No required SSL certificate was sent</title></head>\r\n"
    b"<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
    b"<center>No required SSL certificate was sent</center>\r\n"
    b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


class MappedUpstream(TLSServer):
    """Answers the mapped client certificates, refuses the others (see the module)."""

    def __init__(self, pki: PKI, mapped: Iterable[Issued], *, refuse: Refusal) -> None:
        self.pki = pki
        self.refuse = refuse
        self.mapped: list[Issued] = []
        self.seen: list[tuple[str, int]] = []  # (path, client certificate serial)
        super().__init__(server_context(pki), self._serve_requests)
        for issued in mapped:
            self.map(issued)

    def map(self, issued: Issued) -> None:
        """Accept ``issued`` from now on (connections opened before keep their verdict)."""
        self.mapped.append(issued)
        if self.refuse == "alert":
            roots = {_root(i).fingerprint(hashes.SHA256()): _root(i) for i in self.mapped}
            pems = b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots.values())
            self.context = server_context(self.pki, client_ca=pems)

    def serials(self, path: str | None = None) -> list[int]:
        """Serials of the requests that arrived (at ``path`` only, when given)."""
        return [serial for p, serial in self.seen if path is None or p == path]

    def _serve_requests(self, server: TLSServer, conn: ssl.SSLSocket) -> None:
        der = conn.getpeercert(binary_form=True)
        assert der, "the context demands a client certificate"
        serial = x509.load_der_x509_certificate(der).serial_number
        while True:
            try:
                head = read_request(server, conn)
            except OSError:  # the client closed its keep-alive connection (or reset it)
                return
            path = head.split(b" ", 2)[1].decode()
            self.seen.append((path, serial))
            if serial in {i.cert.serial_number for i in self.mapped}:
                _answer(conn, 200, json.dumps({"serial": str(serial)}).encode(), "application/json")
            else:
                _answer(conn, 400, NGINX_400, "text/html")


def _answer(conn: ssl.SSLSocket, status: int, body: bytes, content_type: str) -> None:
    conn.sendall(
        f"HTTP/1.1 {status} X\r\nServer: nginx\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _root(issued: Issued) -> x509.Certificate:
    return issued.parents[-1] if issued.parents else issued.cert


@dataclass
class Load:
    """``loops`` concurrent GETs of ``url`` (the sidecar) until the block ends.

    async with Load(f"{running.url}/x") as traffic:
        ...
    assert traffic.failures() == []
    """

    url: str
    loops: int = 4
    answers: list[tuple[int | None, int | None]] = field(default_factory=list)  # status, serial
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(), name=f"load-{i}") for i in range(self.loops)]
        await eventually(lambda: len(self.answers) >= 2 * self.loops, within=5.0, what="traffic")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                async with self._session.get(self.url) as resp:
                    body = await resp.read()
                    serial = int(json.loads(body)["serial"]) if resp.status == 200 else None
                    self.answers.append((resp.status, serial))
            except (aiohttp.ClientError, ValueError, KeyError):
                self.answers.append((None, None))

    def failures(self) -> list[tuple[int | None, int | None]]:
        return [a for a in self.answers if a[0] != 200]

    def serials(self) -> list[int]:
        """The serials the answers came back with, in order, each once in a row."""
        runs: list[int] = []
        for _, serial in self.answers:
            if serial is not None and (not runs or runs[-1] != serial):
                runs.append(serial)
        return runs

    async def more(self, n: int = 20) -> None:
        """Wait for ``n`` more answers (the traffic goes on across the step just taken)."""
        target = len(self.answers) + n
        await eventually(lambda: len(self.answers) >= target, within=5.0, what=f"{n} more answers")
