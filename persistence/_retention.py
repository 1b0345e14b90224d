"""Retention: one bounded batch of a prune, per kind of row, planned inside its transaction.

Each `*_batch` function reads what it may remove as the transaction sees it (so a turn
committed just before is taken into account), removes at most `limit` rows of its kind
(the rows riding along with them too: a run's events and its agent's messages), moves
the marks that tell the invariants what is gone, and returns the counts by kind and
whether more may remain. With `delete=False` and `limit=None` it only counts (dry run).

What is never removed:
- a run that is not terminal, or any run after one that is kept (per agent, only the
  oldest runs go: the windows of what remains stay contiguous);
- a primary message not yet covered by every current sleeptime agent's windows, or in
  the window of a run not yet terminal (a queued run reads its window when it starts),
  or after the group's cursor; and never part of a turn (a turn's messages go together);
- the current version of a block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, and_, delete, exists, func, insert, or_, select, update

from messages import PruneSettings, RunStatus
from messages._retention import no_rows
from persistence._models import utcnow
from persistence._tables import (
    agents,
    block_versions,
    blocks,
    groups,
    messages,
    prunes,
    run_events,
    runs,
    turn_requests,
)

OPEN = (RunStatus.CREATED.value, RunStatus.RUNNING.value)
CHUNK = 500  # ids per IN list: well under every backend's limit on parameters
Batch = tuple[dict[str, int], bool]
"""What a batch removed (by kind) and whether more of its kind may remain."""


def chunks(ids: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """`ids` in slices of at most CHUNK, for IN lists."""
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def _limited(statement: Any, limit: int | None) -> Any:
    return statement if limit is None else statement.limit(limit)


# -- runs, their events and their agents' messages ------------------------------------------


def _prunable_runs(
    connection: Connection, agent_id: str, settings: PruneSettings, limit: int | None
) -> list[tuple[str, int]]:
    """(id, window end) of the agent's oldest runs that may go, oldest first: the runs
    before the first one that must stay (open, completed since `before`, or among the
    newest `keep_runs`). Windows order an agent's runs (they are contiguous)."""
    mine = runs.c.agent_id == agent_id
    stops = [
        connection.execute(
            select(func.min(runs.c.window_first_seq)).where(mine, runs.c.status.in_(OPEN))
        ).scalar()
    ]
    if settings.before is not None:
        recent = runs.c.completed_at >= settings.before
        stops.append(
            connection.execute(
                select(func.min(runs.c.window_first_seq)).where(mine, recent)
            ).scalar()
        )
    if settings.keep_runs:
        kept_from = connection.execute(
            select(runs.c.window_first_seq)
            .where(mine)
            .order_by(runs.c.window_first_seq.desc())
            .offset(settings.keep_runs - 1)
            .limit(1)
        ).scalar()
        if kept_from is None:
            return []  # it has no more runs than it keeps
        stops.append(kept_from)
    found = [stop for stop in stops if stop is not None]
    statement = select(runs.c.id, runs.c.window_last_seq).where(mine)
    if found:
        statement = statement.where(runs.c.window_first_seq < min(found))
    statement = _limited(statement.order_by(runs.c.window_first_seq), limit)
    return [(row[0], row[1]) for row in connection.execute(statement).all()]


def runs_batch(
    connection: Connection,
    group_id: str,
    settings: PruneSettings,
    limit: int | None,
    delete_rows: bool,
) -> Batch:
    """Remove up to `limit` runs of the group (the oldest of each sleeptime agent), with
    their events and the messages their agents stored for them; move each agent's
    `runs_pruned_through_seq` and `history_pruned_through`."""
    counts = no_rows()
    if not settings.prunes_runs:
        return counts, False
    members = connection.execute(
        select(
            agents.c.id, agents.c.runs_pruned_through_seq, agents.c.history_pruned_through
        ).where(agents.c.group_id == group_id, agents.c.role == "sleeptime")
    ).all()
    left = limit
    for agent_id, runs_mark, history_mark in members:
        if left is not None and left <= 0:
            break
        chosen = _prunable_runs(connection, agent_id, settings, left)
        if not chosen:
            continue
        ids = [run_id for run_id, _ in chosen]
        counts["runs"] += len(ids)
        if left is not None:
            left -= len(ids)
        if not delete_rows:
            for chunk in chunks(ids):
                counts["run_events"] += connection.execute(
                    select(func.count()).where(run_events.c.run_id.in_(chunk))
                ).scalar_one()
                counts["agent_messages"] += connection.execute(
                    select(func.count()).where(
                        messages.c.agent_id == agent_id, messages.c.run_id.in_(chunk)
                    )
                ).scalar_one()
            continue
        history_end = history_mark
        for chunk in chunks(ids):
            theirs = (messages.c.agent_id == agent_id, messages.c.run_id.in_(chunk))
            last = connection.execute(select(func.max(messages.c.sequence)).where(*theirs))
            history_end = max(history_end, last.scalar() or 0)
            counts["agent_messages"] += connection.execute(delete(messages).where(*theirs)).rowcount
            counts["run_events"] += connection.execute(
                delete(run_events).where(run_events.c.run_id.in_(chunk))
            ).rowcount
            connection.execute(delete(runs).where(runs.c.id.in_(chunk)))
        connection.execute(
            update(agents)
            .where(agents.c.id == agent_id)
            .values(
                runs_pruned_through_seq=max(runs_mark, *(end for _, end in chosen)),
                history_pruned_through=history_end,
            )
        )
    more = limit is not None and left is not None and left <= 0
    return counts, more


# -- primary messages -------------------------------------------------------------------------


def covered_through(connection: Connection, group_id: str) -> tuple[str, int, int, int]:
    """(primary agent id, the primary sequence up to which messages may go, the sequence
    and the turn they are already pruned through).

    Up to the cursor, and no further than any current sleeptime agent's windows reach
    (an agent joining later covers from its `coverage_from_seq`), and below the window of
    every run not yet terminal (it reads its window when it starts).
    """
    group = connection.execute(
        select(
            groups.c.primary_agent_id,
            groups.c.cursor_seq,
            groups.c.messages_pruned_through,
            groups.c.turns_pruned_through,
        ).where(groups.c.id == group_id)
    ).first()
    if group is None:
        return "", 0, 0, 0
    primary, bound, through_seq, through_turn = group
    top = (
        select(func.max(runs.c.window_last_seq))
        .where(runs.c.agent_id == agents.c.id)
        .scalar_subquery()
    )
    current = connection.execute(
        select(agents.c.coverage_from_seq, agents.c.runs_pruned_through_seq, top).where(
            agents.c.group_id == group_id,
            agents.c.role == "sleeptime",
            agents.c.removed_at.is_(None),
        )
    ).all()
    for coverage_from, runs_mark, last_window in current:
        bound = min(bound, max(coverage_from - 1, runs_mark, last_window or 0))
    first_open = connection.execute(
        select(func.min(runs.c.window_first_seq)).where(
            runs.c.group_id == group_id, runs.c.status.in_(OPEN)
        )
    ).scalar()
    if first_open is not None:
        bound = min(bound, first_open - 1)
    return primary, bound, through_seq, through_turn


def messages_batch(
    connection: Connection,
    group_id: str,
    settings: PruneSettings,
    limit: int | None,
    delete_rows: bool,
) -> Batch:
    """Remove the oldest whole turns of the group's primary messages that every sleeptime
    agent has covered, about `limit` messages (at least one whole turn); keep the newest
    `keep_messages` and, with `before`, those created since; move the group's
    `messages_pruned_through` and `turns_pruned_through`."""
    counts = no_rows()
    if not settings.messages:
        return counts, False
    primary, bound, through_seq, through_turn = covered_through(connection, group_id)
    mine = messages.c.agent_id == primary
    if settings.keep_messages is not None:
        last = connection.execute(select(func.max(messages.c.sequence)).where(mine)).scalar()
        bound = min(bound, max(last or 0, through_seq) - settings.keep_messages)
    if settings.before is not None:
        young = connection.execute(
            select(func.min(messages.c.sequence)).where(
                mine, messages.c.created_at >= settings.before
            )
        ).scalar()
        if young is not None:
            bound = min(bound, young - 1)
    if bound <= through_seq:
        return counts, False
    # The turn of the first message kept: a turn reaching past the bound stays whole.
    straddling = connection.execute(
        select(messages.c.turn)
        .where(mine, messages.c.sequence > bound)
        .order_by(messages.c.sequence)
        .limit(1)
    ).scalar()
    whole = _whole_turns(connection, primary, through_seq, bound, straddling, limit)
    if not whole:
        return counts, False
    end_seq, end_turn, count = whole
    counts["messages"] = count
    if delete_rows:
        connection.execute(
            delete(messages).where(
                mine, messages.c.sequence > through_seq, messages.c.sequence <= end_seq
            )
        )
        connection.execute(
            update(groups)
            .where(groups.c.id == group_id)
            .values(
                messages_pruned_through=end_seq, turns_pruned_through=max(through_turn, end_turn)
            )
        )
    # Whatever is left below the bound is for the next batch (which may find only the
    # turn reaching past it, and remove nothing).
    return counts, limit is not None and end_seq < bound


def _whole_turns(
    connection: Connection,
    primary: str,
    after_seq: int,
    bound: int,
    straddling: int | None,
    limit: int | None,
) -> tuple[int, int, int] | None:
    """(last sequence, last turn, messages) of the whole turns after `after_seq` and up to
    `bound`, about `limit` messages of them but at least one turn; None if there is none
    (the first turn reaches past the bound)."""
    fetch = None if limit is None else limit + 1
    while True:
        rows = connection.execute(
            _limited(
                select(messages.c.sequence, messages.c.turn)
                .where(
                    messages.c.agent_id == primary,
                    messages.c.sequence > after_seq,
                    messages.c.sequence <= bound,
                )
                .order_by(messages.c.sequence),
                fetch,
            )
        ).all()
        if not rows:
            return None
        complete = fetch is None or len(rows) < fetch  # every message up to the bound read
        turns = list(dict.fromkeys(turn for _, turn in rows))
        drop = {straddling} if complete else {turns[-1]}
        kept = [(seq, turn) for seq, turn in rows if turn not in drop]
        if kept:
            return kept[-1][0], kept[-1][1], len(kept)
        if complete or fetch is None:
            return None  # the one turn left reaches past the bound
        fetch *= 2  # one turn longer than a batch: read it whole


# -- block versions and turn requests ---------------------------------------------------------


def block_versions_batch(
    connection: Connection,
    group_id: str,
    settings: PruneSettings,
    limit: int | None,
    delete_rows: bool,
) -> Batch:
    """Remove up to `limit` versions of the group's blocks older than the newest
    `keep_block_versions` of each block (and, with `before`, made before it); never a
    block's current version. With `before`, every version of a block deleted before it
    goes too (a service that creates and deletes blocks would keep a few rows of each
    for ever)."""
    counts = no_rows()
    keep = settings.keep_block_versions
    if keep is None:
        return counts, False
    newest = (
        select(
            block_versions.c.block_id,
            func.max(block_versions.c.version).label("top"),
            func.max(block_versions.c.at).label("last_at"),
        )
        .where(block_versions.c.group_id == group_id)
        .group_by(block_versions.c.block_id)
        .subquery()
    )
    current = exists().where(
        blocks.c.id == block_versions.c.block_id, blocks.c.version == block_versions.c.version
    )
    older = and_(block_versions.c.version <= newest.c.top - keep, ~current)
    if settings.before is not None:
        older = and_(older, block_versions.c.at < settings.before)
        deleted = ~exists().where(blocks.c.id == block_versions.c.block_id)
        older = or_(older, and_(deleted, newest.c.last_at < settings.before))
    statement = (
        select(block_versions.c.id)
        .join(newest, newest.c.block_id == block_versions.c.block_id)
        .where(block_versions.c.group_id == group_id, older)
    )
    ids = connection.execute(_limited(statement.order_by(block_versions.c.id), limit)).scalars()
    chosen = list(ids)
    counts["block_versions"] = len(chosen)
    if delete_rows:
        for chunk in chunks(chosen):
            connection.execute(delete(block_versions).where(block_versions.c.id.in_(chunk)))
    return counts, limit is not None and len(chosen) >= limit


def turn_requests_batch(
    connection: Connection,
    group_id: str,
    settings: PruneSettings,
    limit: int | None,
    delete_rows: bool,
) -> Batch:
    """Remove up to `limit` of the group's turn requests made before `before` (a retry
    with a removed request id takes a new turn)."""
    counts = no_rows()
    if settings.before is None:
        return counts, False
    statement = select(turn_requests.c.request_id).where(
        turn_requests.c.group_id == group_id, turn_requests.c.created_at < settings.before
    )
    chosen = list(
        connection.execute(
            _limited(statement.order_by(turn_requests.c.created_at), limit)
        ).scalars()
    )
    counts["turn_requests"] = len(chosen)
    if delete_rows:
        for chunk in chunks(chosen):
            connection.execute(
                delete(turn_requests).where(
                    turn_requests.c.group_id == group_id, turn_requests.c.request_id.in_(chunk)
                )
            )
    return counts, limit is not None and len(chosen) >= limit


BatchPlan = Callable[[Connection, str, PruneSettings, int | None, bool], Batch]
BATCHES: tuple[tuple[str, BatchPlan], ...] = (
    ("runs", runs_batch),
    ("messages", messages_batch),
    ("block_versions", block_versions_batch),
    ("turn_requests", turn_requests_batch),
)
"""The batch of each step of a prune, in the order a prune takes them (runs first: their
window ends are what covers primary messages)."""


KEEP_PRUNE_RECORDS = 100
"""The `prunes` rows kept per group: what its newest prune calls removed."""


def record_prune(
    connection: Connection,
    group_id: str,
    settings: PruneSettings,
    counts: dict[str, int],
    prune_id: int | None,
) -> int:
    """Add a batch's counts to the group's `prunes` row of this prune call (made by its
    first batch); return the row's id."""
    if prune_id is not None:
        row = connection.execute(select(prunes.c.removed).where(prunes.c.id == prune_id)).first()
        if row is not None:
            total = {kind: row[0].get(kind, 0) + counts.get(kind, 0) for kind in counts}
            connection.execute(
                update(prunes).where(prunes.c.id == prune_id).values(removed=total, at=utcnow())
            )
            return prune_id
    created = connection.execute(
        insert(prunes).values(
            group_id=group_id, at=utcnow(), settings=settings.recorded(), removed=dict(counts)
        )
    )
    key = created.inserted_primary_key
    assert key is not None
    # The record of a group's prunes is kept to its newest KEEP_PRUNE_RECORDS calls:
    # pruning on a schedule must not grow a table of its own for ever.
    newest = (
        select(prunes.c.id)
        .where(prunes.c.group_id == group_id)
        .order_by(prunes.c.id.desc())
        .limit(KEEP_PRUNE_RECORDS)
    )
    connection.execute(
        delete(prunes).where(
            prunes.c.group_id == group_id, prunes.c.id.not_in(newest.scalar_subquery())
        )
    )
    return int(key[0])
