"""Passivation: which idle children give their threads back, decided by a pure function.

A passivated child has no instance; the next message told to its address starts one from
the store, through the same path a crash restart takes (SPEC 9).

Example:
    >>> to_passivate([Idle("group:a", None, 0.0)], {"group:a"}, now=400.0,
    ...              idle_after=300.0, max_active=None, prefix="group:")
    ['group:a']
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import NamedTuple

NUDGE_EVERY_S = 0.5
"""A child that declined to passivate (it was busy) is asked again after this long."""


class Passivate:
    """Told by the supervisor: stop now if idle; the next message starts a new instance."""

    __slots__ = ()


class Idle(NamedTuple):
    """An active child that may be passivated: who it works for, when it was last told."""

    identity: str
    parent: str | None
    last_told: float


def to_passivate(
    children: Iterable[Idle],
    active: Collection[str],
    now: float,
    idle_after: float | None,
    max_active: int | None,
    prefix: str,
) -> list[str]:
    """The children to ask to passivate: those told nothing for more than `idle_after`
    seconds, those whose parent is not `active` any more, and the least recently told
    beyond `max_active` among those whose identity starts with `prefix`."""
    children = list(children)
    chosen = {
        child.identity: None
        for child in children
        if (idle_after is not None and now - child.last_told > idle_after)
        or (child.parent is not None and child.parent not in active)
    }
    if max_active is not None:
        capped = [c for c in children if c.identity.startswith(prefix)]
        if len(capped) > max_active:
            capped.sort(key=lambda c: c.last_told)
            chosen.update((c.identity, None) for c in capped[: len(capped) - max_active])
    return list(chosen)
