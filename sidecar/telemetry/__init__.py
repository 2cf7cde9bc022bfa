"""What the sidecar reports about itself: metrics and logs.

- ``metrics``: Prometheus counters and gauges, per route (`RouteStats`) and in
  all (`SidecarMetrics`).
- ``logs``: text or JSON log lines, the access log, query-value redaction.

Below ``forward`` and ``credentials``, which report to it; imports neither.
"""
