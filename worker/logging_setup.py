"""Logging, configured once per process by the entry points.

Library modules only call ``logging.getLogger(__name__)``. Log lines carry UIDs,
ids and counts, never patient names, IDs or birth dates.

What libraries write cannot be trusted that way (highdicom logs a patient name
it finds odd; pydicom warns with the invalid value), so every line passes
:class:`PhiFilter` on its way out:

- our own lines (``worker``, ``dicomnode``, ``db``, ``pacs_ai``) and those of
  the libraries that only handle ids and addresses (:data:`TRUSTED`: Celery,
  kombu, uvicorn, Alembic) keep their text, with a library exception among
  their arguments reduced to its type and the job's known values masked;
- other libraries' lines below WARNING are dropped, and from WARNING up their
  text is withheld (logger name and level stay);
- Python warnings keep their category and module, not their text (ours keep it);
- tracebacks keep our frames and exception types, never a library
  exception's message (:func:`dicomnode.phi.format_traceback`);
- uncaught exceptions (main and other threads) are logged the same way.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any, TextIO

from dicomnode import phi

_TEXT = "%(asctime)s %(levelname)s %(process_name)s[%(process)d] %(name)s: %(message)s"


_context: ContextVar[dict[str, Any] | None] = ContextVar("pacs_ai_log_context", default=None)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ids to every log line written inside the block (``job_id=7, study=UID``).

    Only ids and UIDs: never patient data. The block is also a
    :func:`dicomnode.phi.scope`: header values remembered inside it (the job's
    patient and study values) are masked in every line and stored error.
    """
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        with phi.scope():
            yield
    finally:
        _context.reset(token)


#: Libraries whose log text names ids, addresses and settings, never header values.
TRUSTED = frozenset({"celery", "kombu", "amqp", "billiard", "uvicorn", "alembic"})

_WITHHELD = "%s message withheld (library text may hold patient data)"


def _safe_arg(arg: Any) -> Any:
    if isinstance(arg, BaseException):
        return phi.describe(arg)
    if isinstance(arg, str):
        return phi.scrub(arg)
    return arg


_CAPTURED = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<category>\w+): ")


def _reword_captured(record: logging.LogRecord) -> str:
    """A warning as logging.captureWarnings writes it (``file:line: Category: text``)."""
    try:
        text = record.getMessage()
    except Exception:
        text = ""
    m = _CAPTURED.match(text)
    if m is None:
        return "warning (text withheld)"
    module = _module_of(m["file"])
    if phi.is_own_module(module) or module.split(".", 1)[0] in TRUSTED:
        return phi.scrub(text.split("\n", 1)[0])
    return f"{m['category']} from {module}:{m['line']} (text withheld)"


class PhiFilter(logging.Filter):
    """Rewords a record so that no patient data leaves the process (see the module
    docstring). Installed on the handler: it sees every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split(".", 1)[0]
        own = phi.is_own_module(record.name) or record.name == "__main__"
        if record.name == "py.warnings":  # logging.captureWarnings (Celery turns it on)
            record.msg, record.args = "%s", (_reword_captured(record),)
        elif not own and top not in TRUSTED:
            if record.levelno < logging.WARNING:
                return False
            record.msg, record.args = _WITHHELD, (record.levelname.lower(),)
        else:
            args = record.args
            if isinstance(args, dict):
                # Celery's "Task ... raised unexpected: %(exc)s" carries the exception text
                args = {
                    k: ("(exception text withheld)" if k == "exc" else _safe_arg(v))
                    for k, v in args.items()
                }
            elif args:
                args = tuple(_safe_arg(a) for a in args)
            record.args = args
            try:
                message = record.getMessage()
            except Exception:  # a malformed call: keep the format, not the arguments
                message = str(record.msg)
            record.msg, record.args = phi.scrub(message), None
        if record.exc_info:
            exc = record.exc_info[1]
            if exc is not None:
                record.exc_text = phi.format_traceback(exc)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = "(traceback withheld)"
        return True


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
        elif record.exc_text:
            payload["exc"] = record.exc_text
        return json.dumps(payload, ensure_ascii=False)


def _module_of(filename: str) -> str:
    """The module a warning was raised in (from its file)."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return filename.rsplit("/", 1)[-1].removesuffix(".py")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning``: into the log; a library's text is withheld."""
    module = _module_of(filename)
    if phi.is_own_module(module) or module.split(".", 1)[0] in TRUSTED:
        text = f"{category.__name__}: {phi.scrub(str(message))} ({module}:{lineno})"
    else:
        text = f"{category.__name__} from {module}:{lineno} (text withheld)"
    logging.getLogger("pacs_ai.warnings").warning("%s", text)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("pacs_ai").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    logging.getLogger("pacs_ai").error(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure_logging(level: str, fmt: str, process_name: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ProcessName(process_name))
    handler.addFilter(PhiFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs PDU and dataset details at DEBUG; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.INFO))
    # warnings into the log, reworded (not logging.captureWarnings: it keeps the text)
    warnings.showwarning = _show_warning
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught
