"""The settings of each live group, shared by its actor and the steps of its agents.

A sleeptime run is made with the group's settings (the preamble, the transcript limit,
`run_timeout`) as they are when a step thread takes it, not when its agent handed it to
the pool: a run that waited for a thread while `update_group` committed a change is made
with the change, as every run that starts after it is. The group's actor puts the group
here as it commits a change, before `update_group` returns; a step reads it as it begins.

Example:
    >>> settings = GroupSettings()
    >>> cell = settings.cell(group)           # an agent's actor, as it starts
    >>> settings.changed(updated)             # the group's actor, once the change committed
    >>> cell.group is updated
    True
"""

from __future__ import annotations

import threading
import weakref

from messages import Group


class SettingsCell:
    """One group's settings, the latest of those offered (by `updated_at`)."""

    __slots__ = ("__weakref__", "group")

    def __init__(self, group: Group) -> None:
        self.group = group

    def offer(self, group: Group) -> None:
        """Keep `group` unless what is kept was changed later (an agent's actor may load
        the group from the store just before a change commits, and offer it after)."""
        kept = self.group.updated_at
        if kept is None or (group.updated_at is not None and group.updated_at >= kept):
            self.group = group


class GroupSettings:
    """The cells of the groups whose agents have an actor or a step queued: a cell lives
    as long as one of them holds it, so passivated groups cost nothing here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cells: weakref.WeakValueDictionary[str, SettingsCell] = weakref.WeakValueDictionary()

    def cell(self, group: Group) -> SettingsCell:
        """The group's cell, `group` offered to it."""
        with self._lock:
            found = self._cells.get(group.id)
            if found is None:
                found = self._cells[group.id] = SettingsCell(group)
        found.offer(group)
        return found

    def changed(self, group: Group) -> None:
        """The group's actor committed a change of its settings."""
        found = self._cells.get(group.id)
        if found is not None:
            found.offer(group)
