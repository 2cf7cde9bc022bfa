"""``mtls-sidecar check --probe --candidate FILE``: is the renewed certificate mapped yet?

The candidate is tried against the route's upstream instead of the route's own
certificate, switching nothing. Exit 0 accepted, 1 refused or untested, 2 when
the candidate cannot be read. The upstream is a `MappedUpstream`, which records
the serial of every certificate a request came with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from sidecar.cli import main
from sidecar.demo.pki import Issued
from tests.conftest import PKI, free_port
from tests.support.fake_btp import FakeBTP, destination_json, serve, write_service_key
from tests.support.mapping import MappedUpstream, Refusal
from tests.support.process import check_probe, write_config, write_files

PROBE_PATH = "/odata/v2/"
CANDIDATE_CN = "renewed-technical-user"


def candidate_file(tmp_path: Path, issued: Issued, password: bytes | None = None) -> Path:
    path = tmp_path / "renewed.pem"
    path.write_bytes(issued.btp_bundle(password))
    path.chmod(0o600)
    return path


def test_an_accepted_candidate_exits_0_and_the_routes_own_certificate_is_not_used(
    pki: PKI, tmp_path: Path
) -> None:
    write_files(tmp_path, pki)
    renewed = pki.intermediate.client(CANDIDATE_CN)
    # Only the candidate is mapped: the route's own certificate would be refused.
    with MappedUpstream(pki, [renewed], refuse="http400") as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config, "--candidate", str(candidate_file(tmp_path, renewed)))
    assert code == 0, output
    assert "certificate:  ACCEPTED" in output
    assert f"subject:      CN={CANDIDATE_CN}" in output
    assert "renewed.pem (instead of the route's)" in output
    assert upstream.seen == [(PROBE_PATH, renewed.cert.serial_number)]


@pytest.mark.parametrize("refuse", ["http400", "alert"])
def test_a_refused_candidate_exits_1(pki: PKI, tmp_path: Path, refuse: Refusal) -> None:
    write_files(tmp_path, pki)
    ca = pki.other_ca if refuse == "alert" else pki.intermediate
    renewed = ca.client(CANDIDATE_CN)
    with MappedUpstream(pki, [pki.client], refuse=refuse) as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        code, output = check_probe(config, "--candidate", str(candidate_file(tmp_path, renewed)))
    assert code == 1, output
    assert "certificate:  NOT ACCEPTED:" in output
    assert "could not be tested" not in output
    assert f"subject:      CN={CANDIDATE_CN}" in output
    assert "1 route(s) failed the probe" in output
    if refuse == "http400":
        assert "No required SSL certificate was sent" in output
        assert upstream.seen == [(PROBE_PATH, renewed.cert.serial_number)]
    else:
        assert "rejected the client certificate" in output
        assert upstream.handshake_errors and not upstream.seen
    assert pki.client.cert.serial_number not in upstream.serials()


async def test_a_candidate_for_a_destination_route_goes_to_its_url_with_its_headers(
    pki: PKI, tmp_path: Path
) -> None:
    """The destination still supplies the URL and the headers; its keystore is not used."""
    name = "sap_hcmcloud_core_odata"
    write_files(tmp_path, pki)
    renewed = pki.intermediate.client(CANDIDATE_CN)
    fake = FakeBTP()
    with MappedUpstream(pki, [renewed], refuse="http400") as upstream:
        fake.destinations[name] = destination_json(
            name, url=upstream.url, keystore=("client.pem", pki.client.btp_bundle()),
            headers={"successfactors-companyid": "DEST1234"},
        )  # fmt: skip
        btp = await serve(fake)
        try:
            write_service_key(tmp_path / "key.json", btp.url)
            config = tmp_path / "sidecar.yaml"
            config.write_text(
                f"routes:\n  - name: dest\n    listen: 127.0.0.1:{free_port()}\n"
                f"    credentials:\n      destination: {{name: {name}, service_key: key.json}}\n"
                "    tls:\n      ca_file: ca.pem\n"
            )
            candidate = str(candidate_file(tmp_path, renewed))
            code, output = await asyncio.to_thread(check_probe, config, "--candidate", candidate)
        finally:
            await btp.runner.cleanup()
    assert code == 0, output
    assert "certificate:  ACCEPTED" in output
    assert upstream.seen == [(PROBE_PATH, renewed.cert.serial_number)]
    assert b"successfactors-companyid: DEST1234" in upstream.requests[0]


def test_an_unreachable_upstream_exits_1_and_says_the_candidate_could_not_be_tested(
    pki: PKI, tmp_path: Path
) -> None:
    write_files(tmp_path, pki)
    config = write_config(tmp_path, upstream=f"https://localhost:{free_port()}", port=free_port())
    renewed = pki.intermediate.client(CANDIDATE_CN)
    code, output = check_probe(config, "--candidate", str(candidate_file(tmp_path, renewed)))
    assert code == 1, output
    assert "NOT ACCEPTED (could not be tested)" in output
    assert "cannot connect" in output


def missing(pki: PKI, tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "no-such.pem", "file not found"


def not_a_bundle(pki: PKI, tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "notes.pem"
    path.write_text("the new certificate comes next week\n")
    return path, "not a certificate bundle"


def wrong_password(pki: PKI, tmp_path: Path) -> tuple[Path, str]:
    """Encrypted with another password than the route's ``password_file`` holds."""
    renewed = pki.intermediate.client(CANDIDATE_CN)
    path = candidate_file(tmp_path, renewed, b"right")
    return path, "wrong password for the encrypted private key"


@pytest.mark.parametrize("unreadable", [missing, not_a_bundle, wrong_password])
def test_an_unreadable_candidate_exits_2_naming_the_file_and_probes_nothing(
    pki: PKI, tmp_path: Path, unreadable: Callable[[PKI, Path], tuple[Path, str]]
) -> None:
    write_files(tmp_path, pki)
    (tmp_path / "pw.txt").write_text("wrong\n")
    (tmp_path / "pw.txt").chmod(0o600)
    path, why = unreadable(pki, tmp_path)
    with MappedUpstream(pki, [pki.client], refuse="http400") as upstream:
        config = write_config(tmp_path, upstream=upstream.url, port=free_port())
        text = config.read_text()
        config.write_text(text.replace("pem: client-bundle.pem\n", "pem: client-bundle.pem\n"
                                       "      password_file: pw.txt\n"))  # fmt: skip
        code, output = check_probe(config, "--candidate", str(path))
    assert code == 2, output
    assert f"{path}: {why}" in output
    assert "Traceback" not in output
    assert upstream.connections == 0  # nothing was tried


def test_candidate_without_probe_is_a_usage_error(pki: PKI, tmp_path: Path) -> None:
    write_files(tmp_path, pki)
    config = write_config(tmp_path, upstream="https://localhost:1", port=free_port())
    result = CliRunner().invoke(main, ["check", "-c", str(config), "--candidate", "renewed.pem"])
    assert result.exit_code == 2, result.output
    assert "--candidate goes with --probe" in result.output
    assert "check --probe --candidate FILE" in result.output
