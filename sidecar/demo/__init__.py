"""The demo: everything ``mtls-sidecar demo`` needs and nothing the product runs on.

- ``app``: the demo itself (a throwaway PKI, the fake API over TLS, the sidecar in front).
- ``fake_sf``: a small fake of the SuccessFactors OData v2 API (the demo's and the tests' upstream).
- ``pki``: a throwaway PKI (root, intermediate, client certificate), also
  ``python -m sidecar.demo.pki DIR`` for the example config.

Imported only by the CLI (``demo``) and the tests; no product module imports it.
"""
