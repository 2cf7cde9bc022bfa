"""Entry point for ``python -m sidecar``."""

from sidecar.cli import run_main

run_main()
