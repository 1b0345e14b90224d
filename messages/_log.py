"""The runtime's loggers: structlog's bound context, delivered to the standard `logging` module.

Every package of the runtime logs through `get_logger(name)`, a structlog bound logger over
the `logging.Logger` of that name (names under `sleeptime`, e.g. `sleeptime.group`). So a
host's own `logging` setup (handlers, levels, formatters, a log shipper) receives the
runtime's events as it receives its own, and the runtime touches no global configuration:
neither structlog's nor any logger it does not own.

An event is a short snake_case name with fields, the fields bound with `bind` included:
the record's message reads `run_finished group_id=g-1 run_id=r-2 status=failed ...`, and
the record carries `event`, each field as an attribute (for a JSON formatter of the host's)
and all of them as `event_fields`. A call whose level the logger does not take costs one
`isEnabledFor`.

Example:
    >>> log = get_logger("sleeptime.group").bind(group_id="group-1")
    >>> log.info("turn_retried", turn=3)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from structlog import BoundLoggerBase

ROOT = "sleeptime"
"""The logger every runtime logger is under; the runtime owns it (and only it)."""

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}
"""LogRecord attributes a field may not overwrite (it stays in `event_fields`)."""


def render_message(event: str, fields: Mapping[str, Any]) -> str:
    """The event and its fields as one line: `event key=value ...`, None values left out.

    >>> render_message("run_finished", {"run_id": "r-1", "error": "it broke", "x": None})
    'run_finished run_id=r-1 error="it broke"'
    """
    parts = [event]
    for key, value in fields.items():
        if value is not None:
            parts.append(f"{key}={_value(value)}")
    return " ".join(parts)


def _value(value: Any) -> str:
    if isinstance(value, bool | int | float):
        return str(value)
    text = str(value)
    if not text or any(c in text for c in ' ="\n\t') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


class RuntimeLogger(BoundLoggerBase):
    """A structlog bound logger over a `logging.Logger`: `bind` context, log events.

    The level check comes first, so a debug event nobody takes costs next to nothing.
    """

    _logger: logging.Logger

    def debug(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(logging.CRITICAL):
            self._emit(logging.CRITICAL, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the traceback of the exception being handled."""
        if self._logger.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, {"exc_info": True, **fields})

    def log(self, level: int, event: str, **fields: Any) -> None:
        if self._logger.isEnabledFor(level):
            self._emit(level, event, fields)

    def is_enabled_for(self, level: int) -> bool:
        """Whether an event at `level` would be taken (to skip computing its fields)."""
        return self._logger.isEnabledFor(level)

    def _emit(self, level: int, event: str, fields: dict[str, Any]) -> None:
        exc_info = fields.pop("exc_info", None)
        merged = {**self._context, **fields}
        extra = {k: v for k, v in merged.items() if k not in _RESERVED}
        extra["event"] = event
        extra["event_fields"] = merged
        # stacklevel 3: the record names the line that called `info` (and the like).
        self._logger.log(
            level,
            render_message(event, merged),
            exc_info=exc_info,
            extra=extra,
            stacklevel=3,
        )


def get_logger(name: str) -> RuntimeLogger:
    """The runtime's logger `name` (under `sleeptime`), with nothing bound yet."""
    if name != ROOT and not name.startswith(ROOT + "."):
        raise ValueError(f"the runtime's loggers are under {ROOT!r}, not {name!r}")
    return RuntimeLogger(logging.getLogger(name), processors=(), context={})
