"""README.md stays true to the code.

- It opens with the two commands (install and demo; install and test), and
  .ci/run runs the same test command.
- Its configuration reference has one row per key of the config dataclasses,
  with the default the code uses, and no row for a key that does not exist.
- Its troubleshooting tables cover every error code of
  sidecar.forward.failures.ERROR_CODES with its status, and every warning
  sidecar.credentials.identity can emit (each is produced here and matched to a row).
- Every command and option of the CLI is named, and shell completion works
  the way the README says.
- It says which answers link rewriting leaves alone ($batch), as the code does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import sidecar.credentials.identity
from sidecar.cli import main
from sidecar.config import (
    Config,
    ListenAddress,
    RouteConfig,
    UpstreamURL,
    parse_config,
    parse_duration,
    parse_size,
)
from sidecar.credentials.identity import read_bundle, read_bundle_bytes
from sidecar.forward.failures import ERROR_CODES
from sidecar.forward.rewrite import should_rewrite
from tests.conftest import PKI

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO_COMMAND = "python3 -m pip install . && mtls-sidecar demo"
TEST_COMMAND = "python3 -m pip install -q -e '.[test]' && python3 -m pytest"


def section(title: str) -> str:
    """The text of a ``##`` section (down to the next ``##`` heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """Cells of every Markdown table row in ``text`` (``\\|`` stays inside a cell)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            rows.append([c.strip() for c in cells])
    return rows


def code(cell: str) -> str | None:
    """The first `code span` of a cell."""
    match = re.search(r"`([^`]*)`", cell)
    return match.group(1) if match else None


# ------------------------------------------------------------ the two commands


def test_readme_starts_with_the_demo_and_the_test_command():
    blocks = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
    assert blocks[0] == ("sh", DEMO_COMMAND + "\n")
    assert blocks[1] == ("sh", TEST_COMMAND + "\n")


def test_ci_runs_the_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in lines


def test_links_and_anchors_resolve():
    slugs = {
        re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", README, flags=re.M)
    }
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if target.startswith("#"):
            assert target[1:] in slugs, f"no heading for {target}"
        elif "://" not in target:
            assert (ROOT / target).exists(), f"broken link {target}"


# ---------------------------------------------------- configuration reference


#: Dataclasses that are one YAML value (a string), not a mapping of keys.
VALUE_TYPES = (ListenAddress, UpstreamURL)


def _nested(annotation: Any) -> tuple[type | None, bool]:
    """The config dataclass inside an annotation, and whether it is a list of them."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found, many = _nested(arg)
            if found is not None:
                return found, many
        return None, False
    if origin is tuple:
        found, _ = _nested(typing.get_args(annotation)[0])
        return found, found is not None
    if dataclasses.is_dataclass(annotation) and annotation not in VALUE_TYPES:
        return annotation, False  # type: ignore[return-value]
    return None, False


#: Fields of the dataclasses that are not keys of the YAML file.
NOT_YAML_KEYS = {"source"}  # Config.source: the file the config came from
#: The default a field without one takes when the YAML leaves it out.
IMPLICIT_DEFAULTS = {"routes[].name": "default"}  # "routes[N]" after the first route


def config_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(key path, default, type) for every key of the YAML schema, walking the dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in NOT_YAML_KEYS:
            continue
        path = prefix + f.name
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        yield path, default, hints[f.name]
        nested, many = _nested(hints[f.name])
        if nested is not None:
            yield from config_keys(nested, f"{path}[]." if many else f"{path}.")


def reference() -> dict[str, list[str]]:
    rows = table_rows(section("Configuration").split("### Reference", 1)[1])
    assert rows[0] == ["key", "type", "default", "meaning"]
    out = {}
    for row in rows[1:]:
        key = code(row[0])
        assert key and key not in out, row
        out[key] = row
    return out


def assert_documented_default(key: str, default: Any, kind: Any, cell: str) -> None:
    written = code(cell)
    assert written is not None, f"{key}: the default cell has no `value`: {cell!r}"
    if default is dataclasses.MISSING:
        assert written == IMPLICIT_DEFAULTS.get(key, "required"), key
    elif default is None:
        assert written == "null", key
    elif isinstance(default, bool):
        assert written == str(default).lower(), key
    elif kind is float:  # every float of the config is a duration
        assert parse_duration(written) == default, f"{key}: {written} is not {default}s"
    elif isinstance(default, int):  # counts and sizes
        assert parse_size(written) == default, f"{key}: {written} is not {default}"
    elif isinstance(default, str):
        assert written == default, key
    elif isinstance(default, ListenAddress):
        assert written == str(default), key
    elif isinstance(default, Mapping) or dataclasses.is_dataclass(default):
        assert written == "{}", f"{key}: an omitted mapping is written `{{}}`"
    elif isinstance(default, tuple):
        assert written == "[]", key
    else:  # pragma: no cover - a new kind of default needs a rule here
        raise AssertionError(f"{key}: no rule for a default of type {type(default)}")


def test_reference_has_every_config_key_with_its_default():
    documented = reference()
    keys = {key: (default, kind) for key, default, kind in config_keys()}
    assert "routes[].limits.max_body" in keys and "log.query_values" in keys  # the walk works
    missing = sorted(set(keys) - set(documented))
    assert not missing, f"keys missing from the README reference: {missing}"
    stale = sorted(set(documented) - set(keys))
    assert not stale, f"README reference names keys the config does not have: {stale}"
    for key, (default, kind) in keys.items():
        row = documented[key]
        assert row[1] and row[3], f"{key}: type and meaning must not be empty"
        assert_documented_default(key, default, kind, row[2])


def test_config_examples_in_the_readme_are_valid(tmp_path: Path):
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", README, flags=re.S) if "routes:" in b]
    assert blocks
    for block in blocks:
        parse_config(block, base_dir=tmp_path, env={})  # raises ConfigError with the key path


def test_the_walk_covers_every_route_field():
    walked = {key.removeprefix("routes[].") for key, _, _ in config_keys()}
    assert {f.name for f in dataclasses.fields(RouteConfig)} <= walked


# ------------------------------------------------------------ troubleshooting


def test_links_in_batch_answers_are_said_to_pass_unchanged():
    assert not should_rewrite("multipart/mixed; boundary=batch_1", None)
    assert should_rewrite("application/json", None)
    said = "Links inside `$batch` answers (`multipart/mixed`) are not rewritten"
    paragraphs = [" ".join(p.split()) for p in section("Configuration").split("\n\n")]
    note = next((p for p in paragraphs if p.startswith(said)), None)
    assert note is not None, f"no paragraph starting: {said}"
    assert "Content-Length" in note  # and why: the parts declare their own lengths


def test_every_error_code_has_a_row_with_its_status():
    rows = table_rows(section("Troubleshooting"))
    statuses = {code(r[1]): r[0] for r in rows if len(r) == 3 and r[0].isdigit()}
    for error_code, (status, _hint) in ERROR_CODES.items():
        assert error_code in statuses, f"{error_code} is missing from the troubleshooting table"
        assert statuses[error_code] == str(status), error_code
    assert set(statuses) == set(ERROR_CODES), "the table names codes the sidecar does not have"


def warning_rows() -> dict[str, str]:
    text = section("Troubleshooting").split("### Warnings about the certificate", 1)[1]
    text = text.split("###", 1)[0]
    rows = table_rows(text)
    assert rows[0] == ["warning says", "what to do"]
    return {code(r[0]) or "": r[1] for r in rows[1:]}


def identity_warnings(pki: PKI, tmp_path: Path) -> dict[str, str]:
    """Every kind of warning sidecar.credentials.identity emits, produced for real."""
    now = dt.datetime.now(dt.UTC)
    inter = pki.intermediate
    unrelated = pki.other_ca.cert_pem()

    def bundle_warnings(data: bytes) -> list[str]:
        return list(read_bundle_bytes(data, source="bundle.pem").warnings)

    produced = {
        "expiring": [
            w
            for w in read_bundle_bytes(
                inter.client(not_after=now + dt.timedelta(days=3)).btp_bundle(), source="b.pem"
            )
            .identity(warn_before=30 * 86400)
            .warnings
        ],
        "ca leaf": bundle_warnings(inter.client(is_ca=True).btp_bundle()),
        "no clientAuth": bundle_warnings(inter.client(client_auth=False).btp_bundle()),
        "leaf only": bundle_warnings(pki.client.key_pem() + pki.client.cert_pem()),
        "unrelated": bundle_warnings(pki.client.btp_bundle() + unrelated),
    }
    readable = tmp_path / "bundle.pem"
    readable.write_bytes(pki.client.btp_bundle())
    readable.chmod(0o644)
    produced["group readable"] = list(read_bundle(pem=readable).warnings)
    out = {}
    for kind, warnings in produced.items():
        assert len(warnings) == 1, f"{kind}: {warnings}"
        out[kind] = warnings[0]
    return out


def test_every_identity_warning_has_a_row(pki: PKI, tmp_path: Path):
    rows = warning_rows()
    warnings = identity_warnings(pki, tmp_path)
    used = set()
    for kind, warning in warnings.items():
        matching = [phrase for phrase in rows if phrase and phrase in warning]
        assert matching, f"no troubleshooting row for the {kind} warning: {warning}"
        used.update(matching)
    assert used == set(rows), f"rows for warnings the code does not emit: {set(rows) - used}"


def test_identity_emits_no_warning_this_file_does_not_produce():
    # A new warning in sidecar/credentials/identity.py needs a README row and a case above.
    source = Path(sidecar.credentials.identity.__file__).read_text()
    sites = source.count("warnings.append(") + source.count("warning = (")
    assert sites == 6


# ------------------------------------------------------------- command line


def commands(group: click.Group = main, prefix: str = "mtls-sidecar") -> Iterator[tuple[str, Any]]:
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            yield from commands(command, path)
        else:
            yield path, command


def test_every_command_and_option_is_in_the_readme():
    text = section("Commands")
    for path, command in commands():
        assert f"`{path}" in text, f"{path} is not in the README's command table"
        for param in command.params:
            if isinstance(param, click.Option):
                assert any(opt in README for opt in param.opts), f"{path} {param.opts}"
    assert "`mtls-sidecar --version`" in text


# ---------------------------------------------------------- shell completion


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nosort -F _mtls_sidecar_completion mtls-sidecar"),
        ("zsh", "#compdef mtls-sidecar"),
        ("fish", "complete --no-files --command mtls-sidecar"),
    ],
)
def test_completion_script_for_each_shell_the_readme_documents(shell: str, marker: str):
    result = CliRunner().invoke(
        main, [], prog_name="mtls-sidecar", env={"_MTLS_SIDECAR_COMPLETE": f"{shell}_source"}
    )
    assert result.exit_code == 0, result.output
    assert marker in result.stdout
    assert f"_MTLS_SIDECAR_COMPLETE={shell}_source mtls-sidecar" in section("Shell completion")


def test_completion_completes_commands_and_choices():
    def complete(words: str) -> list[str]:
        env = {
            "_MTLS_SIDECAR_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        result = CliRunner().invoke(main, [], prog_name="mtls-sidecar", env=env)
        assert result.exit_code == 0, result.output
        return result.stdout.splitlines()

    assert complete("mtls-sidecar ce") == ["plain,cert"]
    assert complete("mtls-sidecar cert ex") == ["plain,export-public"]
    assert complete("mtls-sidecar run --log-format j") == ["plain,json"]
