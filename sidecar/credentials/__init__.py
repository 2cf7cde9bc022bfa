"""Credentials: where a route's client identity comes from, and everything that touches keys.

- ``identity``: reading PEM/PKCS#12 bundles and building the client `SSLContext`
  (the only code that handles private keys).
- ``sources``: the `CredentialSource` protocol and the file source.
- ``destination/`` and ``destination_source``: the SAP BTP Destination Service
  (binding, token, lookup) and the source built on it.
- ``tls_sessions``: TLS session resumption towards the upstream.
- ``certinfo``: certificate summaries for ``status``, ``cert`` and ``destination``.

Imports nothing from the request path (``forward``) or the server.
"""
