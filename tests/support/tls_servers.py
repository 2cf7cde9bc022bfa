"""Blocking ``ssl`` test servers, each running in a thread.

An aiohttp TLS server swallows the TLS alert a rejected client certificate
causes, and cannot ask for a certificate after the handshake. These servers
use the standard library's blocking sockets instead, so a test decides
exactly when the handshake happens, which alert goes out, when the
certificate is requested and when the connection closes.

    with TLSServer(context, handler) as upstream:
        ... upstream.url, upstream.connections, upstream.requests ...

Each accepted connection gets its own thread: the handshake runs there
(``do_handshake``), a failed one is recorded in ``handshake_errors`` and the
connection is closed cleanly (our write side first, then whatever the
client still sends is drained) so the client reads the alert instead of a
TCP reset. A successful handshake hands the `ssl.SSLSocket` to ``handler``;
the handlers below read a request, answer, close, reset or ask for the
client certificate after the handshake. `ResetServer` resets every TCP
connection before any TLS.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from tests.conftest import PKI, load_chain

Handler = Callable[["TLSServer", ssl.SSLSocket], None]

IO_TIMEOUT = 10.0  # seconds any blocking socket call of a test server may wait


def server_context(
    pki: PKI,
    *,
    client_ca: bytes | None = None,
    maximum_version: ssl.TLSVersion | None = None,
    verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED,
    post_handshake_auth: bool = False,
) -> ssl.SSLContext:
    """A server context with ``pki.server``, trusting ``client_ca`` (default: our root)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    load_chain(ctx, pki.server)
    ctx.load_verify_locations(cadata=(client_ca or pki.root.cert_pem()).decode())
    ctx.verify_mode = verify_mode
    ctx.post_handshake_auth = post_handshake_auth
    return ctx


class ThreadedServer:
    """Accepts TCP connections on 127.0.0.1 (free port), one thread per connection."""

    def __init__(self) -> None:
        self.connections = 0  # TCP connections accepted
        self.requests: list[bytes] = []  # request heads read by `read_request`
        self.handshake_errors: list[ssl.SSLError] = []
        self.errors: list[BaseException] = []  # anything else a handler raised
        self.peer_certs: list[dict[str, object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"tls-server-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, unblock and join every connection thread."""
        self._stop.set()
        if self._acceptor.is_alive():
            self._acceptor.join(IO_TIMEOUT)
        self._listener.close()
        with self._lock:
            still_open = list(self._open)
        for sock in still_open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(IO_TIMEOUT)

    # ------------------------------------------------------------------ threads

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.05)
            if not ready:
                continue
            try:
                raw, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
                self._open.add(raw)
            t = threading.Thread(
                target=self._serve, args=(raw,), name=f"tls-conn-{self.port}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def _serve(self, raw: socket.socket) -> None:
        raise NotImplementedError


class ResetServer(ThreadedServer):
    """Resets every connection as soon as it is accepted (RST, not FIN)."""

    def _serve(self, raw: socket.socket) -> None:
        reset(raw)
        with self._lock:
            self._open.discard(raw)


class TLSServer(ThreadedServer):
    """A blocking TLS server: the handshake, then ``handler`` on the `ssl.SSLSocket`."""

    def __init__(self, context: ssl.SSLContext, handler: Handler | None = None) -> None:
        super().__init__()
        self.context = context
        self.handler = handler or respond

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(IO_TIMEOUT)
        conn = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        raw.detach()  # ``conn`` owns the file descriptor now
        with self._lock:
            self._open.discard(raw)
            self._open.add(conn)
        try:
            try:
                conn.do_handshake()
            except ssl.SSLError as exc:
                self.handshake_errors.append(exc)
                close_cleanly(conn)
                return
            self.handler(self, conn)
        except BaseException as exc:  # a test thread must never raise
            self.errors.append(exc)
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()


# ----------------------------------------------------------------- helpers


def close_cleanly(conn: ssl.SSLSocket) -> None:
    """Close our side, then drain until the client closes: no RST hides the alert."""
    try:
        conn.shutdown(socket.SHUT_WR)  # drops the TLS layer; the alert is already out
        while conn.recv(65536):
            pass
    except OSError:
        pass


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_request(server: TLSServer, conn: ssl.SSLSocket) -> bytes:
    """Read one request head (and a Content-Length body); record the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"client closed after {len(data)} bytes of request head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    server.requests.append(head)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def answer(conn: ssl.SSLSocket, status: int = 200, body: bytes = b"ok") -> None:
    conn.sendall(
        f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def respond(server: TLSServer, conn: ssl.SSLSocket) -> None:
    """Read one request, answer ``200 ok``, close."""
    read_request(server, conn)
    cert = conn.getpeercert()
    if cert:
        server.peer_certs.append(dict(cert))
    answer(conn)
    close_cleanly(conn)


def close_without_answer(server: TLSServer, conn: ssl.SSLSocket) -> None:
    """Read one whole request, then close the connection without a word."""
    read_request(server, conn)
    conn.unwrap()


def reset_after_request(server: TLSServer, conn: ssl.SSLSocket) -> None:
    """Read one whole request, then reset the TCP connection."""
    read_request(server, conn)
    reset(conn)


def post_handshake_auth(server: TLSServer, conn: ssl.SSLSocket) -> None:
    """TLS 1.3: read the request, then ask for the client certificate, then answer.

    The server context has ``post_handshake_auth`` and ``CERT_REQUIRED``, so the
    initial handshake asks for nothing; ``verify_client_post_handshake`` queues a
    CertificateRequest, the next write sends it, and the client's certificate is
    processed by the reads that follow (they find no application data: the
    client waits for our answer).
    """
    read_request(server, conn)
    assert not conn.getpeercert(), "the client sent a certificate during the handshake"
    conn.verify_client_post_handshake()
    conn.setblocking(False)
    deadline = time.monotonic() + IO_TIMEOUT
    try:
        conn.do_handshake()  # sends the CertificateRequest
    except ssl.SSLWantReadError:
        pass
    while not conn.getpeercert() and time.monotonic() < deadline:
        select.select([conn], [], [], 0.05)
        try:
            if conn.recv(1) == b"":
                break
        except ssl.SSLWantReadError:
            continue
    conn.setblocking(True)
    conn.settimeout(IO_TIMEOUT)
    cert = conn.getpeercert()
    if not cert:
        raise AssertionError("no client certificate after post-handshake authentication")
    server.peer_certs.append(dict(cert))
    answer(conn, body=b"authenticated after the handshake")
    close_cleanly(conn)


class AlertLosingServer(ThreadedServer):
    """A TLS 1.3 server that refuses our certificate, and the alert saying so is lost.

    The handshake runs through memory buffers, so the server decides what goes on
    the wire: not the alert its refusal produced. ``ending`` "reset" resets the TCP
    connection at once; "close" closes cleanly (FIN) and reads what the client still
    sends until it closes. That is what a client sees when the alert loses the race.
    """

    def __init__(self, context: ssl.SSLContext, ending: str) -> None:
        super().__init__()
        self.context, self.ending = context, ending

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(IO_TIMEOUT)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        try:
            while True:
                try:
                    tls.do_handshake()
                    self.errors.append(AssertionError("the certificate was accepted"))
                    return
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    data = raw.recv(65536)
                    if not data:
                        return
                    incoming.write(data)
                except ssl.SSLError as exc:
                    self.handshake_errors.append(exc)  # the alert stays in ``outgoing``
                    break
            if self.ending == "reset":
                reset(raw)
                return
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(65536):
                pass
        except OSError as exc:
            self.errors.append(exc)
        finally:
            with self._lock:
                self._open.discard(raw)
            raw.close()
