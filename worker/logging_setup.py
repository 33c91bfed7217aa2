"""Logging, configured once per process by the entry points.

Library modules only call ``logging.getLogger(__name__)``. Log lines carry UIDs,
ids and counts, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_TEXT = "%(asctime)s %(levelname)s %(process_name)s[%(process)d] %(name)s: %(message)s"


_context: ContextVar[dict[str, Any] | None] = ContextVar("pacs_ai_log_context", default=None)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ids to every log line written inside the block (``job_id=7, study=UID``).

    Only ids and UIDs: never patient data.
    """
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class _ProcessName(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.process_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process_name
        record.context = _context.get()
        return True


class TextFormatter(logging.Formatter):
    """The human-readable line, with the context ids appended in brackets."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = getattr(record, "context", None)
        if context:
            ids = " ".join(f"{key}={value}" for key, value in context.items())
            first, sep, rest = line.partition("\n")
            line = f"{first} [{ids}]{sep}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "process": getattr(record, "process_name", ""),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = getattr(record, "context", None)
        if context:
            payload.update({k: v for k, v in context.items() if k not in payload})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def configure_logging(level: str, fmt: str, process_name: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessName(process_name))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs PDU and dataset details at DEBUG; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.INFO))
    logging.captureWarnings(True)
