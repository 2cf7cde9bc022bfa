"""Loading a config: finding the file, reading it, merging route flags, validating.

A config comes from a YAML file (see DESIGN.md), from route flags on the
command line, or from both (flags override the single route of a file). Both
paths go through the same validator (``sidecar.config.validate``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.config.schema import CONFIG_ENV, DEFAULT_CONFIG_NAME, Config, RouteFlags
from sidecar.config.tree import Raw, yaml_tree
from sidecar.config.validate import Reader
from sidecar.config.values import parse_header_line
from sidecar.errors import ConfigError, UsageError

# ------------------------------------------------------------------------- public


# Route flag -> key path inside routes[0]; used both to merge and to name the flag in errors.
_FLAG_PATHS: dict[str, tuple[str, ...]] = {
    "--listen": ("listen",),
    "--upstream": ("upstream",),
    "--cert": ("credentials", "pem"),
    "--key": ("credentials", "key"),
    "--pkcs12": ("credentials", "pkcs12"),
    "--password-env": ("credentials", "password_env"),
    "--password-file": ("credentials", "password_file"),
    "--company-id": ("company_id",),
    "--destination": ("credentials", "destination", "name"),
    "--service-key": ("credentials", "destination", "service_key"),
    "--ca-file": ("tls", "ca_file"),
    "--allow-remote": ("inbound", "allow_remote"),
    "--token-env": ("inbound", "token_env"),
}


def parse_config(
    text: str,
    *,
    filename: str = DEFAULT_CONFIG_NAME,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: RouteFlags | None = None,
    cwd: Path | None = None,
) -> Config:
    """Parse YAML text (and optional route flags) into a validated `Config`."""
    env = os.environ if env is None else env
    root = yaml_tree(text, filename)
    if flags is not None and flags.any_given():
        root = _merge_flags(root, flags, cwd or Path.cwd())
    reader = Reader(env, base_dir if base_dir is not None else Path.cwd())
    source = (base_dir / filename) if base_dir is not None else None
    return reader.config(root, source)


def config_from_flags(
    flags: RouteFlags, *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Config:
    """A one-route config built from route flags alone."""
    cwd = cwd or Path.cwd()
    root = _merge_flags(Raw({}, "command line"), flags, cwd)
    return Reader(os.environ if env is None else env, cwd).config(root, None)


def find_config_file(explicit: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """``-c FILE``, else ``$SIDECAR_CONFIG``, else ``./sidecar.yaml`` if it exists."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def load_config(
    path: Path | None,
    flags: RouteFlags | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read the config file (if any), merge route flags, validate."""
    flags = flags or RouteFlags()
    if path is None:
        if not flags.any_given():
            raise UsageError(
                "no configuration: no -c FILE, no $SIDECAR_CONFIG and no ./sidecar.yaml",
                hint="create one with `mtls-sidecar init`, or give route flags such as "
                "--upstream and --cert",
            )
        return config_from_flags(flags, env=env)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found",
            hint="check the path, or create one with `mtls-sidecar init`",
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    base = path.resolve().parent
    return parse_config(text, filename=path.name, base_dir=base, env=env, flags=flags)


def _merge_flags(root: Raw, flags: RouteFlags, cwd: Path) -> Raw:
    """Override the single route of ``root`` with the route flags."""
    top = root.value if isinstance(root.value, dict) else {}
    routes_v = top.get("routes")
    routes = routes_v.value if routes_v is not None and isinstance(routes_v.value, list) else []
    if len(routes) > 1:
        raise UsageError(
            f"route flags cannot be combined with a config file that has {len(routes)} routes",
            hint="edit the file, or use the flags without -c",
        )
    route = routes[0] if routes else Raw({}, "command line")
    if not isinstance(route.value, dict):
        route = Raw({}, route.where)
    values: dict[str, Any] = {
        "--listen": flags.listen,
        "--upstream": flags.upstream,
        "--cert": _abs(flags.cert, cwd),
        "--key": _abs(flags.key, cwd),
        "--pkcs12": _abs(flags.pkcs12, cwd),
        "--password-env": flags.password_env,
        "--password-file": _abs(flags.password_file, cwd),
        "--company-id": flags.company_id,
        "--destination": flags.destination,
        "--service-key": _abs(flags.service_key, cwd),
        "--ca-file": _abs(flags.ca_file, cwd),
        "--allow-remote": flags.allow_remote or None,
        "--token-env": flags.token_env,
    }
    creds = route.value.get("credentials")
    if any(values[f] for f in ("--cert", "--pkcs12", "--destination")) and creds is not None:
        # A credential source given on the command line replaces the file's source.
        kept = {
            k: v
            for k, v in (creds.value or {}).items()
            if k in ("password_env", "password_file", "warn_before")
        }
        route.value["credentials"] = Raw(kept, creds.where)
    for flag, value in values.items():
        if value is None:
            continue
        target = route
        keys = _FLAG_PATHS[flag]
        for key in keys[:-1]:
            nxt = target.value.get(key)
            if nxt is None or not isinstance(nxt.value, dict):
                nxt = Raw({}, flag)
                target.value[key] = nxt
            target = nxt
        target.value[keys[-1]] = Raw(value, flag)
    if flags.headers:
        headers = route.value.get("headers")
        merged = dict(headers.value) if headers and isinstance(headers.value, dict) else {}
        for line in flags.headers:
            try:
                name, value = parse_header_line(line)
            except ValueError as exc:
                raise ConfigError(f"--header: {exc}", hint="write --header 'Name: value'") from None
            merged[name] = Raw(value, "--header")
        route.value["headers"] = Raw(merged, "--header")
    top = dict(top)
    top["routes"] = Raw([route], routes_v.where if routes_v else "command line")
    return Raw(top, root.where)


def _abs(path: str | None, cwd: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else cwd / p)
