"""The memory blocks as last committed, kept by the store that owns the database.

Every turn reads the blocks twice (the primary agent's system prompt, the sleeptime run's
memory), and blocks change only through the owning store: `create_group` and
`create_block` insert them, `edit_block` and `set_block` change their values,
`delete_block` removes them. So the owner can answer from memory once it has read a
group, and a read costs no round trip.

What keeps the cache exact:

- Each block's entry only moves forward in `version` (every edit adds one): an edit records
  its result after its commit, and a read that raced with that edit can never put the older
  value back.
- A block created or deleted is added to (removed from) its group's layout after its
  commit, and the epoch moves: a read that began before may hold the layout before that
  change, and does not remember it.
- When a write's outcome is unknown (the connection failed during the commit), the block
  (for a creation or deletion: the group's layout) is forgotten and the next read asks the
  database.
- A read remembers what it found only if the cache was not cleared while it ran, so a read
  begun before a clear cannot bring back a value the clear meant to drop.

Size is bounded: past `max_blocks` entries the cache starts over (reads refill it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from messages import Block, Blocks

MAX_BLOCKS = 200_000


class BlockCache:
    """Blocks by id, each group's block ids in creation order, each agent's group.

    Example:
        >>> cache = BlockCache()
        >>> cache.blocks_of(agent_id) or cache.remember(agent_id, group_id, read(), epoch)
    """

    def __init__(self, max_blocks: int = MAX_BLOCKS) -> None:
        self._lock = threading.Lock()
        self._max_blocks = max_blocks
        self._epoch = 0  # moves at every clear
        self._blocks: dict[str, Block] = {}
        self._layouts: dict[str, tuple[str, ...]] = {}  # group id -> block ids by position
        self._groups: dict[str, str] = {}  # agent id -> group id

    @property
    def epoch(self) -> int:
        """Take it before reading the database; hand it to `remember` with what was read."""
        return self._epoch

    def blocks_of(self, agent_id: str) -> Blocks | None:
        """The agent's blocks (the group's shared ones, then its own), or None if unknown."""
        with self._lock:
            group_id = self._groups.get(agent_id)
            layout = None if group_id is None else self._layouts.get(group_id)
            if layout is None:
                return None
            found = [self._blocks.get(block_id) for block_id in layout]
        if any(block is None for block in found):
            return None
        return visible_to(agent_id, [b for b in found if b is not None])

    def remember(
        self, agent_id: str | None, group_id: str, group_blocks: Sequence[Block], epoch: int
    ) -> Blocks:
        """Record every block of a group as read at `epoch`; the agent's view of them
        (with no agent: the group's shared blocks).

        A block the cache already holds at a later version keeps that version: the read
        raced with an edit that committed after it.
        """
        with self._lock:
            if epoch == self._epoch:
                if len(self._blocks) + len(group_blocks) > self._max_blocks:
                    self._clear()
                else:
                    if agent_id is not None:
                        self._groups[agent_id] = group_id
                    self._layouts[group_id] = tuple(b.id for b in group_blocks)
                    for block in group_blocks:
                        self._keep_newer(block)
            current = [self._blocks.get(b.id, b) for b in group_blocks]
        return visible_to(agent_id, current)

    def shared_of(self, group_id: str) -> Blocks | None:
        """The group's shared blocks, or None if unknown."""
        with self._lock:
            layout = self._layouts.get(group_id)
            if layout is None:
                return None
            found = [self._blocks.get(block_id) for block_id in layout]
        if any(block is None for block in found):
            return None
        return visible_to(None, [b for b in found if b is not None])

    def group_of(self, agent_id: str) -> str | None:
        """The agent's group, if known."""
        with self._lock:
            return self._groups.get(agent_id)

    def added(self, block: Block) -> None:
        """A block's creation committed: it joins its group's layout (if known), last."""
        with self._lock:
            self._epoch += 1  # a read in flight may hold the layout without it
            layout = self._layouts.get(block.group_id)
            if layout is None:
                return
            if len(self._blocks) >= self._max_blocks:
                self._clear()
                return
            self._layouts[block.group_id] = (*layout, block.id)
            self._blocks[block.id] = block

    def removed(self, block: Block) -> None:
        """A block's deletion committed: it leaves the cache and its group's layout."""
        with self._lock:
            self._epoch += 1  # a read in flight may hold the layout with it
            self._blocks.pop(block.id, None)
            layout = self._layouts.get(block.group_id)
            if layout is not None:
                self._layouts[block.group_id] = tuple(i for i in layout if i != block.id)

    def forget_group(self, group_id: str) -> None:
        """A creation or deletion's outcome is unknown: the group's next read asks the
        database."""
        with self._lock:
            self._epoch += 1
            self._layouts.pop(group_id, None)

    def drop_group(self, group_id: str) -> None:
        """The group's deletion committed: its blocks, layout and agents leave the cache
        (kept, they would stay until the cache fills, one entry per group ever deleted)."""
        with self._lock:
            self._epoch += 1
            layout = self._layouts.pop(group_id, None)
            if layout is not None:
                for block_id in layout:
                    self._blocks.pop(block_id, None)
            else:
                for block_id in [i for i, b in self._blocks.items() if b.group_id == group_id]:
                    del self._blocks[block_id]
            for agent_id in [a for a, g in self._groups.items() if g == group_id]:
                del self._groups[agent_id]

    def committed(self, block_id: str) -> Block | None:
        """The block as last committed, if known."""
        with self._lock:
            return self._blocks.get(block_id)

    def edited(self, block: Block) -> None:
        """An edit of `block` committed: this is its value now."""
        with self._lock:
            if len(self._blocks) >= self._max_blocks:
                self._clear()
            self._keep_newer(block)

    def forget(self, block_id: str) -> None:
        """An edit's outcome is unknown: the next read of this block asks the database."""
        with self._lock:
            self._blocks.pop(block_id, None)
            self._epoch += 1  # a read in flight may hold the value before that edit

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._epoch += 1
        self._blocks.clear()
        self._layouts.clear()
        self._groups.clear()

    def _keep_newer(self, block: Block) -> None:
        held = self._blocks.get(block.id)
        if held is None or held.version < block.version:
            self._blocks[block.id] = block


def visible_to(agent_id: str | None, group_blocks: Sequence[Block]) -> Blocks:
    """Shared blocks first, then the agent's own, each in creation order (no agent: the
    shared blocks only)."""
    shared = [b for b in group_blocks if b.agent_id is None]
    if agent_id is None:
        return Blocks(shared)
    return Blocks(shared + [b for b in group_blocks if b.agent_id == agent_id])
