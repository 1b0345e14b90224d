"""Logging: the host's `logging` setup by default, a ready output for those who have none.

The runtime's events go to the standard `logging` module, on loggers under `sleeptime`
(`sleeptime.group`, `sleeptime.tracker`, ...; see `messages._log`), so whatever the host
configured (handlers, levels, formatters) applies to them, and the runtime changes no
logger it does not own. A program that configured nothing calls `configure_logging` (or
sets `SLEEPTIME_LOG_LEVEL` / `SLEEPTIME_LOG_JSON`) for console lines or JSON lines on
standard error: a handler of the runtime's own on the `sleeptime` logger.

Example:
    >>> logging.basicConfig(filename="service.log", level=logging.INFO)  # the host's: used
    >>> configure_logging(level="info", json=True)   # or: the runtime's own JSON lines
"""

from __future__ import annotations

import json as json_module
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

import structlog

from messages._log import ROOT

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
LEVEL_ENV = "SLEEPTIME_LOG_LEVEL"
JSON_ENV = "SLEEPTIME_LOG_JSON"


def configure_logging(level: str | None = None, json: bool | None = None) -> None:
    """Give the runtime's logs an output of their own on standard error.

    Console lines (`json=False`) or one JSON object per line (`json=True`), each with the
    time, level, logger, event and fields (`group_id`, `agent_id`, `run_id` among them).
    Defaults come from `SLEEPTIME_LOG_LEVEL` (default `warning`) and `SLEEPTIME_LOG_JSON`
    (`1` for JSON). Only the `sleeptime` logger is changed: its level, and one handler of
    the runtime's, which replaces the one an earlier call put there; its events no longer
    reach the host's handlers (so they are not written twice). Without this call they
    do, and only they.
    """
    name = (level or os.environ.get(LEVEL_ENV, "warning")).lower()
    if name not in _LEVELS:
        raise ValueError(f"log level {name!r} is not one of {', '.join(_LEVELS)}")
    as_json = json if json is not None else os.environ.get(JSON_ENV) == "1"
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if isinstance(handler, _StderrHandler):
            logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_JsonFormatter() if as_json else _ConsoleFormatter())
    logger.addHandler(handler)
    logger.setLevel(_LEVELS[name])
    logger.propagate = False


def ensure_logging() -> None:
    """Give the runtime's logs their own output if the environment asks for it
    (`SLEEPTIME_LOG_LEVEL` or `SLEEPTIME_LOG_JSON` set) and nobody configured it yet;
    else leave logging to the host."""
    asked = os.environ.get(LEVEL_ENV) or os.environ.get(JSON_ENV)
    configured = any(isinstance(h, _StderrHandler) for h in logging.getLogger(ROOT).handlers)
    if asked and not configured:
        configure_logging()


class _StderrHandler(logging.Handler):
    """Writes each line to the `sys.stderr` of the moment, so a swapped stream (a test's
    captured output, a redirected CLI) is never written to after it was closed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            print(line, file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def _event_dict(record: logging.LogRecord) -> dict[str, Any]:
    """The record as structlog's renderers take it: time, level, logger, event, fields."""
    fields: dict[str, Any] = dict(getattr(record, "event_fields", {}))
    event = getattr(record, "event", None) if "event_fields" in record.__dict__ else None
    return {
        "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": event if event is not None else record.getMessage(),
        **fields,
    }


class _JsonFormatter(logging.Formatter):
    """One JSON object per line (values that are not JSON are written as text)."""

    def format(self, record: logging.LogRecord) -> str:
        data = _event_dict(record)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json_module.dumps(data, default=str, ensure_ascii=False)


class _ConsoleFormatter(logging.Formatter):
    """structlog's console lines (colours only on a terminal)."""

    def __init__(self) -> None:
        super().__init__()
        self._renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    def format(self, record: logging.LogRecord) -> str:
        renderer = self._renderer
        data = _event_dict(record)
        data.pop("logger")
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return str(renderer(None, record.levelname.lower(), data))
