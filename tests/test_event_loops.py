"""The forwarding path's tests run on both event loops (conftest.BOTH_LOOPS)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.conftest import BOTH_LOOPS


def test_every_module_named_for_both_loops_exists():
    # A renamed module would silently drop back to asyncio only.
    here = Path(__file__).parent
    assert sorted(n for n in BOTH_LOOPS if not (here / f"{n}.py").exists()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows")
async def test_the_loop_named_in_the_test_id_is_the_one_running(request):
    loop = asyncio.get_running_loop()
    if request.node.name.endswith("[uvloop]"):
        import uvloop

        assert isinstance(loop, uvloop.Loop)
    else:
        assert request.node.name.endswith("[asyncio]")
        assert type(loop).__module__.startswith("asyncio.")
