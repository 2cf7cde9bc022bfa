"""The Postman collection in config/postman/, run by newman against the demo."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from sidecar.demo import demo_config, fake_successfactors
from sidecar.server import Sidecar

ROOT = Path(__file__).resolve().parents[1]
POSTMAN = ROOT / "config" / "postman"
LOCAL_NEWMAN = ROOT / ".ci" / "node" / "node_modules" / ".bin" / "newman"


def newman() -> str | None:
    if LOCAL_NEWMAN.exists():
        return str(LOCAL_NEWMAN)
    return shutil.which("newman")


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
    ]
    values = {v["key"]: v["value"] for v in environment["values"]}
    assert values["baseUrl"] == "http://127.0.0.1:8080"


@pytest.mark.skipif(
    newman() is None,
    reason="newman (Postman's CLI runner) is not installed: needs Node.js; .ci/run installs it "
    "with `npm install --prefix .ci/node newman`",
)
async def test_newman_runs_the_collection_against_the_demo(tmp_path):
    runner = newman()
    assert runner is not None
    async with fake_successfactors(tmp_path / "sf") as upstream:
        sidecar = Sidecar(demo_config(upstream, 0))
        await sidecar.start()
        try:
            base = f"http://{sidecar.bound_address(sidecar.routes[0])}"
            report = tmp_path / "newman.json"
            proc = await asyncio.create_subprocess_exec(
                runner, "run", str(POSTMAN / "sidecar.postman_collection.json"),
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
    # ready, first page, two more pages through __next (45 users, 20 a page), by id, metadata
    assert stats["requests"]["total"] == 6, text
    assert stats["assertions"]["total"] == 6, text
