"""Background tasks that are never fired and forgotten.

Every task gets a name and stays referenced until it ends; `TaskGroup.close`
cancels what is left. (A bare ``asyncio.create_task`` can be garbage-collected
mid-flight and hides its exceptions; ruff's TID251 bans it in this package.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("sidecar")


class TaskGroup:
    """A set of named background tasks, cancelled together."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def create(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task %s failed: %s: %s", task.get_name(), type(exc).__name__, exc)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
