"""``mtls-sidecar trust``: the interception certificate, and how each client trusts it."""

from __future__ import annotations

from pathlib import Path

import click

from sidecar.commands.common import handle_errors, warn, write_file
from sidecar.config import LogConfig, find_config_file, load_config
from sidecar.intercept.certificate import route_certificates
from sidecar.intercept.trust import client_lines, system_store, trust_bundle
from sidecar.telemetry.logs import setup_logging


@click.group()
def trust() -> None:
    """The interception certificate (https_proxy clients) and how to trust it."""


@trust.command("show")
@click.option("-c", "--config", "config_file", metavar="FILE",
              help="Config file (else $SIDECAR_CONFIG, else ./sidecar.yaml).")  # fmt: skip
@click.option("--bundle", type=click.Path(path_type=Path), metavar="OUT",
              help="Also write the system trust store plus this certificate to OUT.")  # fmt: skip
@handle_errors
def trust_show(config_file: str | None, bundle: Path | None) -> None:
    """Print the interception certificate (made on first use), its fingerprint, and
    how curl, Python, Node, Java, Postman and the OS stores trust it."""
    setup_logging(LogConfig(level="warning"))
    config = load_config(find_config_file(config_file))
    shown = [(i, r) for i, r in enumerate(config.routes) if r.intercept.enabled]
    if not shown:
        warn(
            "interception is off for every route: turn it on with `intercept: {enabled: true}` "
            "or `mtls-sidecar run --intercept`; the certificate it will present:"
        )
        shown = list(enumerate(config.routes))
    published = b""
    for index, route in shown:
        certificates = route_certificates(route, index)
        current = certificates.current()
        pem = certificates.pem()
        published += pem
        click.echo(f"# route {route.name}: interception certificate for {', '.join(current.names)}")
        click.echo(f"# SHA-256 fingerprint: {current.fingerprint}")
        click.echo(f"# valid until {current.not_after.date()}; file: {current.cert_path}")
        for successor in certificates.published()[1:]:
            click.echo(
                f"# its successor, served from {current.not_after.date()} on: SHA-256 "
                f"{successor.fingerprint}, file: {successor.cert_path}; trust both"
            )
        click.echo(pem.decode("ascii"), nl=False)
        click.echo(f"# How each client trusts it (the sidecar as proxy: http://{route.listen}):")
        host = current.names[0]
        for line in client_lines(current.cert_path, f"http://{route.listen}", host, route.name):
            click.echo(f"#   {line}")
    if bundle is not None:
        where, store = system_store()
        write_file(bundle, trust_bundle(store, published))
        click.echo(f"# wrote {bundle}: the system trust store ({where}) plus the interception "
                   "certificate; give it to clients whose setting replaces the store "
                   "(REQUESTS_CA_BUNDLE, SSL_CERT_FILE, curl --cacert)")  # fmt: skip
