"""Completing a future that its caller may cancel at any moment.

`if not future.done(): future.set_result(x)` is a race: the caller can cancel between the
check and the set, and the set then raises `InvalidStateError` in the thread that was
only trying to report. These two functions are the one place that completes a caller's
future; a future already done (cancelled, or completed by someone else) is left alone.

Example:
    >>> resolve(command.reply, result)    # False if the caller had given up
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import TypeVar

T = TypeVar("T")


def resolve(future: Future[T], value: T) -> bool:
    """Give `future` its result; False if it was already done or cancelled."""
    try:
        future.set_result(value)
    except InvalidStateError:
        return False
    return True


def reject(future: Future[T], error: BaseException) -> bool:
    """Give `future` its exception; False if it was already done or cancelled."""
    try:
        future.set_exception(error)
    except InvalidStateError:
        return False
    return True
