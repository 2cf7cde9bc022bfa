"""mtls-sidecar: a local mutual-TLS sidecar proxy."""

__version__ = "0.1.0"
