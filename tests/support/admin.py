"""The sidecar's admin endpoints as a test reads them: ``/-/status`` and ``/-/metrics``."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.answers import fetch


async def admin_json(url: str, path: str) -> dict[str, Any]:
    """``GET {url}/-/{path}`` as JSON (``status``, ``ready``...), which must answer 200."""
    answer = await fetch(f"{url}/-/{path}")
    assert answer.status == 200, answer
    data: dict[str, Any] = json.loads(answer.body)
    return data


async def route_status(url: str, route: str) -> dict[str, Any]:
    """The entry of ``route`` in ``/-/status``."""
    routes = (await admin_json(url, "status"))["routes"]
    return next(entry for entry in routes if entry["name"] == route)


async def metric(url: str, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` from ``/-/metrics`` (0 if not there yet)."""
    answer = await fetch(f"{url}/-/metrics")
    assert answer.status == 200, answer
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
