"""Logging as a host leaves it, for tests: the runtime's loggers with no output of their own.

`host_logging()` puts the `sleeptime` logger back to the host's hands (no handler of the
runtime's, its level unset, its records going up to the root) and, afterwards, restores
the root, `sleeptime` and `pykka` loggers exactly as they were, so a test may call
`logging.basicConfig(force=True)` or `configure_logging` freely.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    """One event of the runtime's, as a handler of the host's received it."""

    level: int
    logger: str
    fields: dict[str, Any]
    record: logging.LogRecord

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


class Records(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[Event]:
        """The runtime's events called `name`, in order, with their fields."""
        return [
            Event(r.levelno, r.name, dict(r.__dict__["event_fields"]), r)
            for r in self.records
            if r.__dict__.get("event") == name
        ]


@contextmanager
def host_logging() -> Iterator[None]:
    saved = {
        name: (logger.handlers[:], logger.level, logger.propagate, logger.disabled)
        for name, logger in ((name, logging.getLogger(name)) for name in ("", "sleeptime", "pykka"))
    }
    runtime = logging.getLogger("sleeptime")
    runtime.handlers.clear()
    runtime.setLevel(logging.NOTSET)
    runtime.propagate = True
    try:
        yield
    finally:
        for name, (handlers, level, propagate, disabled) in saved.items():
            logger = logging.getLogger(name)
            for handler in logger.handlers[:]:
                if handler not in handlers:
                    logger.removeHandler(handler)
                    handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled
