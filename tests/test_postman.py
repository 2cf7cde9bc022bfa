"""The Postman collection in config/postman/, run by newman against the demo."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.demo.app import demo_config, fake_successfactors
from sidecar.server import Sidecar
from tests.conftest import ROOT, newman_runner

POSTMAN = ROOT / "config" / "postman"


def test_collection_and_environment_are_valid_json():
    collection = json.loads((POSTMAN / "sidecar.postman_collection.json").read_text())
    environment = json.loads((POSTMAN / "local.postman_environment.json").read_text())
    names = [item["name"] for item in collection["item"]]
    assert names == [
        "Sidecar is ready",
        "List users (first page)",
        "Next page via __next",
        "User by id",
        "$metadata",
        "Create, update, delete",
    ]
    writes = collection["item"][-1]["item"]
    assert [item["name"] for item in writes] == [
        "Create a user",
        "Update it (MERGE)",
        "Read the change",
        "Delete it",
        "Gone (404)",
    ]
    assert [item["request"]["method"] for item in writes] == [
        "POST",
        "MERGE",
        "GET",
        "DELETE",
        "GET",
    ]
    # No token or cookie handling of its own: the sidecar supplies both.
    text = json.dumps(writes).lower()
    assert "csrf" not in text and "cookie" not in text
    values = {v["key"]: v["value"] for v in environment["values"]}
    assert values["baseUrl"] == "http://127.0.0.1:8080"


def requests_in(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The requests of a collection, inside folders too."""
    for item in items:
        if "item" in item:
            yield from requests_in(item["item"])
        else:
            yield item


def test_the_scripts_use_no_deprecated_postman_api():
    # Postman deprecated the global `postman` object (postman.setNextRequest and the
    # like) for `pm` (pm.execution.setNextRequest): new Postman versions warn about it.
    collection = json.loads((POSTMAN / "sidecar.postman_collection.json").read_text())
    lines = [
        line
        for item in requests_in(collection["item"])
        for event in item.get("event", [])
        for line in event["script"]["exec"]
    ]
    assert any("pm.execution.setNextRequest(" in line for line in lines)
    assert [line for line in lines if re.search(r"(?<![\w.])postman\.", line)] == []


async def test_newman_runs_the_collection_against_the_demo(newman: str, tmp_path: Path):
    async with fake_successfactors(tmp_path / "sf") as upstream:
        sidecar = Sidecar(demo_config(upstream, 0))
        await sidecar.start()
        try:
            base = f"http://{sidecar.bound_address(sidecar.routes[0])}"
            report = tmp_path / "newman.json"
            proc = await asyncio.create_subprocess_exec(
                newman, "run", str(POSTMAN / "sidecar.postman_collection.json"),
                "-e", str(POSTMAN / "local.postman_environment.json"),
                "--env-var", f"baseUrl={base}",
                "--reporters", "cli,json", "--reporter-json-export", str(report),
                "--disable-unicode", "--color", "off",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "NO_UPDATE_NOTIFIER": "1"},
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            await sidecar.close()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    stats = json.loads(report.read_text())["run"]["stats"]
    assert stats["assertions"]["failed"] == 0, text
    # ready, first page, two more pages through __next (45 users, 20 a page), by id, metadata;
    # then create, MERGE, read, delete, read (404): the sidecar keeps the session and the token.
    assert stats["requests"]["total"] == 11, text
    assert stats["assertions"]["total"] == 11, text
    assert upstream.state.sessions_opened == 1, text


@pytest.mark.parametrize(
    ("ci", "npm", "outcome"),
    [
        ("true", True, pytest.fail.Exception),  # .ci/run's install failed: say so
        ("true", False, pytest.skip.Exception),  # no Node.js on this CI machine
        ("", True, pytest.skip.Exception),  # a developer without newman
        ("", False, pytest.skip.Exception),
    ],
)
def test_a_missing_newman_fails_only_under_ci_with_npm(
    ci: str, npm: bool, outcome: type[BaseException], tmp_path: Path, monkeypatch
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if npm:
        (bin_dir / "npm").write_text("#!/bin/sh\n")
        (bin_dir / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome) as raised:
        newman_runner(local=tmp_path / "no-newman")
    assert "npm install --prefix .ci/node newman@6" in str(raised.value)
