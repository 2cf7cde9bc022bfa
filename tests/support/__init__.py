"""What several test modules share, so that no test module imports another.

``raw_http``: raw HTTP/1.1 over a socket and the sidecar's error as raw bytes;
``answers``: one response as an ``Answer`` and DESIGN.md's error table;
``process``: the sidecar as a real ``python -m sidecar`` process and its files;
``tls_servers``: blocking TLS servers; ``upstreams``: the aiohttp fake upstream;
``fake_btp``: fake BTP services; ``admin``: ``/-/status`` and ``/-/metrics`` as read by a
test; ``mapping``: an upstream with an X.509 mapping switchable while it runs, and load.
Fixtures live in tests/conftest.py.
"""
