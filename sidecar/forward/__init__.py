"""One request's path through the sidecar, in the order it travels.

- ``listener``: inbound HTTP/1.1, the aiohttp server adapter (every private
  aiohttp use on the inbound side).
- ``handler``: the route's handler; forwards a request and streams the answer back.
- ``headers``: the header rules (hop-by-hop, header names and values).
- ``rewrite``: upstream links in bodies and headers rewritten to the local origin.
- ``upstream``: where a route's requests go (target, fixed headers, query) and
  the pool of its current client identity.
- ``pool``: the upstream HTTP/1.1 client over pooled mTLS connections (the
  client-side adapter).
- ``failures``: every failure as a status, an error code and a hint; the one table.
- ``probe``: one request to the upstream for ``mtls-sidecar check``.

Imports credentials and config below it, never the server or admin above it.
"""
