"""``mtls-sidecar trust show`` and ``run --intercept``'s start, in-process with CliRunner.

``trust show`` prints the interception certificate (made on first use, the
same one ``run`` serves), its SHA-256 fingerprint and one line per client;
``--bundle OUT`` writes the system store plus the certificate. Never a key.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from sidecar.cli import main, with_interception
from sidecar.config import load_config
from sidecar.intercept.trust import system_store


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.delenv("SIDECAR_CONFIG", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def config(tmp_path: Path, intercept: str = "{enabled: true, cert_dir: state}") -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "routes:\n"
        "  - name: sf\n"
        "    listen: 127.0.0.1:8181\n"
        "    upstream: https://api10.cert.successfactors.com\n"
        "    credentials: {pem: client.pem}\n"
        f"    intercept: {intercept}\n",
        encoding="utf-8",
    )
    return path


def certificates(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode())


def test_trust_show_prints_the_certificate_its_fingerprint_and_every_client(
    runner: CliRunner, tmp_path: Path
) -> None:
    result = runner.invoke(main, ["trust", "show", "-c", str(config(tmp_path))])
    assert result.exit_code == 0, result.output
    out = result.stdout
    (cert,) = certificates(out)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert f"# SHA-256 fingerprint: {fingerprint}" in out
    names = "api10.cert.successfactors.com, api10.successfactors.com"
    assert f"# route sf: interception certificate for {names}" in out
    cert_file = tmp_path / "state" / "sf.pem"
    assert f"file: {cert_file}" in out
    assert cert_file.read_bytes().decode() in out
    for client in ("curl:", "Python requests:", "Python httpx:", "Node.js:", "Java:",
                   "Postman:", "Linux store:", "macOS store:", "Windows store:"):  # fmt: skip
        assert re.search(rf"^#   {client}", out, flags=re.M), client
    assert "http://127.0.0.1:8181" in out
    assert "PRIVATE KEY" not in result.output
    # the whole output is a usable trust file: every line but the PEM is a comment
    pem_line = re.compile(r"-----(BEGIN|END) CERTIFICATE-----|[A-Za-z0-9+/=]{1,64}")
    assert all(line.startswith("#") or pem_line.fullmatch(line) for line in out.splitlines())
    ssl.create_default_context(cadata=out)
    # again: the same certificate (it is kept, not made per call)
    again = runner.invoke(main, ["trust", "show", "-c", str(config(tmp_path))])
    assert f"# SHA-256 fingerprint: {fingerprint}" in again.stdout


def test_bundle_is_the_system_store_plus_the_certificate(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "bundle.pem"
    result = runner.invoke(
        main, ["trust", "show", "-c", str(config(tmp_path)), "--bundle", str(out)]
    )
    assert result.exit_code == 0, result.output
    where, store = system_store()
    data = out.read_bytes()
    ours = (tmp_path / "state" / "sf.pem").read_bytes()
    assert data.startswith(store.rstrip(b"\n")) and data.endswith(ours)
    assert f"# wrote {out}: the system trust store ({where})" in result.stdout
    assert data.count(b"-----BEGIN CERTIFICATE-----") == store.count(b"-----BEGIN CERTIFICATE") + 1
    ssl.create_default_context(cafile=str(out))


def test_default_folder_is_the_state_dir(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["trust", "show", "-c", str(config(tmp_path, "{enabled: true}"))])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "xdg" / "mtls-sidecar" / "sf.pem").is_file()


def test_interception_off_still_shows_with_a_warning(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["trust", "show", "-c", str(config(tmp_path, "{cert_dir: s}"))])
    assert result.exit_code == 0
    assert "interception is off for every route" in result.stderr
    assert "mtls-sidecar run --intercept" in result.stderr
    assert len(certificates(result.stdout)) == 1


def test_unwritable_folder_exits_2_naming_it(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file")
    path = config(tmp_path, "{enabled: true, cert_dir: blocker/state}")
    result = runner.invoke(main, ["trust", "show", "-c", str(path)])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("mtls-sidecar: error: routes[0].intercept.cert_dir: cannot write")
    assert str(tmp_path / "blocker" / "state") in line and "hint:" in line
    assert "Traceback" not in result.output


def test_run_refuses_to_start_when_the_certificate_cannot_be_kept(
    runner: CliRunner, tmp_path: Path
) -> None:
    (tmp_path / "blocker").write_text("a file")
    path = config(tmp_path, "{cert_dir: blocker/state}")
    result = runner.invoke(main, ["run", "-c", str(path), "--intercept"])
    assert result.exit_code == 2
    assert "routes[0].intercept.cert_dir: cannot write the interception certificate" in (
        result.stderr
    )


def test_run_intercept_turns_it_on_for_every_route(tmp_path: Path) -> None:
    loaded = load_config(config(tmp_path, "{cert_dir: s}"))
    assert not loaded.routes[0].intercept.enabled
    (route,) = with_interception(loaded).routes
    assert route.intercept.enabled and route.intercept.cert_dir == tmp_path / "s"
