"""Logs: text or JSON lines on stderr, one access line per request, never a secret.

The unit tests cover `redact_query` and the two formatters. The session tests
run a whole debug-level session the way ``mtls-sidecar run`` does
(`setup_logging` onto the real stderr, captured by ``capsys``): a sidecar with
an encrypted key (``password_env``) and an inbound token, requests that
succeed and fail in every way, reloads that succeed and fail. Then they read
the captured output as an operator would, and scan it for the key password,
the token, PEM markers and the base64 body of the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import Config, CredentialsConfig, InboundConfig, LogConfig, LogFormat
from sidecar.demo.pki import Issued
from sidecar.server import Sidecar
from sidecar.telemetry.logs import (
    JsonFormatter,
    TextFormatter,
    access_logger,
    redact_query,
    setup_logging,
    without_userinfo,
)
from tests.conftest import PKI, free_port, key_material, route_config, write_private
from tests.support.upstreams import FakeUpstream

PASSWORD = "log-test key password 91c2"
OTHER_PASSWORD = "some other password 5d0e"
TOKEN = "inbound-token-" + "3f9a" * 8
WRONG_TOKEN = "wrong-token-" + "77" * 10
UPSTREAM_BEARER = "upstream-bearer-c0ffee-0123456789"
FILTER = "$filter=lastName%20eq%20%27Doe%27&$top=5"

# route method path status in out duration upstream id, as the text line writes them
ACCESS_TEXT = re.compile(
    r"^\d\d:\d\d:\d\d info +sidecar\.access: (?P<route>\S+) (?P<method>[A-Z]+) (?P<path>.+) "
    r"(?P<status>\d{3}) in=(?P<bytes_in>\d+) out=(?P<bytes_out>\d+) "
    r"(?P<duration_ms>[\d.]+)ms upstream=(?:(?P<upstream_ms>[\d.]+)ms|-) id=(?P<request_id>\S+)$"
)


# ------------------------------------------------------------------ redact_query


@pytest.mark.parametrize(
    ("query", "redacted"),
    [
        ("", ""),
        ("$filter=lastName eq 'Doe'&$top=5", "$filter=***&$top=***"),
        ("$select=userId,firstName", "$select=***"),
        ("flag", "flag=***"),
        ("a=1&a=2", "a=***&a=***"),
        ("name%20with%20space=x", "name%20with%20space=***"),
    ],
)
def test_query_values_are_redacted(query: str, redacted: str) -> None:
    assert redact_query(query, keep_values=False) == redacted


def test_query_values_are_kept_when_asked() -> None:
    query = "$filter=lastName eq 'Doe'&$top=5"
    assert redact_query(query, keep_values=True) == query


# ------------------------------------------------------------------ formatters


def record(name: str = "sidecar", msg: str = "hello %s", *args: Any, **extra: Any) -> Any:
    rec = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args or ("world",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_formatter_writes_one_object_with_the_extras() -> None:
    line = JsonFormatter().format(record(route="r1", request_id="abc"))
    data = json.loads(line)
    assert "\n" not in line
    assert data["level"] == "warning"
    assert data["logger"] == "sidecar"
    assert data["message"] == "hello world"
    assert (data["route"], data["request_id"]) == ("r1", "abc")
    assert "args" not in data and "msg" not in data


def test_json_formatter_escapes_newlines_of_a_message() -> None:
    line = JsonFormatter().format(record(msg="two\nlines %s"))
    assert "\n" not in line
    assert json.loads(line)["message"] == "two\nlines world"


def test_formatters_never_write_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record()
        rec.exc_info = sys.exc_info()
    for formatter in (JsonFormatter(), TextFormatter()):
        out = formatter.format(rec)
        assert "Traceback" not in out
        assert "ValueError: boom" in out


def test_text_formatter_adds_extras_as_key_value() -> None:
    line = TextFormatter().format(record(route="r1", code="upstream_timeout"))
    assert line.endswith("sidecar: hello world route=r1 code=upstream_timeout")


# ------------------------------------------------------------------ a full session


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`setup_logging` rewires the root logger; put everything back afterwards."""
    root = logging.getLogger()
    sidecar_logger = logging.getLogger("sidecar")
    saved = (list(root.handlers), root.level, sidecar_logger.level, access_logger.disabled)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    sidecar_logger.setLevel(saved[2])
    access_logger.disabled = saved[3]


def secrets_of(issued: Issued, *pems: bytes) -> list[str]:
    """Strings that must never appear in a log."""
    secrets = [PASSWORD, OTHER_PASSWORD, TOKEN, WRONG_TOKEN, UPSTREAM_BEARER]
    return secrets + key_material(issued, *pems)


@dataclass
class Sent:
    """One request of the session, and what its access line must say."""

    request_id: str
    route: str
    method: str
    path: str  # as the access line shows it
    status: int
    bytes_in: int = 0
    forwarded: bool = True  # did it reach the upstream (upstream duration known)?
    bytes_out: int = 0  # filled in from the answer


@dataclass
class Session:
    output: str
    sent: list[Sent]
    bundle: Path


async def wait_for_reloads(sidecar: Sidecar, before: list[dict[str, str | None]]) -> list[str]:
    """Wait until every route has loaded again; the result of each."""
    deadline = asyncio.get_running_loop().time() + 3
    # A new dict per load (comparing values would not do: `at` has whole seconds).
    while any(rt.stats.last_reload is b for rt, b in zip(sidecar.routes, before, strict=True)):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("no reload within 3s")
        await asyncio.sleep(0.02)
    return [str(rt.stats.last_reload["result"]) for rt in sidecar.routes]


@pytest.fixture
async def session(
    pki: PKI,
    tls_upstream: Any,
    ca_file: Path,
    tmp_path: Path,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> Callable[..., Any]:
    """``await session(fmt="json", query_values=False)`` → the captured `Session`."""

    async def run(*, fmt: LogFormat, query_values: bool = False) -> Session:
        bundle = tmp_path / "encrypted.pem"
        write_private(bundle, pki.client.btp_bundle(PASSWORD.encode()))
        fake = FakeUpstream()
        upstream = await tls_upstream(fake.app())
        common: dict[str, Any] = {
            "credentials": CredentialsConfig(pem=bundle, password_env="KEY_PASSWORD"),
            "inbound": InboundConfig(token_env="TOK"),
        }
        routes = (
            route_config(upstream, bundle, ca_file, name="main", **common),
            route_config(
                f"https://127.0.0.1:{free_port()}", bundle, ca_file, name="dead", **common
            ),
        )
        log_config = LogConfig(level="debug", format=fmt, query_values=query_values)
        config = Config(routes=routes, log=log_config)
        capsys.readouterr()
        setup_logging(config.log)
        sidecar = Sidecar(config, env={"KEY_PASSWORD": PASSWORD, "TOK": TOKEN})
        await sidecar.start()
        try:
            sent = await traffic(sidecar, client, query_values=query_values)
            await reloads(sidecar, bundle, pki)
        finally:
            await sidecar.close()
        return Session(capsys.readouterr().err, sent, bundle)

    return run


async def traffic(
    sidecar: Sidecar, client: aiohttp.ClientSession, *, query_values: bool
) -> list[Sent]:
    main = f"http://{sidecar.bound_address(sidecar.routes[0])}"
    dead = f"http://{sidecar.bound_address(sidecar.routes[1])}"
    good = {"X-Sidecar-Token": TOKEN, "Authorization": f"Bearer {UPSTREAM_BEARER}"}
    body = b"b" * 1234
    redacted = "$filter=***&$top=***"
    shown_query = FILTER.replace("%20", " ").replace("%27", "'") if query_values else redacted
    plan: list[tuple[str, Sent, dict[str, str], bytes | None]] = [
        (main + "/odata/v2/User?" + FILTER,
         Sent("r-list", "main", "GET", "/odata/v2/User?" + shown_query, 200), good, None),
        (main + "/status/404", Sent("r-404", "main", "GET", "/status/404", 404), good, None),
        (main + "/status/401", Sent("r-401", "main", "GET", "/status/401", 401), good, None),
        (main + "/upload", Sent("r-post", "main", "POST", "/upload", 200, 1234), good, body),
        (main + "/x", Sent("r-none", "main", "GET", "/x", 401, forwarded=False), {}, None),
        (main + "/x", Sent("r-wrong", "main", "GET", "/x", 401, forwarded=False),
         {"X-Sidecar-Token": WRONG_TOKEN}, None),
        (dead + "/y", Sent("r-dead", "dead", "GET", "/y", 502, forwarded=False), good, None),
    ]  # fmt: skip
    out = []
    for url, expected, headers, data in plan:
        method = expected.method
        async with client.request(
            method,
            url,
            headers={**headers, "X-Request-ID": expected.request_id},
            data=data,
        ) as resp:
            answer = await resp.read()
            assert resp.status == expected.status, answer
        expected.bytes_out = len(answer)
        out.append(expected)
    for path in ("health", "ready", "status", "metrics"):
        async with client.get(f"{main}/-/{path}", headers={"X-Sidecar-Token": TOKEN}) as resp:
            assert resp.status == 200
    # Refused by the parser, logged at debug level.
    port = int(main.rpartition(":")[2])
    answer = await send_raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\x01: v\r\n\r\n")
    assert b" 400 " in answer.partition(b"\r\n")[0]
    return out


async def reloads(sidecar: Sidecar, bundle: Path, pki: PKI) -> None:
    """A good reload, one with the wrong password, one with garbage, then good again."""
    for data, result in (
        (pki.client.btp_bundle(PASSWORD.encode()), "success"),
        (pki.client.btp_bundle(OTHER_PASSWORD.encode()), "failure"),
        (b"garbage, not a bundle\n", "failure"),
        (pki.client.btp_bundle(PASSWORD.encode()), "success"),
    ):
        write_private(bundle, data)
        before = [rt.stats.last_reload for rt in sidecar.routes]
        sidecar.reload_all()
        assert await wait_for_reloads(sidecar, before) == [result, result]


def check_no_secret(session: Session, pki: PKI) -> None:
    secrets = secrets_of(pki.client, session.bundle.read_bytes())
    assert len(secrets) > 15  # passwords, tokens, and the lines of three key PEMs
    for secret in secrets:
        assert secret not in session.output, f"a secret in the log: {secret[:20]}..."
    assert "-----BEGIN" not in session.output


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_debug_session_logs_no_secret(session: Any, pki: PKI, fmt: str) -> None:
    s: Session = await session(fmt=fmt)
    # The session did log: the loads, the failures, the access lines, debug lines.
    # (the reloads bring back the same certificate, which is logged as unchanged)
    assert "credentials reloaded, unchanged" in s.output
    assert "refused a malformed request" in s.output
    assert "password" in s.output.lower()  # the wrong one is reported, never shown
    assert "not a certificate bundle" in s.output
    # Both routes read the same file: each reports each of the two failed reloads once.
    assert s.output.count("route main: loading credentials failed") == 2
    assert s.output.count("route dead: loading credentials failed") == 2
    check_no_secret(s, pki)


def access_lines_text(output: str) -> dict[str, dict[str, str]]:
    found = {}
    for line in output.splitlines():
        if m := ACCESS_TEXT.match(line):
            found[m["request_id"]] = m.groupdict()
    return found


def access_lines_json(output: str) -> dict[str, dict[str, Any]]:
    found = {}
    for line in output.splitlines():
        data = json.loads(line)
        if data["logger"] == "sidecar.access":
            found[data["request_id"]] = data
    return found


def check_access(lines: dict[str, dict[str, Any]], sent: list[Sent]) -> None:
    assert set(lines) == {s.request_id for s in sent}  # one per proxied request, none for admin
    for s in sent:
        line = lines[s.request_id]
        assert line["route"] == s.route
        assert line["method"] == s.method
        assert line["path"] == s.path
        assert int(line["status"]) == s.status
        assert int(line["bytes_in"]) == s.bytes_in
        assert int(line["bytes_out"]) == s.bytes_out
        assert float(line["duration_ms"]) > 0
        upstream = line["upstream_ms"]
        if s.forwarded:
            assert upstream not in (None, "None") and 0 <= float(upstream)
            assert float(upstream) <= float(line["duration_ms"])
        else:
            assert upstream in (None, "None")


@pytest.mark.parametrize("query_values", [False, True])
async def test_text_access_lines_hold_every_field(session: Any, query_values: bool) -> None:
    s: Session = await session(fmt="text", query_values=query_values)
    check_access(access_lines_text(s.output), s.sent)
    if not query_values:
        assert "Doe" not in s.output


@pytest.mark.parametrize("query_values", [False, True])
async def test_json_lines_are_objects_and_access_lines_hold_every_field(
    session: Any, query_values: bool
) -> None:
    s: Session = await session(fmt="json", query_values=query_values)
    lines = [line for line in s.output.split("\n") if line]
    assert len(lines) > len(s.sent)
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    check_access(access_lines_json(s.output), s.sent)
    if not query_values:
        assert "Doe" not in s.output


async def test_warnings_and_errors_carry_the_route_and_request_id(session: Any) -> None:
    s: Session = await session(fmt="json")
    records = [json.loads(line) for line in s.output.splitlines()]
    warnings = {r.get("request_id"): r for r in records if r["level"] == "warning"}
    assert warnings["r-401"]["route"] == "main"
    assert "ACME1234" in warnings["r-401"]["message"]  # the company id to check
    dead = [warnings["r-dead"]]
    assert dead and dead[0]["code"] == "upstream_connect_failed"
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 4  # two failed reloads, on each of the two routes
    assert all("keeping the last good certificate" in r["message"] for r in errors)


# ------------------------------------------------------------------ hostile input


@dataclass
class RawSetup:
    port: int
    fake: FakeUpstream


@pytest.fixture
async def raw_sidecar(
    pki: PKI,
    tls_upstream: Any,
    bundle_file: Path,
    ca_file: Path,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> AsyncIterator[Callable[[], Awaitable[RawSetup]]]:
    """``await raw_sidecar()``: a debug-level text-logging sidecar with a token.

    Started from the test itself, so that its log handler writes to the
    call phase's captured stderr (``capsys.readouterr().err``).
    """
    started: list[Sidecar] = []

    async def start() -> RawSetup:
        fake = FakeUpstream()
        upstream = await tls_upstream(fake.app())
        route = route_config(upstream, bundle_file, ca_file, name="main",
                             inbound=InboundConfig(token_env="TOK"))  # fmt: skip
        config = Config(routes=(route,), log=LogConfig(level="debug", format="text"))
        capsys.readouterr()
        setup_logging(config.log)
        sidecar = Sidecar(config, env={"TOK": TOKEN})
        await sidecar.start()
        started.append(sidecar)
        return RawSetup(int(sidecar.bound_address(sidecar.routes[0]).rpartition(":")[2]), fake)

    yield start
    for sidecar in started:
        await sidecar.close()


async def send_raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_password_in_an_absolute_form_target_never_reaches_the_access_line(
    raw_sidecar: Callable[[], Awaitable[RawSetup]], capsys: pytest.CaptureFixture[str]
) -> None:
    port = (await raw_sidecar()).port
    answer = await send_raw(
        port,
        b"GET http://user:pw-in-url-4711@other.test/x?a=1 HTTP/1.1\r\nHost: other.test\r\n"
        b"X-Request-ID: r-userinfo\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 403 ")  # another host: refused, and still logged
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "r-userinfo" in line]
    assert "http://other.test/x?a=***" in line
    assert "pw-in-url-4711" not in err


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("http://u:p@h.test/x", "http://h.test/x"),
        ("https://u@h.test:8443", "https://h.test:8443"),
        ("http://h.test/a@b", "http://h.test/a@b"),  # an @ in the path is no userinfo
        ("/odata/v2/User", "/odata/v2/User"),
        ("/a://b@c", "/a://b@c"),
    ],
)
def test_without_userinfo(path: str, shown: str) -> None:
    assert without_userinfo(path) == shown


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (debug|info|warning|error) +sidecar[.\w]*: ")


async def test_an_encoded_newline_in_the_path_cannot_forge_a_text_log_line(
    raw_sidecar: Callable[[], Awaitable[RawSetup]], capsys: pytest.CaptureFixture[str]
) -> None:
    port = (await raw_sidecar()).port
    forged = "12:00:00 error   sidecar: forged"
    target = "/odata%0A" + forged.replace(" ", "%20")
    answer = await send_raw(
        port,
        f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Sidecar-Token: {TOKEN}\r\n"
        "X-Request-ID: r-inject\r\nConnection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 ")
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "r-inject" in line]  # the access line was written
    assert not [line for line in lines if "forged" in line and line.startswith("12:00:00")]
    assert all(LOG_LINE.match(line) for line in lines), "\n".join(lines)


async def test_a_malformed_token_header_does_not_put_the_token_in_the_debug_log(
    raw_sidecar: Callable[[], Awaitable[RawSetup]], capsys: pytest.CaptureFixture[str]
) -> None:
    port = (await raw_sidecar()).port
    answer = await send_raw(
        port,
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Sidecar-Token: " + TOKEN.encode() + b"\x01\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 "))
    logged = capsys.readouterr().err
    assert "refused a malformed request" in logged  # the debug line was written
    assert TOKEN not in logged
    assert all(LOG_LINE.match(line) for line in logged.splitlines()), logged


async def test_a_request_the_client_abandons_still_gets_its_access_line(
    raw_sidecar: Callable[[], Awaitable[RawSetup]], capsys: pytest.CaptureFixture[str]
) -> None:
    setup = await raw_sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    writer.write(
        f"GET /slow?delay=10 HTTP/1.1\r\nHost: x\r\nX-Sidecar-Token: {TOKEN}\r\n"
        "X-Request-ID: r-gone\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.wait_for(setup.fake.slow_started.wait(), 5)
    writer.close()
    await writer.wait_closed()
    setup.fake.release.set()

    deadline = asyncio.get_running_loop().time() + 2
    logged = ""
    while "id=r-gone" not in logged and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        logged += capsys.readouterr().err
    lines = [line for line in logged.splitlines() if "id=r-gone" in line]
    assert len(lines) == 1, logged
    assert ACCESS_TEXT.match(lines[0])


async def test_the_listening_line_names_the_bound_port_under_uvloop(
    bundle_file: Path, ca_file: Path, tmp_path: Path
) -> None:
    # `run` uses uvloop when the `speed` extra is installed; its server is not an
    # asyncio.Server, and the port 0 picked must still be found and logged.
    pytest.importorskip("uvloop")
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "routes:\n  - name: zero\n    listen: 127.0.0.1:0\n    upstream: https://localhost:1\n"
        f"    credentials: {{pem: {bundle_file.name}}}\n    tls: {{ca_file: {ca_file.name}}}\n"
        "    timeouts: {shutdown: 1s}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "-c", str(config), "--log-format", "json",
        cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = ""
            while "listening on" not in line:
                raw = await proc.stdout.readline()
                assert raw, "the sidecar exited"
                line = json.loads(raw)["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 15)
    m = re.search(r"listening on http://127\.0\.0\.1:(\d+),", line)
    assert m, line
    assert m.group(1) != "0", line
