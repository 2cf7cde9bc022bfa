"""The foundation commands of the CLI: --version, cert inspect/export-public, init, check.

In-process with click's CliRunner, plus one real ``python -m sidecar`` run to
prove that a user error reaches the terminal as one line and exit code 2.
Every certificate is generated at test time (conftest.py, sidecar.demo.pki).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

import sidecar
import sidecar.demo.pki
from sidecar import __version__
from sidecar.cli import main
from sidecar.config import load_config
from sidecar.demo.pki import Issued, new_key
from tests.conftest import PKI

P12_PASSWORD = "p12 pass"
KEY_PASSWORD = "key pass"
NOW = dt.datetime.now(dt.UTC)
EXAMPLE = Path(sidecar.__file__).parent.parent / "config" / "sidecar.example.yaml"


# ------------------------------------------------------------------------ helpers


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    """A runner in an empty working folder, with no $SIDECAR_CONFIG around."""
    monkeypatch.delenv("SIDECAR_CONFIG", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return CliRunner()


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def chain_of(issued: Issued) -> list[x509.Certificate]:
    return [issued.cert, *issued.parents]


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit 2, one line on stderr with every fragment, no traceback anywhere."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("mtls-sidecar: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, result.output
    assert result.exception is None
    assert "Traceback" not in result.output


def blocks(text: str) -> list[str]:
    return re.findall(r"-----BEGIN ([A-Z0-9 ]+)-----", text)


# ------------------------------------------------------------------------ bundles


@pytest.fixture(scope="module")
def expired(pki: PKI) -> Issued:
    return pki.intermediate.client(
        not_before=NOW - dt.timedelta(days=60), not_after=NOW - dt.timedelta(days=2)
    )


@pytest.fixture
def expired_file(expired: Issued, tmp_path: Path) -> Path:
    return write(tmp_path / "expired.pem", expired.btp_bundle())


@pytest.fixture
def mismatched_file(pki: PKI, tmp_path: Path) -> Path:
    """A BTP-style bundle whose key belongs to another certificate."""
    other = new_key()
    key = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return write(tmp_path / "mismatched.pem", key + pki.client.chain_pem())


@pytest.fixture
def p12_file(pki: PKI, tmp_path: Path) -> Path:
    c = pki.client
    data = pkcs12.serialize_key_and_certificates(
        b"client",
        c.key,
        c.cert,
        list(c.parents),
        serialization.BestAvailableEncryption(P12_PASSWORD.encode()),
    )
    return write(tmp_path / "client.p12", data)


@pytest.fixture
def encrypted_file(pki: PKI, tmp_path: Path) -> Path:
    return write(tmp_path / "encrypted.pem", pki.client.btp_bundle(KEY_PASSWORD.encode()))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    return write(tmp_path / "key-password", f"{KEY_PASSWORD}\n".encode())


# ------------------------------------------------------------------ version, help


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert_ok(result)
    assert result.stdout.strip() == f"mtls-sidecar, version {__version__}"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_commands(runner: CliRunner, flag: str) -> None:
    result = runner.invoke(main, [flag])
    assert_ok(result)
    for command in ("check", "init", "cert"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), result.stdout


def test_cert_help_lists_subcommands(runner: CliRunner) -> None:
    result = runner.invoke(main, ["cert", "--help"])
    assert_ok(result)
    assert "inspect" in result.stdout and "export-public" in result.stdout


def test_no_password_option_takes_a_value_on_the_command_line(runner: CliRunner) -> None:
    for command in (["cert", "inspect"], ["cert", "export-public"], ["check"]):
        result = runner.invoke(main, [*command, "--help"])
        assert_ok(result)
        assert "--password " not in result.stdout
        assert "--password-env" in result.stdout and "--password-file" in result.stdout


# ---------------------------------------------------------------------- cert inspect


def _sections(text: str) -> list[tuple[str, dict[str, str]]]:
    """``[n] role`` headings and their ``name: value`` lines."""
    out: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        if re.match(r"^\[\d+\] ", line):
            out.append((line, {}))
        elif line.startswith("    ") and out:
            name, _, value = line.strip().partition(":")
            out[-1][1][name] = value.strip()
    return out


def test_inspect_btp_bundle(runner: CliRunner, pki: PKI, bundle_file: Path) -> None:
    result = runner.invoke(main, ["cert", "inspect", str(bundle_file)])
    assert_ok(result)
    out = result.stdout
    first = out.splitlines()[0]
    assert first == (f"{bundle_file}: 3 certificate(s) in the chain, private key matches the leaf")
    sections = _sections(out)
    assert [title for title, _ in sections] == ["[1] leaf", "[2] intermediate", "[3] root"]
    for (_, fields), cert in zip(sections, chain_of(pki.client), strict=True):
        assert fields["subject"] == cert.subject.rfc4514_string()
        assert fields["issuer"] == cert.issuer.rfc4514_string()
        assert fields["serial"] == f"{cert.serial_number:X}"
        assert fields["sha256"] == fingerprint(cert)
        assert fields["valid"].startswith(
            f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}"
        )
        days = int(re.search(r"\((\d+) days left\)", fields["valid"]).group(1))  # type: ignore[union-attr]
        expected = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
        assert expected - 1 <= days <= expected + 1
        assert fields["SANs"] == "(none)"
    assert "CN=sidecar-technical-user" in sections[0][1]["subject"]
    assert "EXPIRED" not in out and "MISMATCH" not in out
    assert "PRIVATE KEY-----" not in out  # never prints key material
    assert result.stderr == ""


def test_inspect_shows_sans(runner: CliRunner, pki: PKI, tmp_path: Path) -> None:
    path = write(tmp_path / "server.pem", pki.server.key_pem() + pki.server.chain_pem())
    result = runner.invoke(main, ["cert", "inspect", str(path)])
    assert_ok(result)
    leaf = _sections(result.stdout)[0][1]
    assert leaf["SANs"] == "DNS:localhost, IP:127.0.0.1, IP:::1"


def test_inspect_json(runner: CliRunner, pki: PKI, bundle_file: Path) -> None:
    result = runner.invoke(main, ["cert", "inspect", str(bundle_file), "--json"])
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["source"] == str(bundle_file)
    assert report["chain_length"] == 3
    assert report["key_present"] is True
    assert report["key_matches_leaf"] is True
    assert report["leaf_expired"] is False
    assert report["leaf_not_yet_valid"] is False
    assert report["not_in_chain"] == []
    certs = report["certificates"]
    for entry, cert in zip(certs, chain_of(pki.client), strict=True):
        assert entry["subject"] == cert.subject.rfc4514_string()
        assert entry["issuer"] == cert.issuer.rfc4514_string()
        assert entry["serial"] == f"{cert.serial_number:X}"
        assert entry["sha256"] == fingerprint(cert)
        assert entry["not_before"] == cert.not_valid_before_utc.isoformat()
        assert entry["not_after"] == cert.not_valid_after_utc.isoformat()
        assert isinstance(entry["days_left"], int) and entry["days_left"] > 300
        assert entry["sans"] == []
        assert entry["expired"] is False
    assert [c["is_ca"] for c in certs] == [False, True, True]
    assert [c["self_signed"] for c in certs] == [False, False, True]
    assert "PRIVATE KEY" not in result.stdout


def test_inspect_reorders_a_shuffled_bundle_leaf_first(
    runner: CliRunner, pki: PKI, tmp_path: Path
) -> None:
    root, inter, leaf = (
        c.public_bytes(serialization.Encoding.PEM) for c in reversed(chain_of(pki.client))
    )
    path = write(tmp_path / "shuffled.pem", root + leaf + pki.client.key_pem() + inter)
    result = runner.invoke(main, ["cert", "inspect", str(path), "--json"])
    assert_ok(result)
    subjects = [c["subject"] for c in json.loads(result.stdout)["certificates"]]
    assert subjects == [c.subject.rfc4514_string() for c in chain_of(pki.client)]


def test_inspect_expired_bundle_is_flagged_but_exits_0(
    runner: CliRunner, expired: Issued, expired_file: Path
) -> None:
    result = runner.invoke(main, ["cert", "inspect", str(expired_file)])
    assert_ok(result)
    assert f"!! EXPIRED: the leaf expired on {expired.cert.not_valid_after_utc.isoformat()}" in (
        result.stdout
    )
    as_json = runner.invoke(main, ["cert", "inspect", str(expired_file), "--json"])
    assert_ok(as_json)
    report = json.loads(as_json.stdout)
    assert report["leaf_expired"] is True
    assert report["certificates"][0]["expired"] is True
    assert report["certificates"][0]["days_left"] < 0


def test_inspect_not_yet_valid_bundle_is_flagged(
    runner: CliRunner, pki: PKI, tmp_path: Path
) -> None:
    future = pki.intermediate.client(
        not_before=NOW + dt.timedelta(days=2), not_after=NOW + dt.timedelta(days=30)
    )
    path = write(tmp_path / "future.pem", future.btp_bundle())
    result = runner.invoke(main, ["cert", "inspect", str(path)])
    assert_ok(result)
    assert "!! NOT YET VALID" in result.stdout


def test_inspect_mismatched_key_is_flagged_but_exits_0(
    runner: CliRunner, mismatched_file: Path
) -> None:
    result = runner.invoke(main, ["cert", "inspect", str(mismatched_file)])
    assert_ok(result)
    assert "PRIVATE KEY DOES NOT MATCH THE LEAF" in result.stdout.splitlines()[0]
    assert "!! KEY MISMATCH" in result.stdout
    report = json.loads(
        runner.invoke(main, ["cert", "inspect", str(mismatched_file), "--json"]).stdout
    )
    assert report["key_present"] is True
    assert report["key_matches_leaf"] is False


def test_inspect_chain_without_key(runner: CliRunner, pki: PKI, tmp_path: Path) -> None:
    path = write(tmp_path / "chain.pem", pki.client.chain_pem(), 0o644)
    result = runner.invoke(main, ["cert", "inspect", str(path), "--json"])
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["key_present"] is False
    assert report["key_matches_leaf"] is None
    text = runner.invoke(main, ["cert", "inspect", str(path)])
    assert "no private key" in text.stdout.splitlines()[0]


def test_inspect_with_separate_key_file(runner: CliRunner, pki: PKI, tmp_path: Path) -> None:
    chain = write(tmp_path / "chain.pem", pki.client.chain_pem(), 0o644)
    key = write(tmp_path / "client.key", pki.client.key_pem())
    result = runner.invoke(main, ["cert", "inspect", str(chain), "--key", str(key)])
    assert_ok(result)
    assert "private key matches the leaf" in result.stdout


def test_inspect_pkcs12_with_password_env(runner: CliRunner, pki: PKI, p12_file: Path) -> None:
    result = runner.invoke(
        main,
        ["cert", "inspect", str(p12_file), "--password-env", "P12_PW", "--json"],
        env={"P12_PW": P12_PASSWORD},
    )
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["chain_length"] == 3
    assert report["key_matches_leaf"] is True
    assert report["certificates"][0]["sha256"] == fingerprint(pki.client.cert)


def test_inspect_encrypted_key_with_password_file(
    runner: CliRunner, encrypted_file: Path, password_file: Path
) -> None:
    result = runner.invoke(
        main, ["cert", "inspect", str(encrypted_file), "--password-file", str(password_file)]
    )
    assert_ok(result)
    assert "3 certificate(s) in the chain, private key matches the leaf" in result.stdout


def test_inspect_encrypted_key_with_password_env(runner: CliRunner, encrypted_file: Path) -> None:
    result = runner.invoke(
        main,
        ["cert", "inspect", str(encrypted_file), "--password-env", "KEY_PW"],
        env={"KEY_PW": KEY_PASSWORD},
    )
    assert_ok(result)


def test_both_password_options_are_a_usage_error(
    runner: CliRunner, encrypted_file: Path, password_file: Path
) -> None:
    result = runner.invoke(
        main,
        [
            "cert",
            "inspect",
            str(encrypted_file),
            "--password-env",
            "KEY_PW",
            "--password-file",
            str(password_file),
        ],
        env={"KEY_PW": KEY_PASSWORD},
    )
    assert_user_error(result, "--password-env", "--password-file", "not both")


def test_key_option_with_pkcs12_is_a_usage_error(
    runner: CliRunner, p12_file: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        main,
        [
            "cert",
            "inspect",
            str(p12_file),
            "--key",
            str(tmp_path / "k.pem"),
            "--password-env",
            "P12_PW",
        ],
        env={"P12_PW": P12_PASSWORD},
    )
    assert_user_error(result, "--key", "PKCS#12")


def test_wrong_password_for_pkcs12(runner: CliRunner, p12_file: Path) -> None:
    result = runner.invoke(
        main,
        ["cert", "inspect", str(p12_file), "--password-env", "P12_PW"],
        env={"P12_PW": "wrong"},
    )
    assert_user_error(result, str(p12_file), "wrong password")


def test_wrong_password_for_encrypted_key(
    runner: CliRunner, encrypted_file: Path, tmp_path: Path
) -> None:
    bad = write(tmp_path / "bad-password", b"wrong\n")
    result = runner.invoke(
        main, ["cert", "inspect", str(encrypted_file), "--password-file", str(bad)]
    )
    assert_user_error(result, str(encrypted_file), "wrong password")


def test_missing_password(runner: CliRunner, encrypted_file: Path, p12_file: Path) -> None:
    assert_user_error(
        runner.invoke(main, ["cert", "inspect", str(encrypted_file)]),
        str(encrypted_file),
        "encrypted",
        "--password-env",
    )
    assert_user_error(
        runner.invoke(main, ["cert", "inspect", str(p12_file)]),
        str(p12_file),
        "needs a password",
    )


def test_password_env_not_set(runner: CliRunner, p12_file: Path) -> None:
    result = runner.invoke(
        main, ["cert", "inspect", str(p12_file), "--password-env", "SIDECAR_TEST_UNSET_PW"]
    )
    assert_user_error(result, "SIDECAR_TEST_UNSET_PW is not set")


def test_password_file_missing(runner: CliRunner, encrypted_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-password-here"
    result = runner.invoke(
        main, ["cert", "inspect", str(encrypted_file), "--password-file", str(missing)]
    )
    assert_user_error(result, str(missing), "not found")


def _jks(tmp_path: Path) -> Path:
    return write(tmp_path / "client.jks", b"\xfe\xed\xfe\xed" + b"\x00" * 60)


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda d, p: d / "missing.pem", "file not found"),
        (lambda d, p: d, "is a directory"),
        (lambda d, p: write(d / "empty.pem", b""), "the file is empty"),
        (lambda d, p: write(d / "blank.pem", b"  \n\n"), "the file is empty"),
        (lambda d, p: write(d / "garbage.bin", bytes(range(7, 200))), "not a certificate"),
        (lambda d, p: write(d / "notes.txt", b"hello, this is not a bundle\n"), "not a cert"),
        (lambda d, p: write(d / "key-only.pem", p.client.key_pem()), "no certificate"),
        (lambda d, p: write(d / "cut.pem", p.client.btp_bundle()[:-200]), "cut.pem"),
        (lambda d, p: _jks(d), "keytool -importkeystore"),
    ],
    ids=[
        "missing",
        "directory",
        "empty",
        "blank",
        "garbage",
        "text",
        "key-only",
        "truncated",
        "jks",
    ],
)
@pytest.mark.parametrize("command", ["inspect", "export-public"])
def test_unreadable_bundle_exits_2_with_one_line(
    runner: CliRunner,
    pki: PKI,
    tmp_path: Path,
    make: Callable[[Path, PKI], Path],
    phrase: str,
    command: str,
) -> None:
    path = make(tmp_path, pki)
    result = runner.invoke(main, ["cert", command, str(path)])
    assert_user_error(result, str(path), phrase)
    assert result.stdout == ""


def test_der_certificate_is_readable(runner: CliRunner, pki: PKI, tmp_path: Path) -> None:
    path = write(tmp_path / "leaf.der", pki.client.cert.public_bytes(serialization.Encoding.DER))
    result = runner.invoke(main, ["cert", "inspect", str(path), "--json"])
    assert_ok(result)
    report = json.loads(result.stdout)
    assert report["chain_length"] == 1 and report["key_present"] is False


# ------------------------------------------------------------------ cert export-public


def _certs_in(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode())


def test_export_public_to_file(
    runner: CliRunner, pki: PKI, bundle_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "public.pem"
    result = runner.invoke(main, ["cert", "export-public", str(bundle_file), "-o", str(out)])
    assert_ok(result)
    text = out.read_text()
    assert blocks(text) == ["CERTIFICATE"] * 3
    assert "PRIVATE KEY" not in text
    assert _certs_in(text) == chain_of(pki.client)
    assert result.stdout == ""
    assert result.stderr.strip() == f"wrote 3 certificate(s), no key, to {out}"


def test_export_public_to_stdout(runner: CliRunner, pki: PKI, bundle_file: Path) -> None:
    result = runner.invoke(main, ["cert", "export-public", str(bundle_file)])
    assert_ok(result)
    assert blocks(result.stdout) == ["CERTIFICATE"] * 3
    assert "PRIVATE KEY" not in result.output
    assert _certs_in(result.stdout) == chain_of(pki.client)
    assert result.stdout == pki.client.chain_pem().decode()


def test_export_public_reorders_leaf_first(runner: CliRunner, pki: PKI, tmp_path: Path) -> None:
    root, inter, leaf = (
        c.public_bytes(serialization.Encoding.PEM) for c in reversed(chain_of(pki.client))
    )
    path = write(tmp_path / "shuffled.pem", inter + pki.client.key_pem() + root + leaf)
    result = runner.invoke(main, ["cert", "export-public", str(path)])
    assert_ok(result)
    assert _certs_in(result.stdout) == chain_of(pki.client)


def test_export_public_from_pkcs12(
    runner: CliRunner, pki: PKI, p12_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "public.pem"
    result = runner.invoke(
        main,
        ["cert", "export-public", str(p12_file), "--password-env", "P12_PW", "-o", str(out)],
        env={"P12_PW": P12_PASSWORD},
    )
    assert_ok(result)
    text = out.read_text()
    assert blocks(text) == ["CERTIFICATE"] * 3
    assert _certs_in(text) == chain_of(pki.client)


def test_export_public_from_encrypted_pem(
    runner: CliRunner, pki: PKI, encrypted_file: Path, password_file: Path
) -> None:
    result = runner.invoke(
        main, ["cert", "export-public", str(encrypted_file), "--password-file", str(password_file)]
    )
    assert_ok(result)
    assert blocks(result.stdout) == ["CERTIFICATE"] * 3
    assert "PRIVATE KEY" not in result.output


def test_export_public_unwritable_output(
    runner: CliRunner, bundle_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "no-such-folder" / "public.pem"
    result = runner.invoke(main, ["cert", "export-public", str(bundle_file), "-o", str(out)])
    assert_user_error(result, str(out), "cannot write")


# ------------------------------------------------------------------------------ init


def test_init_writes_a_starter_config(runner: CliRunner) -> None:
    result = runner.invoke(main, ["init"])
    assert_ok(result)
    path = Path("sidecar.yaml")
    starter = resources.files("sidecar").joinpath("starter.yaml").read_text(encoding="utf-8")
    assert path.read_text(encoding="utf-8") == starter
    assert "wrote sidecar.yaml" in result.stdout
    assert "mtls-sidecar check -c sidecar.yaml" in result.stdout
    config = load_config(path, env={})
    assert config.routes[0].credentials.pem == path.resolve().parent / "certs/client-bundle.pem"
    assert starter.lstrip().startswith("#")  # commented


def test_init_refuses_to_overwrite(runner: CliRunner) -> None:
    path = Path("sidecar.yaml")
    path.write_text("mine\n")
    result = runner.invoke(main, ["init"])
    assert_user_error(result, "sidecar.yaml", "already exists", "--force")
    assert path.read_text() == "mine\n"
    forced = runner.invoke(main, ["init", "--force"])
    assert_ok(forced)
    assert path.read_text() != "mine\n"
    load_config(path, env={})


def test_init_to_stdout(runner: CliRunner) -> None:
    result = runner.invoke(main, ["init", "-o", "-"])
    assert_ok(result)
    starter = resources.files("sidecar").joinpath("starter.yaml").read_text(encoding="utf-8")
    assert result.stdout == starter
    assert not Path("sidecar.yaml").exists()
    assert not Path("-").exists()


def test_init_to_other_path(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "other.yaml"
    result = runner.invoke(main, ["init", "-o", str(out)])
    assert_ok(result)
    assert out.is_file()
    assert not Path("sidecar.yaml").exists()


# ------------------------------------------------------------------------------ check


@pytest.fixture
def demo_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """What `python -m sidecar.demo.pki certs` and the example config give a new user."""
    folder = tmp_path / "demo"
    assert sidecar.demo.pki.main([str(folder / "certs")]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == [
        "ca.pem",
        "server.pem",
        "server.key",
        "client-bundle.pem",
        "client-chain.pem",
    ]
    shutil.copy(EXAMPLE, folder / "config.yaml")
    return folder


def _leaf_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def test_check_example_config(runner: CliRunner, demo_dir: Path) -> None:
    result = runner.invoke(main, ["check", "-c", str(demo_dir / "config.yaml")])
    assert_ok(result)
    leaf = _leaf_of(demo_dir / "certs" / "client-chain.pem")
    out = result.stdout
    assert "route successfactors (listen 127.0.0.1:8080)" in out
    assert "upstream:     https://localhost:8443" in out
    assert "company id:   ACME1234" in out
    assert f"subject:      {leaf.subject.rfc4514_string()}" in out
    assert f"issuer:       {leaf.issuer.rfc4514_string()}" in out
    assert f"not after:    {leaf.not_valid_after_utc.isoformat()} (" in out
    days = int(re.search(r"\((\d+) days left\)", out).group(1))  # type: ignore[union-attr]
    assert 363 <= days <= 365
    assert "chain length: 3" in out
    assert "key matches:  yes" in out
    assert out.rstrip().endswith("OK: 1 route(s) ready")
    assert result.stderr == ""


def test_check_relative_config_path(
    runner: CliRunner, demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(demo_dir.parent)
    result = runner.invoke(main, ["check", "-c", "demo/config.yaml"])
    assert_ok(result)


def test_init_then_check(
    runner: CliRunner, demo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(demo_dir)
    assert_ok(runner.invoke(main, ["init"]))
    result = runner.invoke(main, ["check"])  # finds ./sidecar.yaml
    assert_ok(result)
    assert "upstream:     https://api.example-sf.test" in result.stdout


def test_check_sidecar_config_env(runner: CliRunner, demo_dir: Path) -> None:
    result = runner.invoke(main, ["check"], env={"SIDECAR_CONFIG": str(demo_dir / "config.yaml")})
    assert_ok(result)
    assert "company id:   ACME1234" in result.stdout


def test_check_option_beats_sidecar_config_env(runner: CliRunner, demo_dir: Path) -> None:
    result = runner.invoke(
        main,
        ["check", "-c", str(demo_dir / "config.yaml")],
        env={"SIDECAR_CONFIG": str(demo_dir / "missing.yaml")},
    )
    assert_ok(result)


def test_check_sidecar_config_env_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "gone.yaml"
    result = runner.invoke(main, ["check"], env={"SIDECAR_CONFIG": str(missing)})
    assert_user_error(result, str(missing), "config file not found")


def test_check_route_flags_without_a_file(runner: CliRunner, pki: PKI, bundle_file: Path) -> None:
    result = runner.invoke(
        main,
        [
            "check",
            "--upstream",
            "https://h.example.test",
            "--cert",
            str(bundle_file),
            "--company-id",
            "FLAGCO",
            "--header",
            "X-Extra: 1",
        ],
    )
    assert_ok(result)
    assert "upstream:     https://h.example.test" in result.stdout
    assert "company id:   FLAGCO" in result.stdout
    assert f"subject:      {pki.client.cert.subject.rfc4514_string()}" in result.stdout
    assert "chain length: 3" in result.stdout


def test_check_route_flags_relative_to_cwd(runner: CliRunner, pki: PKI, bundle_file: Path) -> None:
    shutil.copy(bundle_file, "bundle.pem")
    result = runner.invoke(main, ["check", "--upstream", "https://h.test", "--cert", "bundle.pem"])
    assert_ok(result)
    assert f"pem {Path.cwd() / 'bundle.pem'}" in result.stdout


def test_check_route_flags_override_file(
    runner: CliRunner, demo_dir: Path, expired_file: Path
) -> None:
    result = runner.invoke(
        main,
        ["check", "-c", str(demo_dir / "config.yaml"), "--company-id", "OVERRIDE"],
    )
    assert_ok(result)
    assert "company id:   OVERRIDE" in result.stdout
    # --cert replaces the file's bundle: the expired one makes check fail.
    result = runner.invoke(
        main, ["check", "-c", str(demo_dir / "config.yaml"), "--cert", str(expired_file)]
    )
    assert result.exit_code == 2


def test_check_route_flags_with_two_routes_file(runner: CliRunner, demo_dir: Path) -> None:
    text = (demo_dir / "config.yaml").read_text()
    text += (
        "  - name: second\n    listen: 127.0.0.1:8081\n    upstream: https://b.test\n"
        "    credentials: {pem: certs/client-bundle.pem}\n"
    )
    (demo_dir / "config.yaml").write_text(text)
    ok = runner.invoke(main, ["check", "-c", str(demo_dir / "config.yaml")])
    assert_ok(ok)
    assert ok.stdout.rstrip().endswith("OK: 2 route(s) ready")
    result = runner.invoke(
        main, ["check", "-c", str(demo_dir / "config.yaml"), "--company-id", "X"]
    )
    assert_user_error(result, "route flags cannot be combined", "2 routes")


def test_check_bad_flag_names_the_flag(runner: CliRunner, bundle_file: Path) -> None:
    result = runner.invoke(
        main, ["check", "--upstream", "http://h.test", "--cert", str(bundle_file)]
    )
    assert_user_error(result, "--upstream", "https://")
    result = runner.invoke(main, ["check", "--cert", str(bundle_file)])
    assert_user_error(result, "routes[0].upstream", "--upstream")
    result = runner.invoke(
        main,
        [
            "check",
            "--upstream",
            "https://h.test",
            "--cert",
            str(bundle_file),
            "--header",
            "no colon",
        ],
    )
    assert_user_error(result, "--header", "Name: value")


def test_check_without_any_config(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check"])
    assert_user_error(result, "no configuration", "mtls-sidecar init")


def _write_config(folder: Path, body: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(body)
    return path


def _failed_route(result: Result, *fragments: str) -> None:
    """check exits 2: one stderr line per failed route naming it and the cause."""
    assert_user_error(result, "routes[")
    assert "cannot start" in result.stdout
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_check_expired_certificate(runner: CliRunner, expired_file: Path, tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        f"routes:\n  - upstream: https://h.test\n    credentials: {{pem: {expired_file}}}\n",
    )
    result = runner.invoke(main, ["check", "-c", str(path)])
    _failed_route(result, str(expired_file), "expired on")
    assert "OK:" not in result.stdout


def test_check_mismatched_key(runner: CliRunner, mismatched_file: Path, tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        f"routes:\n  - upstream: https://h.test\n    credentials: {{pem: {mismatched_file}}}\n",
    )
    _failed_route(runner.invoke(main, ["check", "-c", str(path)]), "does not match")


def test_check_missing_certificate_file(runner: CliRunner, tmp_path: Path) -> None:
    path = _write_config(
        tmp_path, "routes:\n  - upstream: https://h.test\n    credentials: {pem: nope.pem}\n"
    )
    result = runner.invoke(main, ["check", "-c", str(path)])
    _failed_route(result, str(tmp_path / "nope.pem"), "file not found")


def test_check_one_bad_route_of_two(runner: CliRunner, demo_dir: Path, expired_file: Path) -> None:
    text = (demo_dir / "config.yaml").read_text()
    text += (
        "  - name: old\n    listen: 127.0.0.1:8081\n    upstream: https://b.test\n"
        f"    credentials: {{pem: {expired_file}}}\n"
    )
    path = _write_config(demo_dir, text)
    result = runner.invoke(main, ["check", "-c", str(path)])
    _failed_route(result, "1 of 2 route(s)", "expired")
    assert "key matches:  yes" in result.stdout  # the good route is still summarised


def test_check_missing_config_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert_user_error(result, str(path), "config file not found", "mtls-sidecar init")


def test_check_config_is_a_directory(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["check", "-c", str(tmp_path)])
    assert_user_error(result, str(tmp_path), "is a directory")


def test_check_bad_yaml_key(runner: CliRunner, bundle_file: Path, tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        f"routes:\n  - upstream: https://h.test\n    credentails:\n      pem: {bundle_file}\n",
    )
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert_user_error(
        result, "routes[0].credentails (config.yaml:3): unknown key", "did you mean 'credentials'"
    )
    assert result.stdout == ""


def test_check_invalid_yaml(runner: CliRunner, tmp_path: Path) -> None:
    path = _write_config(tmp_path, "routes:\n  - upstream: [https://h.test\n")
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert_user_error(result, "config.yaml:3: not valid YAML")


def test_check_unset_variable(runner: CliRunner, bundle_file: Path, tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        f"routes:\n  - upstream: https://h.test\n    company_id: ${{SIDECAR_TEST_NO_SUCH}}\n"
        f"    credentials: {{pem: {bundle_file}}}\n",
    )
    result = runner.invoke(main, ["check", "-c", str(path)])
    assert_user_error(result, "routes[0].company_id (config.yaml:3)", "SIDECAR_TEST_NO_SUCH")


# ------------------------------------------------------------------- a real process


def test_python_m_sidecar_user_error_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing-bundle.pem"
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "cert", "inspect", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mtls-sidecar: error: ")
    assert str(missing) in lines[0] and "file not found" in lines[0]


# ------------------------------------------------- known CLI bugs (reported, not yet fixed)


@pytest.mark.parametrize("target", ["no-such-folder/sidecar.yaml", "."])
def test_init_unwritable_output_is_a_user_error(runner: CliRunner, target: str) -> None:
    result = runner.invoke(main, ["init", "--force", "-o", target])
    assert_user_error(result, target, "cannot write")


def test_export_public_refuses_to_overwrite_its_input(runner: CliRunner, bundle_file: Path) -> None:
    result = runner.invoke(
        main, ["cert", "export-public", str(bundle_file), "-o", str(bundle_file)]
    )
    assert b"PRIVATE KEY" in bundle_file.read_bytes()
    assert_user_error(result, str(bundle_file))


def test_password_env_not_set_message_names_the_option(runner: CliRunner, p12_file: Path) -> None:
    result = runner.invoke(
        main, ["cert", "inspect", str(p12_file), "--password-env", "SIDECAR_TEST_UNSET_PW"]
    )
    line = assert_user_error(result, "SIDECAR_TEST_UNSET_PW is not set")
    assert line.startswith("mtls-sidecar: error: --password-env: "), line
