"""The ``mtls-sidecar`` command line: parse, call, map errors to exit codes.

Exit codes: 0 success; 1 runtime failure; 2 usage, configuration or
credential error. A `SidecarError` becomes one line on stderr, never a
traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import Callable, Coroutine
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.hazmat.primitives import serialization

from sidecar import __version__, server
from sidecar.config import Config, LogConfig, RouteFlags, find_config_file, load_config
from sidecar.credentials.certinfo import bundle_report, identity_summary
from sidecar.credentials.identity import Bundle, client_ssl_context, read_bundle, read_password
from sidecar.credentials.sources import CredentialSource, Loaded
from sidecar.errors import SidecarError, UsageError
from sidecar.forward.probe import probe as run_probe
from sidecar.forward.upstream import route_target
from sidecar.runtime import source_for
from sidecar.telemetry.logs import setup_logging

F = TypeVar("F", bound=Callable[..., Any])

EXIT_RUNTIME = 1
EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"mtls-sidecar: error: {message}", err=True)
    sys.exit(code)


def _warn(message: str) -> None:
    click.echo(f"mtls-sidecar: warning: {message}", err=True)


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


def password_options(f: F) -> F:
    f = click.option("--password-file", type=click.Path(path_type=Path), metavar="FILE",
                     help="File holding the password.")(f)  # fmt: skip
    f = click.option("--password-env", metavar="VAR", help="Variable holding the password.")(f)
    return f


def handle_errors(f: F) -> F:
    """Turn `SidecarError`s into one line on stderr and their exit code."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except SidecarError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "--version", prog_name="mtls-sidecar")
def main() -> None:
    """Local mutual-TLS sidecar proxy for SAP SuccessFactors and other mTLS APIs."""


@main.command()
@route_options
@click.option("--probe", is_flag=True, help="Also make a real mTLS request to the upstream.")
@handle_errors
def check(config_file: str | None, probe: bool, **flag_values: Any) -> None:
    """Load the config and every credential, print a summary, and exit."""
    config = _load(config_file, flag_values)
    failed = rejected = 0
    for i, route in enumerate(config.routes):
        click.echo(f"route {route.name} (listen {route.listen})")
        click.echo(f"  upstream:     {route.upstream or '(from the destination)'}")
        click.echo(f"  company id:   {route.company_id or '(none)'}")
        try:
            server.inbound_token(i, route, os.environ)
            source = source_for(route, i)
            click.echo(f"  credentials:  {source.description}")
            loaded = asyncio.run(_load_once(source))
            identity = loaded.identity
            ctx = client_ssl_context(identity, ca_file=route.tls.ca_file)
            target = route_target(route, loaded, f"routes[{i}]")  # as `run` applies it
        except SidecarError as exc:
            click.echo(f"  ERROR:        {exc}")
            click.echo(f"mtls-sidecar: error: routes[{i}] ({route.name}): {exc}", err=True)
            failed += 1
            continue
        for w in identity.warnings:
            _warn(w)
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
            verdict = "ACCEPTED" if result.accepted else "NOT ACCEPTED"
            click.echo(f"  certificate:  {verdict}: {result.message}")
            rejected += not result.accepted
    if failed:
        click.echo(f"FAILED: {failed} of {len(config.routes)} route(s) cannot start")
        sys.exit(EXIT_USAGE)
    if rejected:
        _fail(f"{rejected} route(s) failed the probe; see above", EXIT_RUNTIME)
    click.echo(f"OK: {len(config.routes)} route(s) ready")


@main.command()
@route_options
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
    help="Override log.level.",
)  # fmt: skip
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Override log.format.")  # fmt: skip
@handle_errors
def run(
    config_file: str | None, log_level: str | None, log_format: str | None, **flag_values: Any
) -> None:
    """Serve: plain HTTP on the listeners, mTLS to the upstreams."""
    config = _load(config_file, flag_values)
    setup_logging(config.log, level=log_level, fmt=log_format)
    _event_loop_runner()(server.run(config))


@main.command()
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Sidecar port.")
@handle_errors
def demo(port: int) -> None:
    """Run a fake SuccessFactors API and the sidecar in front of it."""
    from sidecar.demo.app import run_demo

    setup_logging(LogConfig(level="info"))
    _event_loop_runner()(run_demo(port, say=lambda text: click.echo(text)))


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
        _fail(f"{url}: not reachable: {getattr(exc, 'reason', exc)}", EXIT_RUNTIME)
    if status != 200:
        _fail(f"{url}: not ready (HTTP {status})", EXIT_RUNTIME)
    click.echo(f"{url}: ready")


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
    _write(path, text.encode())
    click.echo(f"wrote {path}; edit upstream, company_id and credentials, then run "
               f"`mtls-sidecar check -c {path}`")  # fmt: skip


@main.group()
def cert() -> None:
    """Inspect and export client-certificate bundles."""


def _read_cli_bundle(
    file: Path, key: Path | None, password_env: str | None, password_file: Path | None
) -> Bundle:
    if password_env and password_file:
        raise UsageError("give --password-env or --password-file, not both")
    password = read_password(
        password_env=password_env,
        password_file=password_file,
        env_label="--password-env",
        file_label="--password-file",
    )
    is_p12 = file.suffix.lower() in (".p12", ".pfx")
    if is_p12 and key is not None:
        raise UsageError("--key goes with a PEM bundle, not with PKCS#12")
    return read_bundle(
        pem=None if is_p12 else file, pkcs12_path=file if is_p12 else None, key=key,
        password=password,
    )  # fmt: skip


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
    bundle = _read_cli_bundle(file, key, password_env, password_file)
    report = bundle_report(bundle)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_report(report)


def _print_report(report: dict[str, Any]) -> None:
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
    bundle = _read_cli_bundle(file, key, password_env, password_file)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle.chain)
    if output is None:
        click.echo(pem.decode(), nl=False)
        return
    if any(output.resolve() == p.resolve() for p in (file, key) if p is not None):
        raise UsageError(
            f"{output}: is an input file; writing the public chain there would destroy the key",
            hint="choose another -o, e.g. public.pem",
        )
    _write(output, pem)
    click.echo(f"wrote {len(bundle.chain)} certificate(s), no key, to {output}", err=True)


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot write: {exc.strerror or exc}",
            hint="check that the folder exists and is writable",
        ) from None


@main.group()
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
        _print_report(info["certificate"])


async def _fetch_destination(name: str, service_key: Path | None) -> Any:
    from sidecar.config import DestinationRef
    from sidecar.credentials.destination import DestinationClient, discover_binding

    binding = discover_binding(DestinationRef(name=name, service_key=service_key), os.environ)
    async with DestinationClient(binding) as client:
        return (await client.fetch(name)).destination


def run_main() -> None:
    """Console-script entry point with a last-resort guard against tracebacks."""
    try:
        main(standalone_mode=True)
    except SystemExit:
        raise
    except Exception as exc:  # pragma: no cover - a bug; still no traceback for users
        if os.environ.get("SIDECAR_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set SIDECAR_DEBUG=1 for details)",
              EXIT_RUNTIME)  # fmt: skip
