"""``run``, ``healthcheck`` and ``check --probe`` as users and containers run them.

``run`` and ``healthcheck`` run as real ``python -m sidecar`` processes: the
signal handling, the exit codes and the one-line errors on stderr are only
real there. The upstreams are the threaded blocking TLS servers of
tests.support.tls_servers, so every test here is synchronous and nothing waits on a
bare sleep: the tests wait on the sidecar's "listening on" log line, on
events the upstream sets, or poll with a deadline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PKI, free_port
from tests.support.process import (
    SHUTDOWN,
    SidecarProcess,
    check_probe,
    run_cli,
    write_config,
    write_files,
)
from tests.support.tls_servers import TLSServer, answer, read_request, respond, server_context

# ------------------------------------------------------------------ helpers


def get(port: int, path: str, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


# ----------------------------------------------------------- a running sidecar


@dataclass
class Served:
    port: int
    upstream: TLSServer
    process: SidecarProcess


@pytest.fixture(scope="module")
def served(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``run`` process in front of a threaded upstream, shared by the module."""
    directory = tmp_path_factory.mktemp("served")
    write_files(directory, pki)
    with TLSServer(server_context(pki), respond) as upstream:
        port = free_port()
        config = write_config(directory, upstream=upstream.url, port=port)
        process = SidecarProcess("run", "-c", str(config), cwd=directory)
        try:
            process.wait_listening()
            yield Served(port, upstream, process)
        finally:
            process.stop()


def test_run_serves_a_request_end_to_end(served: Served) -> None:
    before = len(served.upstream.requests)
    status, headers, body = get(served.port, "/odata/v2/User?$top=1")
    assert (status, body) == (200, b"ok")
    assert headers.get("X-Request-ID")
    head = served.upstream.requests[before].decode()
    assert head.startswith("GET /odata/v2/User?$top=1 HTTP/1.1")
    assert "successfactors-companyid: ACME1234" in head
    (cert, *_) = served.upstream.peer_certs
    assert dict(pair[0] for pair in cert["subject"])["commonName"] == "sidecar-technical-user"  # type: ignore[attr-defined]
    assert "Traceback" not in served.process.output


def test_run_raises_a_low_open_files_limit_and_holds_many_connections(
    pki: PKI, tmp_path: Path
) -> None:
    """Started with a soft limit of 128 open files, as some containers are: 300 clients."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-files limit here is {hard}")
    write_files(tmp_path, pki)
    clients = 300
    with TLSServer(server_context(pki), respond) as upstream:
        port = free_port()
        config = write_config(tmp_path, upstream=upstream.url, port=port)
        process = SidecarProcess("run", "-c", str(config), cwd=tmp_path, open_files=128)
        try:
            process.wait_listening()
            limits = Path(f"/proc/{process.proc.pid}/limits").read_text()
            soft = next(line for line in limits.splitlines() if line.startswith("Max open files"))
            assert int(soft.split()[3]) > clients + 100, soft
            answers = _many_at_once(port, clients)
        finally:
            process.stop()
    assert answers == [200] * clients
    assert "Too many open files" not in process.output
    assert "Traceback" not in process.output


def _many_at_once(port: int, n: int) -> list[int]:
    """Open ``n`` connections first, then send a request on each: all are open at once."""
    conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    try:
        for i, conn in enumerate(conns):
            conn.sendall(b"GET /many/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i)
        statuses = []
        for conn in conns:
            answer = b""
            while b"\r\n" not in answer:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
            statuses.append(int(answer.split(b" ", 2)[1]) if answer else 0)
        return statuses
    finally:
        for conn in conns:
            conn.close()


def test_healthcheck_against_a_running_sidecar(served: Served, tmp_path: Path) -> None:
    result = run_cli(
        "healthcheck", "--url", f"http://127.0.0.1:{served.port}/-/ready", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout


def test_healthcheck_against_a_closed_port(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/-/ready"
    result = run_cli("healthcheck", "--url", url, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not reachable" in lines[0] and url in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------- lifecycle


def test_sigterm_lets_a_slow_request_finish_and_refuses_new_connections(
    pki: PKI, tmp_path: Path
) -> None:
    received = threading.Event()

    def slow(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        received.set()
        threading.Event().wait(1.5)  # the upstream is slow, the test waits on events
        answer(conn, body=b"slow but complete")

    write_files(tmp_path, pki)
    port = free_port()
    with TLSServer(server_context(pki), slow) as upstream, ThreadPoolExecutor(1) as pool:
        config = write_config(tmp_path, upstream=upstream.url, port=port)
        process = SidecarProcess("run", "-c", str(config), cwd=tmp_path)
        try:
            process.wait_listening()
            in_flight = pool.submit(get, port, "/slow")
            assert received.wait(10), process.output

            process.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            deadline = signalled + SHUTDOWN
            while not refuses_connections(port):
                assert time.monotonic() < deadline, "still accepting after SIGTERM"
                time.sleep(0.02)
            assert not in_flight.done(), "the slow request ended before new ones were refused"

            status, _, body = in_flight.result(timeout=10)
            assert (status, body) == (200, b"slow but complete")
            assert process.proc.wait(SHUTDOWN + 5) == 0, process.output
            assert time.monotonic() - signalled < SHUTDOWN + 1
        finally:
            process.stop()
    assert "Traceback" not in process.output


def test_sigterm_exits_within_the_shutdown_timeout_when_a_request_is_slower(
    pki: PKI, tmp_path: Path
) -> None:
    shutdown = 1.5
    received = threading.Event()
    release = threading.Event()

    def stuck(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        received.set()
        release.wait(20)

    write_files(tmp_path, pki)
    port = free_port()
    with TLSServer(server_context(pki), stuck) as upstream, ThreadPoolExecutor(1) as pool:
        config = write_config(tmp_path, upstream=upstream.url, port=port)
        text = config.read_text().replace(f"shutdown: {SHUTDOWN}s", f"shutdown: {shutdown}s")
        config.write_text(text)
        process = SidecarProcess("run", "-c", str(config), cwd=tmp_path)
        try:
            process.wait_listening()
            in_flight = pool.submit(get, port, "/stuck")
            assert received.wait(10), process.output
            process.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert process.proc.wait(4 * shutdown + 5) == 0, process.output
            took = time.monotonic() - signalled
            # The client is cut off, never told the request succeeded.
            with pytest.raises((http.client.HTTPException, OSError)):
                in_flight.result(timeout=10)
        finally:
            release.set()
            process.stop()
    assert took < shutdown + 1, f"exited {took:.2f}s after SIGTERM (shutdown: {shutdown}s)"


# ---------------------------------------------------------- errors at startup


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mtls-sidecar: error: ")
    return lines[0]


def test_run_with_an_expired_certificate_exits_2(pki: PKI, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = pki.intermediate.client(
        not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    write_files(tmp_path, pki)
    bundle = tmp_path / "expired.pem"
    bundle.write_bytes(expired.btp_bundle())
    bundle.chmod(0o600)
    config = write_config(
        tmp_path, upstream="https://localhost:1", port=free_port(), pem="expired.pem"
    )
    line = _one_line_error(run_cli("run", "-c", str(config), cwd=tmp_path))
    assert "expired.pem" in line and "expired on" in line
    assert "hint:" in line


def test_run_with_a_missing_certificate_file_exits_2(pki: PKI, tmp_path: Path) -> None:
    write_files(tmp_path, pki)
    config = write_config(
        tmp_path, upstream="https://localhost:1", port=free_port(), pem="missing.pem"
    )
    line = _one_line_error(run_cli("run", "-c", str(config), cwd=tmp_path))
    assert "missing.pem" in line and "not found" in line


def test_run_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    line = _one_line_error(run_cli("run", "-c", "nowhere.yaml", cwd=tmp_path))
    assert "nowhere.yaml" in line and "not found" in line


def test_run_on_a_port_in_use_exits_2(pki: PKI, tmp_path: Path) -> None:
    write_files(tmp_path, pki)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = write_config(tmp_path, upstream="https://localhost:1", port=port)
        line = _one_line_error(run_cli("run", "-c", str(config), cwd=tmp_path))
    assert f"routes[0].listen: cannot listen on 127.0.0.1:{port}" in line
    assert "address already in use" in line


# ------------------------------------------------------------------ check --probe


def test_check_probe_accepted(pki: PKI, tmp_path: Path) -> None:
    write_files(tmp_path, pki)
    with TLSServer(server_context(pki), respond) as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config)
    assert code == 0, output
    assert "certificate:  ACCEPTED" in output
    assert "HTTP status 200" in output
    assert len(upstream.peer_certs) == 1


def test_check_probe_reports_the_negotiated_protocol(pki: PKI, tmp_path: Path) -> None:
    write_files(tmp_path, pki)
    with TLSServer(server_context(pki), respond) as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config)
    assert code == 0, output
    assert "probe:        handshake TLSv1.3 TLS_" in output


def test_check_probe_rejected(pki: PKI, tmp_path: Path) -> None:
    write_files(tmp_path, pki)
    ctx = server_context(pki, client_ca=pki.other_ca.cert_pem())
    with TLSServer(ctx, respond) as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config)
    assert code == 1, output
    assert "NOT ACCEPTED" in output
    assert "rejected the client certificate" in output
    assert "Security Center" in output
    assert upstream.handshake_errors


def test_check_probe_401_is_not_accepted(pki: PKI, tmp_path: Path) -> None:
    def unauthorized(server: TLSServer, conn: ssl.SSLSocket) -> None:
        read_request(server, conn)
        answer(conn, 401, b'{"error": {"code": "AuthenticationFailed"}}')

    write_files(tmp_path, pki)
    with TLSServer(server_context(pki), unauthorized) as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config)
    assert code == 1, output
    assert "HTTP status 401" in output and "NOT ACCEPTED" in output
    assert "company id" in output and "X.509 certificate mapping" in output


def test_check_probe_unreachable(pki: PKI, tmp_path: Path) -> None:
    write_files(tmp_path, pki)
    config = write_config(tmp_path, upstream=f"https://localhost:{free_port()}", port=free_port())
    code, output = check_probe(config)
    assert code == 1, output
    assert "NOT ACCEPTED" in output
    assert "cannot connect" in output


# ------------------------------------------------------------------ the event loop


def _loop_of_the_runner() -> type:
    from sidecar.cli import _event_loop_runner

    seen: list[type] = []

    async def record() -> None:
        seen.append(type(asyncio.get_running_loop()))

    _event_loop_runner()(record())
    return seen[0]


def test_run_uses_asyncio_where_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS without the `speed` extra, and Windows (uvloop has no Windows build)."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    loop_class = _loop_of_the_runner()
    assert loop_class.__module__.startswith("asyncio.")


def test_run_uses_uvloop_when_it_is_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert _loop_of_the_runner() is uvloop.Loop
