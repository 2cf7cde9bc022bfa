"""Tests of sidecar/demo/."""
