"""The package layout's rules (issue 13): no import cycles, and who may import whom.

Every ``import`` in ``sidecar/`` counts, also those under ``TYPE_CHECKING`` and
those inside functions: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports() -> dict[str, set[str]]:
    """Each module of sidecar/ and the modules of sidecar/ it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_the_packages() -> None:
    graph = _imports()
    for package in (
        "sidecar.config", "sidecar.credentials", "sidecar.forward", "sidecar.demo",
        "sidecar.intercept",
    ):  # fmt: skip
        assert package in graph, package
    assert "sidecar.forward.handler" in graph["sidecar.runtime"]


def test_no_import_cycles() -> None:
    graph = _imports()

    def reaches(start: str, goal: str) -> bool:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
        return False

    assert sorted(m for m in graph if reaches(m, m)) == []


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("sidecar.credentials", "sidecar.forward"),
        ("sidecar.credentials", "sidecar.runtime"),
        ("sidecar.credentials", "sidecar.server"),
        ("sidecar.forward", "sidecar.runtime"),
        ("sidecar.forward", "sidecar.server"),
        ("sidecar.forward", "sidecar.admin"),
        ("sidecar.admin", "sidecar.server"),
        ("sidecar.telemetry", "sidecar.forward"),
        ("sidecar.telemetry", "sidecar.credentials"),
        ("sidecar.config", "sidecar.forward"),
        ("sidecar.config", "sidecar.credentials"),
        ("sidecar.config", "sidecar.telemetry"),
        ("sidecar.config", "sidecar.runtime"),
        ("sidecar.config", "sidecar.intercept"),
        ("sidecar.credentials", "sidecar.intercept"),
        ("sidecar.intercept", "sidecar.runtime"),
        ("sidecar.intercept", "sidecar.server"),
        ("sidecar.intercept", "sidecar.admin"),
        ("sidecar.intercept", "sidecar.credentials"),
        ("sidecar.intercept", "sidecar.forward"),
    ],
)
def test_lower_packages_never_import_higher_ones(importer: str, imported: str) -> None:
    graph = _imports()
    wrong = sorted(
        f"{m} -> {dep}"
        for m, deps in graph.items()
        if _in(m, importer)
        for dep in deps
        if _in(dep, imported)
    )
    assert wrong == []


def test_the_bottom_modules_import_nothing_of_ours() -> None:
    """The header rulebook and the exception tree: what config and forward both build on."""
    graph = _imports()
    assert graph["sidecar.http_rules"] == set()
    assert graph["sidecar.errors"] == set()


def _importers(package: str) -> list[str]:
    """The modules outside ``package`` that import one of its modules."""
    return sorted(
        m
        for m, deps in _imports().items()
        if not _in(m, package) and any(_in(d, package) for d in deps)
    )


def test_demo_is_imported_only_by_the_cli() -> None:
    importers = _importers("sidecar.demo")
    assert importers == ["sidecar.cli"]


ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"


def test_every_module_architecture_md_names_exists() -> None:
    """ARCHITECTURE.md stays true: every module it names, as a path or as ``sidecar.x.y``.

    A path is read from the repository root (``sidecar/forward/pool.py``) or, as the
    diagrams write them, as the end of a path under ``sidecar/`` (``forward/pool.py``).
    """
    text = ARCHITECTURE.read_text(encoding="utf-8")
    root = PACKAGE.parent
    files = {path.relative_to(root).as_posix() for path in PACKAGE.rglob("*.py")}
    paths = set(re.findall(r"(?<![\w/.])(?:\w+/)*\w+\.py\b", text))
    folders = set(re.findall(r"(?<![\w/.])sidecar/(?:\w+/)+(?!\w)", text))
    dotted = set(re.findall(r"(?<![\w/.])sidecar(?:\.\w+)+", text))
    assert len(paths) >= 30, "the map names the modules it describes"
    missing = sorted(
        p for p in paths if not (root / p).is_file() and not any(f.endswith("/" + p) for f in files)
    )
    missing += sorted(f for f in folders if not (root / f).is_dir())
    missing += sorted(m for m in dotted if m not in _modules())
    assert missing == []


def test_the_command_groups_are_imported_only_by_the_cli() -> None:
    importers = _importers("sidecar.commands")
    assert importers == ["sidecar.cli"]


TESTS = PACKAGE.parent / "tests"
# tests/ folders that mirror no package of sidecar/: the CLI (cli.py and commands/),
# the shared helpers, and the interoperability tests against real third-party software.
TEST_FOLDERS_OF_THEIR_OWN = {"cli", "support", "interop"}


def _test_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "node_modules" not in p.parts)


def test_the_test_folders_mirror_the_packages() -> None:
    folders = {p.name for p in TESTS.iterdir() if (p / "__init__.py").is_file()}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert sorted(folders - packages - TEST_FOLDERS_OF_THEIR_OWN) == []


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/conftest.py or tests/support/, never in a test file."""
    offenders = []
    for path in _test_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(n.rpartition(".")[2].startswith("test_") for n in names):
                offenders.append(f"{path.relative_to(TESTS.parent)}: {names}")
    assert offenders == []


def test_one_eventually() -> None:
    defined = [
        path.relative_to(TESTS.parent).as_posix()
        for path in _test_files()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "eventually"
    ]
    assert defined == ["tests/conftest.py"]
