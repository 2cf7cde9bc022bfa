"""What every command shares: errors as one line on stderr, exit codes, common options.

Exit codes: 0 success; 1 runtime failure; 2 usage, configuration or
credential error. A `SidecarError` becomes one line on stderr, never a
traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sidecar.credentials.identity import Bundle, read_bundle, read_password
from sidecar.errors import SidecarError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_RUNTIME = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"mtls-sidecar: error: {message}", err=True)
    sys.exit(code)


def warn(message: str) -> None:
    click.echo(f"mtls-sidecar: warning: {message}", err=True)


def password_options(f: F) -> F:
    f = click.option("--password-file", type=click.Path(path_type=Path), metavar="FILE",
                     help="File holding the password.")(f)  # fmt: skip
    f = click.option("--password-env", metavar="VAR", help="Variable holding the password.")(f)
    return f


def read_cli_bundle(
    file: Path,
    key: Path | None,
    password_env: str | None,
    password_file: Path | None,
    *,
    labels: tuple[str, str] = ("--password-env", "--password-file"),
) -> Bundle:
    """A bundle named on the command line: PEM (+ ``key``) or PKCS#12 by its suffix.

    ``labels`` name where the password settings came from, for messages."""
    if password_env and password_file:
        raise UsageError(f"give {labels[0]} or {labels[1]}, not both")
    password = read_password(
        password_env=password_env,
        password_file=password_file,
        env_label=labels[0],
        file_label=labels[1],
    )
    is_p12 = file.suffix.lower() in (".p12", ".pfx")
    if is_p12 and key is not None:
        raise UsageError("--key goes with a PEM bundle, not with PKCS#12")
    return read_bundle(
        pem=None if is_p12 else file, pkcs12_path=file if is_p12 else None, key=key,
        password=password,
    )  # fmt: skip


def handle_errors(f: F) -> F:
    """Turn `SidecarError`s into one line on stderr and their exit code."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except SidecarError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def write_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot write: {exc.strerror or exc}",
            hint="check that the folder exists and is writable",
        ) from None
