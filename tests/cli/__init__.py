"""Tests of sidecar/cli.py and sidecar/commands/."""
