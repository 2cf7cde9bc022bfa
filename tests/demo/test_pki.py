"""`python -m sidecar.demo.pki`: the throwaway PKI a new user writes for the example config."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.demo.pki import main, write_demo_pki
from tests.conftest import sidecar_env


def test_help_says_what_it_writes_and_where(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.demo.pki", "--help"],
        capture_output=True, text=True, timeout=30, env=sidecar_env(),
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    text = proc.stdout
    assert "usage: python -m sidecar.demo.pki DIR" in text
    assert "throwaway" in text and "test" in text
    assert "created if missing" in text and "overwritten" in text
    # Every file it writes is named as DIR/NAME, and the private ones say 0600.
    files = write_demo_pki(tmp_path / "certs")
    for path in vars(files).values():
        assert f"DIR/{path.name} " in text, f"{path.name} is not in the help:\n{text}"
        entry = text[text.index(f"DIR/{path.name} ") :].split("\n  DIR/")[0]
        private = stat.S_IMODE(path.stat().st_mode) == 0o600
        assert ("0600" in entry) == private, entry


@pytest.mark.parametrize("args", [[], ["a", "b"], ["--bogus"]])
def test_wrong_arguments_print_the_usage_and_exit_2(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert re.search(r"usage: python -m sidecar\.demo\.pki .*DIR", err), err
    assert "--help" in err
