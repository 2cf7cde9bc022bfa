"""Tests of sidecar/telemetry/."""
