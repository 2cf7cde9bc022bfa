"""Interception: serving ``https://`` clients that use the sidecar as ``https_proxy``.

Scripts written against SuccessFactors call ``https://api…`` URLs. With
``intercept.enabled`` they set ``https_proxy=http://127.0.0.1:8080`` and trust
one local certificate, and change nothing else (DESIGN.md, "Clients that only
speak https")::

    client ── CONNECT api…:443 ──► forward/listener.py ── names.py: one of the
                                   route's upstream names? token? else 403/401
           ◄── 200 ──────────────  then TLS on the same connection, presenting
                                   certificate.py's certificate (SNI checked)
           ── GET /odata/v2/… ───► the same forwarding path as a plain request
                                   (forward/handler.py), without link rewriting

- ``names``: the upstream's own ``host:port`` names, the only ones served;
- ``certificate``: the certificate that vouches for those names and nothing
  else (self-signed, not a CA), its files, renewal and server context;
- ``trust``: how each client trusts it, and the system store plus it as one file.
"""
