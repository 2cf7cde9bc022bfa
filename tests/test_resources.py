"""The file-descriptor limit and the memory trim after a load (sidecar.resources)."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

from sidecar.resources import MemoryTrimmer, _malloc_trim


def _in_child(code: str) -> str:
    """Run ``code`` in a fresh interpreter (rlimits are per process)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def test_the_soft_file_limit_is_raised_towards_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = _in_child(
        """
        import resource
        from sidecar.resources import raise_file_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        before, after = raise_file_limit(4096)
        print(before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    assert out.split() == ["256", str(want), str(want)]


def test_a_higher_soft_limit_is_never_lowered() -> None:
    out = _in_child(
        """
        import resource
        from sidecar.resources import raise_file_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
        print(raise_file_limit(1024), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """
    )
    soft = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 8192)
    assert out == f"({soft}, {soft}) {soft}"


def test_the_limit_is_left_alone_when_it_cannot_be_raised() -> None:
    # A hard limit below the wish: the soft one goes up to it, not beyond.
    out = _in_child(
        """
        import resource
        from sidecar.resources import raise_file_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 300))
        print(raise_file_limit(4096), resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    assert out == "(100, 300) (300, 300)"


def test_memory_is_trimmed_once_when_a_load_ends() -> None:
    count = [0]
    trimmer = MemoryTrimmer(lambda: count[0])
    assert trimmer.tick() is False  # idle from the start: nothing to give back
    count[0] += 500
    assert trimmer.tick() is False  # requests are coming
    count[0] += 300
    assert trimmer.tick() is False  # still coming
    assert trimmer.tick() is True  # quiet now: trimmed
    assert trimmer.tick() is False  # and only once per load
    count[0] += 1
    assert trimmer.tick() is False
    assert trimmer.tick() is True


def test_malloc_trim_is_found_on_glibc() -> None:
    import platform

    trim = _malloc_trim()
    if platform.libc_ver()[0] == "glibc":
        assert trim is not None
        trim()  # returns memory; must not raise
    else:
        assert trim is None
