"""Tests of sidecar/credentials/: identities, their sources, destinations, TLS sessions."""
