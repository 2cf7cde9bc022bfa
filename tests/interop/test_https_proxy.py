"""Unchanged https:// scripts through ``https_proxy``: curl, requests, httpx, Node.js.

Node.js twice: its ``https`` module, and the SAP Cloud SDK (tests/interop/cloud-sdk,
``npm ci --prefix tests/interop/cloud-sdk``) with the sidecar as a destination's proxy.

The sidecar runs as users run it, ``python -m sidecar run -c FILE --intercept``,
in front of the demo's fake SuccessFactors (over real mTLS, in a thread of
this process). Each client gets the certificate the way the README says —
``trust show``'s file, or its ``--bundle`` (the system store plus it) — and
verifies it: no ``-k``, no ``verify=False``. Each pages through every user
by the upstream's own ``https://`` ``__next`` links, as a script written
against SuccessFactors does, and changes no line for the sidecar: only
environment variables (``https_proxy`` and a trust setting) differ.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.demo.app import DEMO_COMPANY_ID, FakeUpstream, fake_successfactors
from tests.conftest import ROOT, free_port, missing_tool
from tests.support.process import SidecarProcess, run_cli

USERS = 45  # what the fake SuccessFactors serves, 20 a page
EXAMPLE = ROOT / "config" / "examples" / "legacy-script"
TIMEOUT = 60
#: variables of the test machine that would send the clients elsewhere
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True)
class Setup:
    upstream: FakeUpstream
    proxy: str  # http://127.0.0.1:PORT, the sidecar
    cert_file: Path  # `trust show`'s file: the interception certificate alone
    bundle: Path  # `trust show --bundle`: the system store plus it
    sidecar: SidecarProcess

    @property
    def first_page(self) -> str:
        return f"{self.upstream.url}/odata/v2/User?$format=json"

    def env(self, **trust: str) -> dict[str, str]:
        """This environment with the sidecar as https_proxy and ``trust`` (a CA setting)."""
        env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
        env.update(https_proxy=self.proxy, HTTPS_PROXY=self.proxy, **trust)
        return env


class _UpstreamThread:
    """The fake SuccessFactors, served by an event loop in a thread of its own."""

    def __init__(self, directory: Path) -> None:
        self.started = threading.Event()
        self.upstream: FakeUpstream | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._serve(directory),), daemon=True
        )

    async def _serve(self, directory: Path) -> None:
        self._stop = asyncio.Event()
        async with fake_successfactors(directory) as upstream:
            self.upstream = upstream
            self.started.set()
            await self._stop.wait()

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        assert self.started.wait(TIMEOUT), "the fake SuccessFactors did not start"
        assert self.upstream is not None
        return self.upstream

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)
        self._loop.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("https-proxy")
    with _UpstreamThread(work / "sf") as upstream:
        port = free_port()
        config = work / "sidecar.yaml"
        config.write_text(
            textwrap.dedent(f"""\
                routes:
                  - name: sf
                    listen: 127.0.0.1:{port}
                    upstream: {upstream.url}
                    company_id: {DEMO_COMPANY_ID}
                    credentials: {{pem: {upstream.pki.client_bundle}}}
                    tls: {{ca_file: {upstream.pki.ca_file}}}
                    intercept: {{cert_dir: state}}
            """),
            encoding="utf-8",
        )
        shown = run_cli("trust", "show", "-c", str(config), "--bundle", "bundle.pem", cwd=work)
        assert shown.returncode == 0, shown.stderr
        cert_file = work / "state" / "sf.pem"
        assert f"file: {cert_file}" in shown.stdout
        sidecar = SidecarProcess("run", "-c", str(config), "--intercept", cwd=work)
        try:
            sidecar.wait_listening()
            yield Setup(
                upstream, f"http://127.0.0.1:{port}", cert_file, work / "bundle.pem", sidecar
            )
        finally:
            sidecar.stop()


def run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, f"{args[0]} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout


def check_pages(output: str, setup: Setup) -> None:
    """The client's output: one line per page, ``URL N`` (its users), every user once."""
    pages = [line.split() for line in output.strip().splitlines()]
    assert [p[0] for p in pages] == [
        setup.first_page,
        f"{setup.upstream.url}/odata/v2/User?$format=json&$skiptoken=20",
        f"{setup.upstream.url}/odata/v2/User?$format=json&$skiptoken=40",
    ]
    assert sum(int(p[1]) for p in pages) == USERS


#: The same unchanged script in each language: GET, follow __next, print URL and count.
PYTHON_SCRIPT = """\
import sys, {module}
url = sys.argv[1]
with {client} as session:
    while url:
        page = session.get(url).json()["d"]
        print(url, len(page["results"]))
        url = page.get("__next")
"""


def test_curl_with_the_certificate_file(setup: Setup) -> None:
    curl = shutil.which("curl")
    if curl is None:
        missing_tool("curl is not installed")
    url: str | None = setup.first_page
    lines = []
    while url is not None:
        # -x as the README's first line; CURL_CA_BUNDLE would do what --cacert does
        out = run([curl, "-sS", "-x", setup.proxy, "--cacert", str(setup.cert_file), url],
                  setup.env())  # fmt: skip
        page = json.loads(out)["d"]
        lines.append(f"{url} {len(page['results'])}")
        url = page.get("__next")
    check_pages("\n".join(lines), setup)
    # and by the environment alone, as an unchanged shell script runs it
    out = run([curl, "-sS", setup.first_page], setup.env(CURL_CA_BUNDLE=str(setup.cert_file)))
    assert len(json.loads(out)["d"]["results"]) == 20


def test_curl_refuses_without_trust(setup: Setup) -> None:
    curl = shutil.which("curl")
    if curl is None:
        missing_tool("curl is not installed")
    done = subprocess.run([curl, "-sS", setup.first_page], env=setup.env(),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert done.returncode == 60  # the certificate is verified, and not in the system store


def test_python_requests_with_the_bundle(setup: Setup) -> None:
    script = PYTHON_SCRIPT.format(module="requests", client="requests.Session()")
    out = run([sys.executable, "-c", script, setup.first_page],
              setup.env(REQUESTS_CA_BUNDLE=str(setup.bundle)))  # fmt: skip
    check_pages(out, setup)


def test_python_httpx_with_the_bundle(setup: Setup) -> None:
    try:
        import httpx  # noqa: F401
    except ImportError:
        missing_tool("httpx is not installed: .ci/run installs it (`pip install httpx`)")
    script = PYTHON_SCRIPT.format(module="httpx", client="httpx.Client()")
    out = run([sys.executable, "-c", script, setup.first_page],
              setup.env(SSL_CERT_FILE=str(setup.bundle)))  # fmt: skip
    check_pages(out, setup)


#: Node 20's https has no https_proxy support: the tunnel is opened as an agent does it.
NODE_SCRIPT = """
const http = require("http"), https = require("https"), tls = require("tls");
const proxy = new URL(process.env.https_proxy);
function get(url) {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const req = http.request({host: proxy.hostname, port: proxy.port, method: "CONNECT",
                              path: `${u.hostname}:${u.port || 443}`});
    req.on("connect", (res, socket) => {
      if (res.statusCode !== 200) return reject(new Error("CONNECT " + res.statusCode));
      https.get(url, {createConnection: () => tls.connect({socket, servername: u.hostname})},
        (r) => { let body = ""; r.on("data", (c) => body += c);
                 r.on("end", () => resolve(JSON.parse(body))); }).on("error", reject);
    });
    req.on("error", reject);
    req.end();
  });
}
(async () => {
  let url = process.argv[1];
  while (url) {
    const page = (await get(url)).d;
    console.log(url, page.results.length);
    url = page.__next;
  }
})().catch((e) => { console.error(e.message); process.exit(1); });
"""


def test_node_https_with_extra_ca_certs(setup: Setup) -> None:
    node = shutil.which("node")
    if node is None:
        missing_tool("Node.js is not installed", ci_installs_it=False)
    out = run([node, "-e", NODE_SCRIPT, setup.first_page],
              setup.env(NODE_EXTRA_CA_CERTS=str(setup.cert_file)))  # fmt: skip
    check_pages(out, setup)


CLOUD_SDK = ROOT / "tests" / "interop" / "cloud-sdk"  # its page-users.mjs and npm packages


def cloud_sdk_script(setup: Setup, proxy: str) -> tuple[list[str], dict[str, str]]:
    """page-users.mjs's command and environment, ``proxy`` as its header says; no trust set."""
    node = shutil.which("node")
    if node is None:
        missing_tool("Node.js is not installed", ci_installs_it=False)
    if not (CLOUD_SDK / "node_modules" / "@sap-cloud-sdk" / "http-client").is_dir():
        missing_tool(
            f"the SAP Cloud SDK is not installed: npm ci --prefix {CLOUD_SDK.relative_to(ROOT)}",
            ci_installs_it=shutil.which("npm") is not None,
        )
    env = setup.env()
    args = [node, str(CLOUD_SDK / "page-users.mjs"), proxy, setup.first_page]
    if proxy == "env":
        destination = {"name": "SF", "url": setup.upstream.url, "proxyType": "Internet"}
        env["destinations"] = json.dumps([destination])
        args.append("SF")
    else:
        del env["https_proxy"], env["HTTPS_PROXY"]
        env["SIDECAR_PROXY"] = setup.proxy
    return args, env


@pytest.mark.parametrize("proxy", ["env", "explicit"])
def test_sap_cloud_sdk_with_the_sidecar_as_the_destinations_proxy(setup: Setup, proxy: str) -> None:
    """executeHttpRequest on an Internet destination, trusting by NODE_EXTRA_CA_CERTS.

    ``env``: a destination of the ``destinations`` variable, its proxy taken from
    https_proxy by the SDK; ``explicit``: a destination object naming the sidecar
    as its proxyConfiguration, with no https_proxy. Either way the SDK hands the
    proxy to axios, which tunnels to an https target by CONNECT.
    """
    args, env = cloud_sdk_script(setup, proxy)
    before = setup.sidecar.output.count(" intercepted")
    check_pages(run(args, {**env, "NODE_EXTRA_CA_CERTS": str(setup.cert_file)}), setup)
    # by the tunnel: the fake answers no page without the sidecar's client certificate
    # and company id, and the sidecar marks what it forwards from inside a tunnel
    assert setup.sidecar.output.count(" intercepted") - before == 3


def test_sap_cloud_sdk_refuses_the_certificate_without_trust(setup: Setup) -> None:
    args, env = cloud_sdk_script(setup, "explicit")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == "self-signed certificate\n"  # Node's verification failed


def test_the_example_scripts_run_unchanged_through_https_proxy(setup: Setup) -> None:
    """config/examples/legacy-script/, the way its README says: only the environment."""
    env = setup.env(SF_BASE_URL=setup.upstream.url, REQUESTS_CA_BUNDLE=str(setup.bundle))
    lines = run([sys.executable, str(EXAMPLE / "users.py")], env).splitlines()
    assert lines[-1] == f"{USERS} users" and len(set(lines[:-1])) == USERS
    if shutil.which("curl") is None:
        missing_tool("curl is not installed")
    env = setup.env(SF_BASE_URL=setup.upstream.url, CURL_CA_BUNDLE=str(setup.bundle))
    users = json.loads(run(["sh", str(EXAMPLE / "users.sh")], env))["d"]["results"]
    assert [u["userId"] for u in users] == ["u0001", "u0002", "u0003", "u0004", "u0005"]


def test_run_serves_the_certificate_trust_show_made(setup: Setup) -> None:
    """Made once by `trust show` (another process), reused by `run`: trusted once."""
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"{setup.proxy}/-/intercept.pem", timeout=10) as answer:
        assert answer.read() == setup.cert_file.read_bytes()


def test_the_sidecar_logged_each_tunnel_and_no_key(setup: Setup) -> None:
    output = setup.sidecar.output
    assert f"CONNECT localhost:{setup.upstream.port} 200" in output
    assert "PRIVATE KEY" not in output
    key = (setup.cert_file.parent / "sf.key").read_text().splitlines()[1]
    assert key not in output
