"""Tests of sidecar/forward/: one request's path, listener to failures."""
