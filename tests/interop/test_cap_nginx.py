"""The sidecar among software nobody here wrote, used as its users use it.

A real OData V2 server (SAP CAP with ``@cap-js-community/odata-v2-adapter``,
from tests/interop/cap) behind nginx with ``ssl_verify_client on``, the
sidecar in front of nginx as ``python -m sidecar run -c FILE``, and pyodata,
requests, curl and newman as clients. CAP, nginx and the sidecar start once
for the module; the certificates come from the session's throwaway PKI
(tests/conftest.py).

What the fakes elsewhere cannot prove: that CAP's server-driven paging
(``__next``) and ``__metadata.uri`` links come back at the origin each client
used, port included, in reverse-proxy and ``http_proxy`` mode; that nginx
sees the company id; and how real nginx refuses a client certificate (an HTTP
400 page, never a failed handshake) — which the sidecar must report as 502
``client_certificate_rejected``, and ``check --probe`` as rejected.

On a developer machine without Node.js, nginx or the npm packages the module
skips and says what to install; under ``CI=true`` with npm present anything
missing is a failure, so CI cannot pass by skipping it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn
from unittest import mock

import pytest

from sidecar.demo.pki import Issued
from tests.conftest import PKI, ROOT, free_port, missing_tool, write_private
from tests.support.process import SidecarProcess, run_cli

HERE = Path(__file__).resolve().parent
CAP_DIR = HERE / "cap"
CAP_SERVE = CAP_DIR / "node_modules" / ".bin" / "cds-serve"
COLLECTION = HERE / "users.postman_collection.json"

COMPANY_ID = "ACME1234"
SERVICE = "/odata/v2/sf/"  # CAP serves `service SFService @path: 'sf'` here through the adapter
USERS = 250  # the users cap/srv/service.js serves
PAGE = 100  # cds.query.limit in cap/package.json: CAP pages with __next beyond this
START_TIMEOUT = 30.0  # seconds for CAP (Node.js, the CDS compiler) to listen
IO_TIMEOUT = 15.0

NO_CERT_TITLE = "No required SSL certificate was sent"
BAD_CERT_TITLE = "The SSL certificate error"


# ---------------------------------------------------------------- what must be there


def unavailable(what: str) -> NoReturn:
    """Skip on a developer machine; fail under CI with npm present, where .ci/run installs it."""
    missing_tool(what, ci_installs_it=shutil.which("npm") is not None)


@pytest.fixture(scope="module")
def tools() -> None:
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("Node.js and npm are not installed: the CAP server needs them")
    if not shutil.which("nginx"):
        unavailable("nginx is not installed (apt-get install nginx)")
    if not CAP_SERVE.exists():
        unavailable(
            f"the CAP packages are not installed: npm ci --prefix {CAP_DIR.relative_to(ROOT)}"
        )
    if not shutil.which("curl"):
        unavailable("curl is not installed")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], object], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------- CAP, nginx, sidecar


class Process:
    """A child process whose output goes to a file, shown when something fails."""

    def __init__(self, args: list[str], *, log: Path, **kwargs: Any) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kwargs
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def cap(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """CAP on 127.0.0.1, plain HTTP as an app server behind nginx; yields its port."""
    port = free_port()
    log = tmp_path_factory.mktemp("cap") / "cap.log"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PORT=str(port), CDS_ENV="development", NO_UPDATE_NOTIFIER="1")
    server = Process([str(CAP_SERVE)], log=log, cwd=CAP_DIR, env=env)
    try:
        wait_until(
            lambda: listening(port) or server.proc.poll() is not None,
            within=START_TIMEOUT,
            what=f"CAP listening on {port}",
        )
        assert server.proc.poll() is None, f"CAP exited:\n{server.output()}"
        yield port
    finally:
        server.stop()


@dataclass
class Nginx:
    """nginx with mTLS in front of CAP: started, stopped and restarted by the tests."""

    directory: Path
    port: int
    process: Process | None = None

    def start(self) -> None:
        conf = self.directory / "nginx.conf"
        self.process = Process(
            ["nginx", "-p", str(self.directory), "-c", str(conf), "-e", "error.log"],
            log=self.directory / "nginx.out",
        )
        wait_until(
            lambda: listening(self.port) or self.process is None or self.process.proc.poll(),
            within=IO_TIMEOUT,
            what=f"nginx listening on {self.port}",
        )
        assert self.process.proc.poll() is None, self.log()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGQUIT)  # nginx's graceful shutdown
            self.process = None

    def log(self) -> str:
        return (self.directory / "error.log").read_text(errors="replace")


def nginx_conf(directory: Path, *, port: int, nocert_port: int, cap_port: int) -> str:
    """One mTLS server as SAP runs it, and one whose client-certificate request our key
    cannot answer (RSA signatures only, our key is EC: OpenSSL then sends no certificate)."""
    tls = f"""
        ssl_certificate {directory}/server.pem;
        ssl_certificate_key {directory}/server.key;
        ssl_client_certificate {directory}/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;  # leaf, the intermediate, the root
        ssl_protocols TLSv1.2 TLSv1.3;
    """
    location = f"""
        location / {{
            # SuccessFactors needs the company id; the sidecar sets it from the route.
            if ($http_successfactors_companyid != "{COMPANY_ID}") {{ return 401; }}
            proxy_pass http://127.0.0.1:{cap_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # CAP writes its links with the origin nginx is reached at: https, this port.
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto https;
        }}
    """
    return f"""
daemon off;
master_process on;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    scgi_temp_path {directory}/scgi;
    uwsgi_temp_path {directory}/uwsgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        {tls}
        {location}
    }}
    server {{
        listen 127.0.0.1:{nocert_port} ssl;
        {tls}
        ssl_conf_command ClientSignatureAlgorithms RSA-PSS+SHA256:RSA+SHA256;
        {location}
    }}
}}
"""


# The sidecar's routes, all to nginx: name -> (nginx server, client identity, CA file trusted).
ROUTES = {
    "good": ("main", "client", "ca.pem"),
    "untrusted": ("main", "client", "other-ca.pem"),  # nginx's CA is not the one configured
    "foreign": ("main", "foreign", "ca.pem"),  # nginx: 400 "The SSL certificate error"
    "nocert": ("nocert", "client", "ca.pem"),  # nginx: 400 "No required SSL certificate was sent"
}


@dataclass
class Stack:
    """Everything the tests talk to, with the files they use."""

    directory: Path
    nginx: Nginx
    nocert_port: int
    sidecar: SidecarProcess
    ports: dict[str, int]  # the sidecar's listener per route

    def sidecar_url(self, route: str = "good") -> str:
        return f"http://127.0.0.1:{self.ports[route]}"

    @property
    def upstream(self) -> str:
        """nginx as the routes name it, and as http_proxy clients call it: not port 443."""
        return f"localhost:{self.nginx.port}"


def write_identity(directory: Path, name: str, issued: Issued) -> None:
    """A client bundle as SAP BTP exports it (key, leaf, chain), and chain and key for curl."""
    write_private(directory / f"{name}-bundle.pem", issued.btp_bundle())
    write_private(directory / f"{name}.key", issued.key_pem())
    (directory / f"{name}.pem").write_bytes(issued.chain_pem())


def route_yaml(name: str, *, listen: int, upstream: int, identity: str, ca: str) -> str:
    return f"""
  - name: {name}
    listen: 127.0.0.1:{listen}
    upstream: https://localhost:{upstream}
    company_id: {COMPANY_ID}
    credentials:
      pem: {identity}-bundle.pem
    tls:
      ca_file: {ca}
    timeouts: {{connect: 5s, read: 20s, shutdown: 2s}}
"""


def write_config(path: Path, routes: list[str]) -> Path:
    path.write_text("log:\n  level: info\nroutes:" + "".join(routes), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stack(pki: PKI, cap: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """nginx in front of CAP, and one sidecar process with every route of ROUTES."""
    directory = tmp_path_factory.mktemp("interop")
    (directory / "server.pem").write_bytes(pki.server.chain_pem())
    write_private(directory / "server.key", pki.server.key_pem())
    (directory / "ca.pem").write_bytes(pki.root.cert_pem())
    (directory / "other-ca.pem").write_bytes(pki.other_ca.cert_pem())
    write_identity(directory, "client", pki.client)
    write_identity(directory, "foreign", pki.other_ca.client("someone-else"))

    nginx = Nginx(directory, free_port())
    servers = {"main": nginx.port, "nocert": free_port()}
    (directory / "nginx.conf").write_text(
        nginx_conf(directory, port=servers["main"], nocert_port=servers["nocert"], cap_port=cap)
    )
    ports = {name: free_port() for name in ROUTES}
    routes = [
        route_yaml(name, listen=ports[name], upstream=servers[server], identity=who, ca=ca)
        for name, (server, who, ca) in ROUTES.items()
    ]
    for name, text in zip(ROUTES, routes, strict=True):
        write_config(directory / f"{name}.yaml", [text])  # for check --probe, one route each
    config = write_config(directory / "sidecar.yaml", routes)

    nginx.start()
    sidecar = SidecarProcess("run", "-c", str(config), cwd=directory)
    try:
        sidecar.wait_listening()
        for port in ports.values():
            wait_until(partial(listening, port), within=IO_TIMEOUT, what=f"sidecar on {port}")
        yield Stack(directory, nginx, servers["nocert"], sidecar, ports)
    finally:
        sidecar.stop()
        nginx.stop()


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client here goes where the test says: no proxy from the developer's shell."""
    for name in list(os.environ):
        if name.lower() in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}:
            monkeypatch.delenv(name)


def diagnostics(stack: Stack) -> str:
    return f"--- sidecar:\n{stack.sidecar.output}\n--- nginx:\n{stack.nginx.log()}"


# ---------------------------------------------------------------- clients


def fetch_requests(
    url: str, *, proxy: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """requests as a script uses it; ``proxy`` goes in through ``http_proxy``, as users set it."""
    import requests

    with mock.patch.dict(os.environ, {"http_proxy": proxy} if proxy else {}):
        r = requests.get(url, headers=headers, timeout=IO_TIMEOUT)
    return r.status_code, dict(r.headers), r.content


def fetch_curl(url: str, *, proxy: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """curl as a shell user runs it; ``proxy`` goes in through ``http_proxy``."""
    env = dict(os.environ)
    if proxy is not None:
        env["http_proxy"] = proxy
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", str(IO_TIMEOUT), url],
        env=env,
        capture_output=True,
        timeout=IO_TIMEOUT + 5,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if ": " in line)
    return int(status_line.split()[1]), headers, body


FETCHERS = {"requests": fetch_requests, "curl": fetch_curl}


def read_all_users(fetch: Any, first: str, origin: str, *, proxy: str | None) -> int:
    """Follow __next from ``first``; every link must be at ``origin``. Returns the pages read."""
    url: str | None = first
    seen: list[str] = []
    pages = 0
    while url is not None:
        status, _, body = fetch(url, proxy=proxy)
        assert status == 200, body[:500]
        d = json.loads(body)["d"]
        pages += 1
        for user in d["results"]:
            assert user["__metadata"]["uri"] == f"{origin}{SERVICE}User('{user['userId']}')"
            seen.append(user["userId"])
        url = d.get("__next")
        if url is not None:
            assert url.startswith(f"{origin}{SERVICE}User?"), url
    assert sorted(seen) == [f"u{i:04d}" for i in range(1, USERS + 1)]
    return pages


def entry(stack: Stack, mode: str) -> tuple[str, str | None]:
    """The origin a client calls in ``mode``, and its http_proxy setting."""
    if mode == "reverse-proxy":
        return stack.sidecar_url(), None
    # http_proxy: the client sends the absolute form http://localhost:NGINX_PORT/... to us
    return f"http://{stack.upstream}", stack.sidecar_url()


MODES = ["reverse-proxy", "http_proxy"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("client", ["requests", "curl"])
def test_paging_links_come_back_at_the_origin_the_client_used(
    stack: Stack, client: str, mode: str
) -> None:
    origin, proxy = entry(stack, mode)
    first = f"{origin}{SERVICE}User?$format=json"
    pages = read_all_users(FETCHERS[client], first, origin, proxy=proxy)
    assert pages == -(-USERS // PAGE), diagnostics(stack)


@pytest.mark.parametrize("mode", MODES)
def test_a_top_beyond_the_page_size_pages_too(stack: Stack, mode: str) -> None:
    origin, proxy = entry(stack, mode)
    url = f"{origin}{SERVICE}User?$format=json&$top=150"
    status, _, body = fetch_requests(url, proxy=proxy)
    assert status == 200, body[:500]
    d = json.loads(body)["d"]
    assert len(d["results"]) == PAGE
    assert d["__next"].startswith(f"{origin}{SERVICE}User?"), d["__next"]
    status, _, body = fetch_requests(d["__next"], proxy=proxy)
    assert status == 200, body[:500]
    rest = json.loads(body)["d"]
    assert len(rest["results"]) == 150 - PAGE and "__next" not in rest


def test_pyodata_reads_every_user_through_the_sidecar(stack: Stack) -> None:
    try:
        import pyodata
    except ImportError:
        unavailable("pyodata is not installed: pip install -e '.[test]'")
    import requests

    with requests.Session() as session:
        # pyodata reads $metadata first; it refuses a __next at another origin (1.12)
        client = pyodata.Client(f"{stack.sidecar_url()}{SERVICE}", session)
        users = client.entity_sets.User.get_entities().execute()
        seen = [u.userId for u in users]
        while users.next_url is not None:
            assert users.next_url.startswith(f"{stack.sidecar_url()}{SERVICE}User?")
            users = client.entity_sets.User.get_entities().next_url(users.next_url).execute()
            seen += [u.userId for u in users]
        one = client.entity_sets.User.get_entity(userId="u0042").execute()
    assert sorted(seen) == [f"u{i:04d}" for i in range(1, USERS + 1)]
    assert (one.firstName, one.email) == ("First42", "user42@example.test")


def test_newman_runs_a_collection_through_the_sidecar(
    stack: Stack, newman: str, tmp_path: Path
) -> None:
    report = tmp_path / "newman.json"
    out = subprocess.run(
        [
            newman, "run", str(COLLECTION),
            "--env-var", f"baseUrl={stack.sidecar_url()}",
            "--env-var", f"users={USERS}",
            "--reporters", "cli,json", "--reporter-json-export", str(report),
            "--disable-unicode", "--color", "off",
        ],
        env={**os.environ, "NO_UPDATE_NOTIFIER": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    stats = json.loads(report.read_text())["run"]["stats"]
    # the first page, then __next twice (250 users, 100 a page); four checks each
    assert stats["requests"]["total"] == 3, out.stdout
    assert stats["assertions"] == {"total": 12, "pending": 0, "failed": 0}, out.stdout


# ---------------------------------------------------------------- nginx's own rules


def curl_nginx(stack: Stack, *args: str, port: int | None = None) -> tuple[int, bytes]:
    """curl straight to nginx, trusting its CA: what nginx itself answers."""
    out = subprocess.run(
        [
            "curl", "-sS", "--max-time", str(IO_TIMEOUT), "-w", "\n%{http_code}",
            "--cacert", str(stack.directory / "ca.pem"), *args,
            f"https://localhost:{port or stack.nginx.port}{SERVICE}User?$format=json&$top=1",
        ],
        capture_output=True,
        timeout=IO_TIMEOUT + 5,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    body, _, status = out.stdout.rpartition(b"\n")
    return int(status), body


def client_cert(stack: Stack, name: str) -> tuple[str, ...]:
    return (
        "--cert",
        str(stack.directory / f"{name}.pem"),
        "--key",
        str(stack.directory / f"{name}.key"),
    )


def test_nginx_demands_the_company_id_the_sidecar_sends(stack: Stack) -> None:
    cert = client_cert(stack, "client")
    assert curl_nginx(stack, *cert)[0] == 401
    assert curl_nginx(stack, *cert, "-H", f"successfactors-companyid: {COMPANY_ID}")[0] == 200
    # through the sidecar, a client's own value is replaced by the route's
    url = f"{stack.sidecar_url()}{SERVICE}User?$format=json&$top=1"
    status, _, body = fetch_requests(url, headers={"SuccessFactors-CompanyId": "SOMEONE-ELSE"})
    assert status == 200, body[:500]


def test_nginx_refuses_certificates_with_an_http_400_page(stack: Stack) -> None:
    """The premise of the rejection tests below: nginx answers, it does not fail the handshake."""
    header = ("-H", f"successfactors-companyid: {COMPANY_ID}")
    status, body = curl_nginx(stack, *header)
    assert (status, NO_CERT_TITLE in body.decode()) == (400, True), body
    status, body = curl_nginx(stack, *header, *client_cert(stack, "foreign"))
    assert (status, BAD_CERT_TITLE in body.decode()) == (400, True), body
    status, body = curl_nginx(stack, *header, *client_cert(stack, "client"), port=stack.nocert_port)
    assert (status, NO_CERT_TITLE in body.decode()) == (400, True), body


# ---------------------------------------------------------------- faults


def sidecar_error(stack: Stack, route: str) -> tuple[int, str | None, dict[str, str]]:
    """A request through ``route``: status, X-Sidecar-Error, and the JSON error."""
    url = f"{stack.sidecar_url(route)}{SERVICE}User?$format=json&$top=1"
    status, headers, body = fetch_requests(url)
    error = json.loads(body).get("error", {}) if status >= 500 else {}
    return status, headers.get("X-Sidecar-Error"), error


def test_an_untrusted_server_certificate_is_upstream_tls_failed(stack: Stack) -> None:
    status, code, error = sidecar_error(stack, "untrusted")
    assert (status, code) == (502, "upstream_tls_failed"), diagnostics(stack)
    assert "ca_file" in error["hint"] or "ca_file" in error["message"], error


REFUSALS = [("foreign", BAD_CERT_TITLE), ("nocert", NO_CERT_TITLE)]  # route, nginx's 400 title


@pytest.mark.parametrize(("route", "title"), REFUSALS)
def test_nginx_refusing_the_certificate_is_client_certificate_rejected(
    stack: Stack, route: str, title: str
) -> None:
    status, code, error = sidecar_error(stack, route)
    assert (status, code) == (502, "client_certificate_rejected"), (error, diagnostics(stack))
    assert "400" in error["message"] and title in error["message"], error


def check_probe(stack: Stack, route: str) -> tuple[int, str]:
    result = run_cli(
        "check", "-c", str(stack.directory / f"{route}.yaml"), "--probe", cwd=stack.directory
    )
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    return result.returncode, output


def test_check_probe_accepts_the_certificate_nginx_trusts(stack: Stack) -> None:
    code, output = check_probe(stack, "good")
    assert code == 0, output
    assert "certificate:  ACCEPTED" in output


@pytest.mark.parametrize(("route", "title"), REFUSALS)
def test_check_probe_says_rejected_when_nginx_refuses_the_certificate(
    stack: Stack, route: str, title: str
) -> None:
    code, output = check_probe(stack, route)
    assert code == 1, output
    assert "certificate:  NOT ACCEPTED" in output, output
    assert re.search(r"(rejected|refused) the client certificate", output), output
    assert title in output, output


def test_nginx_stopped_is_upstream_connect_failed_and_restarted_works_again(
    stack: Stack,
) -> None:
    """The same sidecar process throughout: it must not need a restart of its own."""
    assert sidecar_error(stack, "good")[0] == 200  # a pooled keep-alive connection to nginx
    stack.nginx.stop()
    try:
        status, code, _ = sidecar_error(stack, "good")
        assert (status, code) == (502, "upstream_connect_failed"), diagnostics(stack)
    finally:
        stack.nginx.start()
    assert sidecar_error(stack, "good")[0] == 200, diagnostics(stack)
    assert stack.sidecar.proc.poll() is None
