"""``mtls-sidecar destination``: look at destinations in the SAP BTP Destination Service."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import click

from sidecar.commands.cert import print_report
from sidecar.commands.common import handle_errors


@click.group()
def destination() -> None:
    """Look at destinations in the SAP BTP Destination Service."""


@destination.command("show")
@click.argument("name")
@click.option("--service-key", type=click.Path(path_type=Path), metavar="FILE",
              help="Destination service key JSON (else VCAP_SERVICES, else "
              "$SERVICE_BINDING_ROOT).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def destination_show(name: str, service_key: Path | None, as_json: bool) -> None:
    """Fetch one destination and show it: never a password, secret, token or key."""
    from sidecar.credentials.destination import describe

    info = describe(asyncio.run(_fetch_destination(name, service_key)))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"destination {info['name']}")
    for label, key in (("URL", "url"), ("type", "type"), ("authentication", "authentication"),
                       ("proxy type", "proxy_type"), ("owner level", "owner_level"),
                       ("keystore", "keystore_location")):  # fmt: skip
        click.echo(f"  {label + ':':16}{info[key] or '-'}")
    for label, key in (("header", "headers"), ("query", "queries")):
        for k, v in info[key].items():
            click.echo(f"  {label + ':':16}{k}: {v}")
    if info["problem"]:
        click.secho(f"!! {info['problem']}", bold=True)
    if info["certificate"]:
        click.echo("")
        print_report(info["certificate"])


async def _fetch_destination(name: str, service_key: Path | None) -> Any:
    from sidecar.config import DestinationRef
    from sidecar.credentials.destination import DestinationClient, discover_binding

    binding = discover_binding(DestinationRef(name=name, service_key=service_key), os.environ)
    async with DestinationClient(binding) as client:
        return (await client.fetch(name)).destination
