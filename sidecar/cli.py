"""The ``mtls-sidecar`` command line: parse, call, map errors to exit codes.

The top-level commands (``check``, ``run``, ``demo``, ``healthcheck``,
``init``) live here; the ``cert`` and ``destination`` groups in
`sidecar.commands`, and what all of them share (one-line errors, exit codes,
options) in `sidecar.commands.common`. Exit codes: 0 success; 1 runtime
failure; 2 usage, configuration or credential error. A `SidecarError` becomes
one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable, Coroutine
from importlib import resources
from pathlib import Path
from typing import Any

import click

from sidecar import __version__, server
from sidecar.commands.cert import cert
from sidecar.commands.common import (
    EXIT_RUNTIME,
    EXIT_USAGE,
    F,
    fail,
    handle_errors,
    read_cli_bundle,
    warn,
    write_file,
)
from sidecar.commands.destination import destination
from sidecar.commands.trust import trust
from sidecar.config import (
    Config,
    LogConfig,
    RouteConfig,
    RouteFlags,
    find_config_file,
    load_config,
)
from sidecar.credentials.certinfo import identity_summary
from sidecar.credentials.identity import client_ssl_context
from sidecar.credentials.sources import CredentialSource, Loaded
from sidecar.errors import SidecarError, UsageError
from sidecar.forward.probe import probe as run_probe
from sidecar.forward.upstream import route_target
from sidecar.runtime import source_for
from sidecar.telemetry.logs import setup_logging

# ------------------------------------------------------------------ shared options


def route_options(f: F) -> F:
    """The route flags of DESIGN.md, shared by ``run`` and ``check``."""
    options = [
        click.option("--listen", metavar="HOST:PORT", help="Where to listen (127.0.0.1:8080)."),
        click.option("--upstream", metavar="URL", help="The upstream https:// base URL."),
        click.option("--cert", metavar="FILE", help="PEM bundle: chain and optionally the key."),
        click.option("--key", metavar="FILE", help="Separate private key file."),
        click.option("--pkcs12", metavar="FILE", help="PKCS#12 (.p12/.pfx) bundle."),
        click.option("--password-env", metavar="VAR", help="Variable holding the key password."),
        click.option("--password-file", metavar="FILE", help="File holding the key password."),
        click.option("--company-id", metavar="ID", help="Sent as successfactors-companyid."),
        click.option(
            "--header",
            "headers",
            multiple=True,
            metavar="'Name: value'",
            help="Header set on every upstream request (repeatable).",
        ),  # fmt: skip
        click.option("--destination", metavar="NAME", help="BTP destination to fetch."),
        click.option("--service-key", metavar="FILE", help="Destination service key JSON."),
        click.option("--ca-file", metavar="FILE", help="Extra trust anchors for the upstream."),
        click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --listen."),
        click.option("--token-env", metavar="VAR", help="Variable holding the inbound token."),
        click.option(
            "-c",
            "--config",
            "config_file",
            metavar="FILE",
            help="Config file (else $SIDECAR_CONFIG, else ./sidecar.yaml).",
        ),  # fmt: skip
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load(config_file: str | None, flag_values: dict[str, Any]) -> Config:
    flags = RouteFlags(**flag_values)
    return load_config(find_config_file(config_file), flags)


# ---------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "--version", prog_name="mtls-sidecar")
def main() -> None:
    """Local mutual-TLS sidecar proxy for SAP SuccessFactors and other mTLS APIs."""


@main.command()
@route_options
@click.option("--probe", is_flag=True, help="Also make a real mTLS request to the upstream.")
@click.option(
    "--candidate", type=click.Path(path_type=Path), metavar="FILE",
    help="With --probe: test this bundle (PEM or PKCS#12; the route's password settings) "
    "instead of the route's certificate, switching nothing. Exit 0 accepted, 1 not, "
    "2 unreadable.",
)  # fmt: skip
@handle_errors
def check(config_file: str | None, probe: bool, candidate: Path | None, **flag_values: Any) -> None:
    """Load the config and every credential, print a summary, and exit."""
    if candidate is not None and not probe:
        raise UsageError("--candidate goes with --probe", hint="check --probe --candidate FILE")
    config = _load(config_file, flag_values)
    failed = rejected = 0
    for i, route in enumerate(config.routes):
        click.echo(f"route {route.name} (listen {route.listen})")
        click.echo(f"  upstream:     {route.upstream or '(from the destination)'}")
        click.echo(f"  company id:   {route.company_id or '(none)'}")
        try:
            server.inbound_token(i, route, os.environ)
            loaded = _route_identity(route, i, candidate)
            identity = loaded.identity
            ctx = client_ssl_context(identity, ca_file=route.tls.ca_file)
            target = route_target(route, loaded, f"routes[{i}]")  # as `run` applies it
        except SidecarError as exc:
            click.echo(f"  ERROR:        {exc}")
            click.echo(f"mtls-sidecar: error: routes[{i}] ({route.name}): {exc}", err=True)
            failed += 1
            continue
        for w in identity.warnings:
            warn(w)
        s = identity_summary(identity)
        click.echo(f"  subject:      {s['subject']}")
        click.echo(f"  issuer:       {s['issuer']}")
        click.echo(f"  not after:    {s['not_after']} ({s['days_left']} days left)")
        click.echo(f"  chain length: {s['chain_length']}")
        click.echo("  key matches:  yes")
        if probe:
            result = asyncio.run(run_probe(route, ctx, target))
            click.echo(f"  probe:        handshake {result.handshake}; HTTP status "
                       f"{result.status if result.status is not None else '-'}")  # fmt: skip
            verdict = {
                "accepted": "ACCEPTED",
                "rejected": "NOT ACCEPTED",
                "inconclusive": "NOT ACCEPTED (could not be tested)",
            }[result.verdict]
            click.echo(f"  certificate:  {verdict}: {result.message}")
            rejected += not result.accepted
    if failed:
        what = f"the candidate {candidate} cannot be probed" if candidate else "cannot start"
        click.echo(f"FAILED: {failed} of {len(config.routes)} route(s): {what}")
        sys.exit(EXIT_USAGE)
    if rejected:
        fail(f"{rejected} route(s) failed the probe; see above", EXIT_RUNTIME)
    click.echo(f"OK: {len(config.routes)} route(s) ready")


@main.command()
@route_options
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
    help="Override log.level.",
)  # fmt: skip
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Override log.format.")  # fmt: skip
@click.option("--intercept", is_flag=True,
              help="Serve CONNECT for the upstreams' own names (https_proxy clients); "
              "see `trust show`.")  # fmt: skip
@handle_errors
def run(
    config_file: str | None,
    log_level: str | None,
    log_format: str | None,
    intercept: bool,
    **flag_values: Any,
) -> None:
    """Serve: plain HTTP on the listeners, mTLS to the upstreams."""
    config = _load(config_file, flag_values)
    if intercept:
        config = with_interception(config)
    setup_logging(config.log, level=log_level, fmt=log_format)
    _event_loop_runner()(server.run(config))


def with_interception(config: Config) -> Config:
    """``run --intercept``: interception on for every route (cert_dir as configured)."""
    routes = tuple(
        dataclasses.replace(r, intercept=dataclasses.replace(r.intercept, enabled=True))
        for r in config.routes
    )
    return dataclasses.replace(config, routes=routes)


@main.command()
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Sidecar port.")
@click.option(
    "--renewal", is_flag=True,
    help="Also stage a renewed client certificate the fake does not accept yet: watch it "
    "pending, upload its chain, see it switch.",
)  # fmt: skip
@handle_errors
def demo(port: int, renewal: bool) -> None:
    """Run a fake SuccessFactors API and the sidecar in front of it."""
    from sidecar.demo.app import run_demo

    setup_logging(LogConfig(level="info"))
    _event_loop_runner()(run_demo(port, say=lambda text: click.echo(text), renewal=renewal))


@main.command()
@click.option("--url", default="http://127.0.0.1:8080/-/ready", help="Readiness URL to ask.")
@click.option("--timeout", default=5.0, help="Seconds to wait for the answer.")
def healthcheck(url: str, timeout: float) -> None:
    """Exit 0 when the readiness endpoint answers 200 (for container probes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - local probe
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        fail(f"{url}: not reachable: {getattr(exc, 'reason', exc)}", EXIT_RUNTIME)
    if status != 200:
        fail(f"{url}: not ready (HTTP {status})", EXIT_RUNTIME)
    click.echo(f"{url}: ready")


def _route_identity(route: RouteConfig, index: int, candidate: Path | None) -> Loaded:
    """The route's credentials as `run` loads them, or the ``candidate`` bundle in their
    place (a destination still supplies the URL and headers)."""
    if candidate is None:
        source = source_for(route, index)
        click.echo(f"  credentials:  {source.description}")
        return asyncio.run(_load_once(source))
    click.echo(f"  credentials:  candidate {candidate} (instead of the route's)")
    creds = route.credentials
    where = f"routes[{index}].credentials"
    labels = (f"{where}.password_env", f"{where}.password_file")
    bundle = read_cli_bundle(
        candidate, None, creds.password_env, creds.password_file, labels=labels
    )
    identity = bundle.identity(warn_before=creds.warn_before)
    if creds.destination is None:
        return Loaded(identity)
    return dataclasses.replace(asyncio.run(_load_once(source_for(route, index))), identity=identity)


async def _load_once(source: CredentialSource) -> Loaded:
    try:
        loaded = await source.load()
    finally:
        await source.close()
    assert loaded is not None  # a first load always has a result
    return loaded


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """asyncio.run, on uvloop when the `speed` extra is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run  # type: ignore[no-any-return, unused-ignore]


@main.command()
@click.option("-o", "--output", default="sidecar.yaml", metavar="FILE",
              help="Where to write the starter config ('-' for stdout).")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@handle_errors
def init(output: str, force: bool) -> None:
    """Write a commented starter config."""
    text = resources.files("sidecar").joinpath("starter.yaml").read_text(encoding="utf-8")
    if output == "-":
        click.echo(text, nl=False)
        return
    path = Path(output)
    if path.exists() and not force:
        raise UsageError(f"{path}: already exists", hint="choose another -o, or add --force")
    write_file(path, text.encode())
    click.echo(f"wrote {path}; edit upstream, company_id and credentials, then run "
               f"`mtls-sidecar check -c {path}`")  # fmt: skip


main.add_command(cert)
main.add_command(destination)
main.add_command(trust)


def run_main() -> None:
    """Console-script entry point with a last-resort guard against tracebacks."""
    try:
        main(standalone_mode=True)
    except SystemExit:
        raise
    except Exception as exc:  # pragma: no cover - a bug; still no traceback for users
        if os.environ.get("SIDECAR_DEBUG"):
            raise
        fail(f"unexpected {type(exc).__name__}: {exc} (set SIDECAR_DEBUG=1 for details)",
             EXIT_RUNTIME)  # fmt: skip
