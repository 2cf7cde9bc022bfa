"""``mtls-sidecar cert``: inspect and export client-certificate bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives import serialization

from sidecar.commands.common import handle_errors, password_options, read_cli_bundle, write_file
from sidecar.credentials.certinfo import bundle_report
from sidecar.errors import UsageError


@click.group()
def cert() -> None:
    """Inspect and export client-certificate bundles."""


@cert.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--key", type=click.Path(path_type=Path), help="Separate private key file.")
@password_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def cert_inspect(
    file: Path, key: Path | None, password_env: str | None, password_file: Path | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Show every certificate of a bundle and whether its key matches."""
    bundle = read_cli_bundle(file, key, password_env, password_file)
    report = bundle_report(bundle)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    print_report(report)


def print_report(report: dict[str, Any]) -> None:
    certs = report["certificates"]
    key = "no private key"
    if report["key_present"]:
        key = "private key matches the leaf" if report["key_matches_leaf"] else \
            "PRIVATE KEY DOES NOT MATCH THE LEAF"  # fmt: skip
    click.echo(f"{report['source']}: {len(certs)} certificate(s) in the chain, {key}")
    roles = ["leaf"] + ["intermediate"] * (len(certs) - 1)
    if len(certs) > 1 and certs[-1]["self_signed"]:
        roles[-1] = "root"
    for n, (c, role) in enumerate(zip(certs, roles, strict=True), 1):
        _print_cert(f"[{n}] {role}", c)
    for c in report["not_in_chain"]:
        _print_cert("[-] not part of the chain", c)
    if report["leaf_expired"]:
        click.secho(f"!! EXPIRED: the leaf expired on {certs[0]['not_after']}", bold=True)
    if report["leaf_not_yet_valid"]:
        click.secho(f"!! NOT YET VALID: the leaf is valid from {certs[0]['not_before']}", bold=True)
    if report["key_present"] and not report["key_matches_leaf"]:
        click.secho("!! KEY MISMATCH: the private key does not belong to the leaf", bold=True)
    for w in report["warnings"]:
        click.echo(f"warning: {w}")


def _print_cert(title: str, c: dict[str, Any]) -> None:
    click.echo(title)
    click.echo(f"    subject:   {c['subject']}")
    click.echo(f"    issuer:    {c['issuer']}")
    click.echo(f"    serial:    {c['serial']}")
    click.echo(f"    valid:     {c['not_before']} to {c['not_after']} ({c['days_left']} days left)")
    click.echo(f"    sha256:    {c['sha256']}")
    click.echo(f"    SANs:      {', '.join(c['sans']) or '(none)'}")


@cert.command("export-public")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--key", type=click.Path(path_type=Path), help="Separate private key file.")
@password_options
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here, not stdout.")
@handle_errors
def cert_export_public(
    file: Path, key: Path | None, password_env: str | None, password_file: Path | None,
    output: Path | None,
) -> None:  # fmt: skip
    """Write the certificate chain, leaf first, without any key.

    This is the file to upload to the SuccessFactors X.509 certificate mapping.
    """
    bundle = read_cli_bundle(file, key, password_env, password_file)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle.chain)
    if output is None:
        click.echo(pem.decode(), nl=False)
        return
    if any(output.resolve() == p.resolve() for p in (file, key) if p is not None):
        raise UsageError(
            f"{output}: is an input file; writing the public chain there would destroy the key",
            hint="choose another -o, e.g. public.pem",
        )
    write_file(output, pem)
    click.echo(f"wrote {len(bundle.chain)} certificate(s), no key, to {output}", err=True)
