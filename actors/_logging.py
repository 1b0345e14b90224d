"""Structured logging: console lines for people, JSON lines for machines.

The runtime logs through structlog with `group_id`, `agent_id` and `run_id` bound at each
actor's edge; events are short snake_case names with fields.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure_logging(level: str | None = None, json: bool | None = None) -> None:
    """Set the level and output of the runtime's logs.

    Defaults come from `SLEEPTIME_LOG_LEVEL` (default `warning`) and `SLEEPTIME_LOG_JSON`
    (`1` for JSON lines). Logs go to standard error.
    """
    name = (level or os.environ.get("SLEEPTIME_LOG_LEVEL", "warning")).lower()
    if name not in _LEVELS:
        raise ValueError(f"log level {name!r} is not one of {', '.join(_LEVELS)}")
    as_json = json if json is not None else os.environ.get("SLEEPTIME_LOG_JSON") == "1"
    # pykka prints a traceback for every actor that dies; the supervisor reports each crash
    # (actor_crashed, actor_restarted) as a structured event instead.
    logging.getLogger("pykka").setLevel(logging.CRITICAL)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[name]),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=True,
    )


class _StderrLogger:
    """Writes each line to the `sys.stderr` of the moment, so a swapped stream (a test's
    captured output, a redirected CLI) is never written to after it was closed."""

    def __init__(self, *args: Any) -> None:
        pass

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def ensure_logging() -> None:
    """Configure logging from the environment unless the application already did."""
    if not structlog.is_configured():
        configure_logging()
