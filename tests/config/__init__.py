"""Tests of sidecar/config/."""
