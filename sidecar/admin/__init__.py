"""The admin endpoints under ``admin_prefix`` on every listener.

- ``endpoints``: ``health``, ``ready``, ``status`` and ``metrics`` for one route's
  listener (`Admin`). It reads a route's live state from ``sidecar.runtime``,
  never from the server.
"""
