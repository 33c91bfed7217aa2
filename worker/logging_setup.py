"""Logging, configured once per process by the entry points.

Library modules only call ``logging.getLogger(__name__)``. Log lines carry UIDs,
ids and counts, never patient names, IDs or birth dates.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_TEXT = "%(asctime)s %(levelname)s %(process_name)s[%(process)d] %(name)s: %(message)s"


class _ProcessName(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.process_name = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = self.process_name
        return True


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
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def configure_logging(level: str, fmt: str, process_name: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessName(process_name))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs PDU and dataset details at DEBUG; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.INFO))
    logging.captureWarnings(True)
