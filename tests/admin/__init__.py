"""Tests of sidecar/admin/."""
