"""Logging: structured fields on every record, JSON (``start``) or readable (``dev``)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record carries beyond the standard ones."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every structured field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **extra_fields(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ReadableFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message  key=value ...`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = extra_fields(record)
        if fields:
            text += "  " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def configure(mode: str, level: int = logging.INFO) -> None:
    """Send rayvisor's logs to stderr, JSON in ``start`` mode and readable otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if mode == "start" else ReadableFormatter())
    root = logging.getLogger("rayvisor")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def install_record_fields(fields: Callable[[], dict[str, Any]]) -> None:
    """Add ``fields()`` to every log record this process creates (one job per process)."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        for key, value in fields().items():
            if key not in _STANDARD_ATTRS:
                setattr(record, key, value)
        return record

    logging.setLogRecordFactory(factory)
