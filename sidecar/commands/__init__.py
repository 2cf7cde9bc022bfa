"""The command groups of ``mtls-sidecar``, one module each; `sidecar.cli` registers them.

- ``common``: what every command shares (one-line errors, exit codes, options).
- ``cert``: ``cert inspect`` and ``cert export-public``.
- ``destination``: ``destination show``.

The entry point stays `sidecar.cli.run_main`, the top-level commands in `sidecar.cli`.
"""
