"""Headless Chromium for the tests that look at a page as a person would.

Usage::

    from tests.support.browser import Chromium

    browser = Chromium.find(tmp_path)        # skips, or fails under CI=true, without one
    dom = await browser.dump_dom(url)        # the DOM after the page loaded, serialised
    await browser.screenshot(url, png_path)  # a PNG of the page at 1280x1800

Each call is one ``chromium --headless`` process of its own with a fresh profile
(a new directory under the given one: Chromium locks its profile); it runs
without blocking the event loop, so a sidecar served in the same test answers
it. Debian's ``chromium`` package provides it; .ci/run installs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import missing_tool

NAMES = ("chromium", "chromium-browser")
TIMEOUT = 60.0  # seconds for one page: a cold start on a busy machine takes a few


@dataclass(frozen=True)
class Chromium:
    executable: str
    directory: Path  # where each run's throwaway profile goes

    @classmethod
    def find(cls, directory: Path) -> Chromium:
        found = next((path for name in NAMES if (path := shutil.which(name))), None)
        if found is None:
            missing_tool(
                "Chromium is not installed: `apt-get install chromium` (Debian) installs it "
                "for the browser test; .ci/run does"
            )
        return cls(found, directory)

    async def dump_dom(self, url: str) -> str:
        return (await self._run("--dump-dom", url)).decode()

    async def screenshot(
        self, url: str, path: Path, *, size: tuple[int, int] = (1280, 1800)
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        await self._run(f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url)
        assert path.stat().st_size > 0, f"Chromium wrote no screenshot to {path}"

    async def _run(self, *args: str) -> bytes:
        profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=self.directory)
        command = [
            self.executable,
            "--headless",
            f"--user-data-dir={profile}",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            *(["--no-sandbox"] if os.geteuid() == 0 else []),  # its sandbox refuses root
            *args,
        ]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"Chromium did not finish within {TIMEOUT} s: {command}") from None
        finally:
            if process.returncode is None:  # timed out or cancelled: never left running
                process.kill()
                await process.wait()
        # Chromium logs harmless D-Bus complaints on stderr: shown only when it failed.
        assert process.returncode == 0, f"{command} exited {process.returncode}:\n{err.decode()}"
        return out
