"""The sidecar as users and containers run it: its files, its process, its CLI."""

from __future__ import annotations

import resource
import subprocess
import sys
import threading
from pathlib import Path

from click.testing import CliRunner

from sidecar.cli import main
from tests.conftest import PKI, sidecar_env

START_TIMEOUT = 20.0  # seconds for a fresh interpreter to import and bind


SHUTDOWN = 5.0  # timeouts.shutdown of the configs below


def write_files(directory: Path, pki: PKI) -> tuple[Path, Path]:
    """The BTP-style client bundle (mode 0600) and the upstream's CA, in ``directory``."""
    bundle = directory / "client-bundle.pem"
    bundle.write_bytes(pki.client.btp_bundle())
    bundle.chmod(0o600)
    ca = directory / "ca.pem"
    ca.write_bytes(pki.root.cert_pem())
    return bundle, ca


def write_config(
    directory: Path, *, upstream: str, port: int, pem: str = "client-bundle.pem"
) -> Path:
    """A one-route config; paths are relative to it, as users write them."""
    path = directory / "sidecar.yaml"
    path.write_text(
        f"""\
log:
  level: info
routes:
  - name: cli
    listen: 127.0.0.1:{port}
    upstream: {upstream}
    company_id: ACME1234
    credentials:
      pem: {pem}
    tls:
      ca_file: ca.pem
    timeouts: {{connect: 5s, read: 10s, shutdown: {SHUTDOWN}s}}
""",
        encoding="utf-8",
    )
    return path


class SidecarProcess:
    """``python -m sidecar ARGS`` with stdout and stderr collected by a thread."""

    def __init__(self, *args: str, cwd: Path, open_files: int | None = None) -> None:
        self.lines: list[str] = []
        self.listening = threading.Event()

        def limit_files() -> None:  # in the child, before exec: as a container starts it
            if open_files is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", *args],
            cwd=cwd,
            env=sidecar_env(),
            preexec_fn=limit_files,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="sidecar-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "listening on http://" in line:
                self.listening.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_listening(self) -> None:
        if not self.listening.wait(START_TIMEOUT):
            raise AssertionError(f"the sidecar did not start:\n{self.output}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=cwd,
        env=sidecar_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_probe(config: Path, *args: str) -> tuple[int, str]:
    """``check -c CONFIG --probe ARGS`` in this process: (exit code, output)."""
    result = CliRunner().invoke(main, ["check", "-c", str(config), "--probe", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output
