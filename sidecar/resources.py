"""Process resources: enough file descriptors, and memory given back after a load.

- A container often starts processes with a soft limit of 1024 open files,
  fewer than ``limits.max_connections`` (1000) client connections plus the
  upstream pool need; the hard limit is usually far higher. Like nginx's
  ``worker_rlimit_nofile`` and Go's runtime, the sidecar raises its soft
  limit at start (never above the hard limit).
- After a burst, Python's and glibc's allocators keep freed memory mapped.
  `MemoryTrimmer` watches the request count and, once a load has ended,
  collects garbage and asks glibc to return free pages (``malloc_trim``), so
  the sidecar's RSS goes back near its idle size in a shared container.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import resource
from collections.abc import Callable

log = logging.getLogger("sidecar.resources")

WANTED_FILES = 65536  # enough for every default limit, with room; below most hard limits


def raise_file_limit(wanted: int = WANTED_FILES) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted``; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. a sandbox that forbids it
            log.debug("cannot raise the open-files limit from %d: %s", soft, exc)
            return soft, soft
        log.debug("open-files limit raised from %d to %d", soft, target)
        return soft, target
    return soft, soft


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's malloc_trim(0), or None where the C library has none (musl, macOS)."""
    try:
        # The process's own symbols (find_library would run ldconfig in a subprocess).
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def release() -> None:
        trim(0)

    return release


class MemoryTrimmer:
    """Give memory back once the requests counted by ``requests()`` have stopped coming."""

    def __init__(self, requests: Callable[[], int]) -> None:
        self._requests = requests
        self._last = requests()
        self._busy = False  # requests arrived since the previous quiet tick
        self._trim = _malloc_trim()

    def tick(self) -> bool:
        """Call periodically; True when this tick trimmed (a load just ended)."""
        now = self._requests()
        arrived, self._last = now != self._last, now
        if arrived:
            self._busy = True
            return False
        if not self._busy:
            return False
        self._busy = False
        gc.collect()
        if self._trim is not None:
            self._trim()
        return True
