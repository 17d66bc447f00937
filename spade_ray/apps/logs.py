"""What the CLI says, for a person (text) or for a log collector (one JSON object per line).

``--log-format text`` keeps today's output: end-of-stage summaries on stdout, problems on stderr,
bare messages.  ``--log-format json`` writes every record to stdout as one JSON object per line
(``time``, ``level``, ``logger``, ``message`` and the record's fields such as ``stage`` and the
counts), so Fluent Bit, Vector or CloudWatch can index it without parsing prose; Ray's own
chatter stays on stderr and never interleaves with it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging", "fields", "get_logger"]

LOG_FORMATS = ("text", "json")
LOGGER_NAME = "spade_ray"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call whose record carries structured fields: ``log.info(msg, **fields(stage="score"))``."""
    return {"extra": {"fields": values}}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; structured fields are merged in at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def configure_logging(log_format: str = "text", *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> logging.Logger:
    """Set up the ``spade_ray`` logger for a CLI run (replacing handlers of an earlier call)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}")
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    logger = get_logger()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if log_format == "json":
        handler = logging.StreamHandler(stdout)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    else:
        out = logging.StreamHandler(stdout)
        out.addFilter(_BelowWarning())
        err = logging.StreamHandler(stderr)
        err.setLevel(logging.WARNING)
        for handler in (out, err):
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
    return logger
