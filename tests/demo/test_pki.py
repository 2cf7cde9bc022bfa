"""`python -m sidecar.demo.pki`: the throwaway PKI a new user writes for the example config,
and the renewal the demo stages (`DemoPKI.renew_client`)."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidecar.credentials.identity import read_bundle
from sidecar.demo.pki import main, write_demo_pki
from tests.conftest import sidecar_env


def test_help_says_what_it_writes_and_where(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.demo.pki", "--help"],
        capture_output=True, text=True, timeout=30, env=sidecar_env(),
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    text = proc.stdout
    assert "usage: python -m sidecar.demo.pki DIR" in text
    assert "throwaway" in text and "test" in text
    assert "created if missing" in text and "overwritten" in text
    # Every file it writes is named as DIR/NAME, and the private ones say 0600.
    files = write_demo_pki(tmp_path / "certs")
    for path in files.files():
        assert f"DIR/{path.name} " in text, f"{path.name} is not in the help:\n{text}"
        entry = text[text.index(f"DIR/{path.name} ") :].split("\n  DIR/")[0]
        private = stat.S_IMODE(path.stat().st_mode) == 0o600
        assert ("0600" in entry) == private, entry


@pytest.mark.parametrize("args", [[], ["a", "b"], ["--bogus"]])
def test_wrong_arguments_print_the_usage_and_exit_2(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert re.search(r"usage: python -m sidecar\.demo\.pki .*DIR", err), err
    assert "--help" in err


def test_a_renewed_client_is_the_same_subject_with_a_new_key_from_the_same_issuer(
    tmp_path: Path,
) -> None:
    files = write_demo_pki(tmp_path)
    before = {path: path.read_bytes() for path in files.files()}
    renewed = files.renew_client()
    assert (renewed.bundle.name, renewed.chain.name) == (
        "client-bundle-renewed.pem",
        "client-chain-renewed.pem",
    )
    assert renewed.bundle.parent == renewed.chain.parent == tmp_path
    assert {path: path.read_bytes() for path in files.files()} == before  # nothing replaced

    old = read_bundle(pem=files.client_bundle)
    new = read_bundle(pem=renewed.bundle)
    assert new.key is not None and new.key_matches and not new.warnings
    assert new.leaf.subject == old.leaf.subject
    assert new.leaf.issuer == old.leaf.issuer
    assert new.chain[1:] == old.chain[1:]  # the same intermediate and root
    assert new.leaf.serial_number != old.leaf.serial_number
    assert new.leaf.not_valid_after_utc > old.leaf.not_valid_after_utc

    def public(cert: x509.Certificate) -> bytes:
        return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    assert public(new.leaf) != public(old.leaf)
    # The public chain is the renewed bundle without its key, leaf first.
    chain = x509.load_pem_x509_certificates(renewed.chain.read_bytes())
    assert chain == list(new.chain)
    assert b"PRIVATE KEY" not in renewed.chain.read_bytes()
    assert stat.S_IMODE(renewed.bundle.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.client_bundle.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
