"""Logging to stderr as text or JSON lines, and the access-log line.

Query values can hold personal data (an OData ``$filter`` on a name), so the
access log shows parameter names with values redacted unless the config
says ``log.query_values: true``. Bodies and secrets are never logged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from typing import Any
from urllib.parse import parse_qsl, quote

from sidecar.config import LogConfig

logger = logging.getLogger("sidecar")
access_logger = logging.getLogger("sidecar.access")

_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                data[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            data["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message`` and the extras as key=value, no tracebacks."""

    _second, _stamp = -1, ""  # the last record's second and its "%H:%M:%S"

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per access line
            self._second, self._stamp = second, time.strftime("%H:%M:%S", time.gmtime(second))
        stamp = self._stamp
        # The access line's message already holds its fields.
        extras = (
            ""
            if record.name == access_logger.name
            else " ".join(
                f"{k}={v}"
                for k, v in record.__dict__.items()
                if k not in _RESERVED and not k.startswith("_")
            )
        )
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            line += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        line = f"{line} {extras}" if extras else line
        # One record, one line: control characters from requests cannot forge log lines.
        return line.translate(_ESCAPES) if not line.isprintable() else line


def setup_logging(config: LogConfig, *, level: str | None = None, fmt: str | None = None) -> None:
    # No formatter here prints a record's caller, thread or process: spare every record
    # (one per request with the access log) from gathering them (the logging HOWTO's
    # "Optimization" section names these switches).
    logging._srcfile = None  # noqa: SLF001
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if (fmt or config.format) == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logger.setLevel((level or config.level).upper())
    access_logger.disabled = not config.access_log


def without_userinfo(path: str) -> str:
    """An absolute-form target's ``user:password@`` is a credential: never logged or shown."""
    scheme, sep, rest = path.partition("://")
    if not sep or "/" in scheme:
        return path
    authority, slash, tail = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{tail}"


def redact_query(query_string: str, *, keep_values: bool) -> str:
    """``$filter=...&$top=5`` → ``$filter=***&$top=***`` unless values are kept."""
    if keep_values or not query_string:
        return query_string
    names = [quote(name, safe="$") for name, _ in parse_qsl(query_string, keep_blank_values=True)]
    return "&".join(f"{name}=***" for name in names)
