"""The invariants of SPEC 4-6 and 15, checked over what a runtime stored.

Call it once the runs have finished (`Runtime.stop` drains them, or `wait_for_runs`):
an open run is itself a violation. What retention removed is read from its marks
(`Store.retention_marks`): the checks hold on what remains. Each check reads the store
only; the pure ones (`attempts_decrease`, `overlapping_runs`, `runs_out_of_order`,
`request_problems`) take rows and can be called directly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from itertools import pairwise

from pydantic import BaseModel, ConfigDict, Field

from messages import TERMINAL_STATUSES, Agent, Block, Group, Run
from messages._runs import is_legal_history
from persistence import Store

INVARIANTS = (
    "runs_terminal",
    "histories_legal",
    "turns_counted",
    "counters_consistent",
    "one_run_per_agent_per_fire",
    "windows_contiguous_disjoint_covering",
    "attempts_monotonic",
    "agent_runs_disjoint",
    "agent_runs_in_order",
    "request_ids_unique",
    "epochs_monotonic",
    "block_histories_consistent",
)
_TERMINAL = {status.value for status in TERMINAL_STATUSES}
Event = tuple[str, int, datetime]
"""A recorded run event as the store gives it: (status, attempt, at)."""


class InvariantReport(BaseModel):
    """Which invariants hold (`checks`), and what broke them (`violations`).

    `coverage` says, per sleeptime agent (removed ones included), the first primary
    message sequence its windows cover (`Agent.coverage_from_seq`): 1 for the agents a
    group was created with, later for one added to a live group."""

    model_config = ConfigDict(frozen=True)
    groups: int
    runs: int
    checks: dict[str, bool]
    violations: list[str]
    coverage: dict[str, int] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


def check_invariants(
    store: Store, group_ids: Iterable[str] | None = None, max_violations: int = 50
) -> InvariantReport:
    """Check every group (or the given ones); see INVARIANTS for the names.

    Everything is read in one snapshot of the database, so a check made while the runtime
    works reports what was stored at one moment (runs still open fail `runs_terminal`,
    and only that), never a mix of before and after a commit."""
    found: dict[str, list[str]] = {name: [] for name in INVARIANTS}
    run_count = 0
    coverage: dict[str, int] = {}
    with store.snapshot():
        groups = (
            store.list_groups() if group_ids is None else [store.get_group(g) for g in group_ids]
        )
        for group in groups:
            runs = store.list_runs(group_id=group.id)
            run_count += len(runs)
            sleepers = [a for a in store.group_agents(group.id) if a.role == "sleeptime"]
            coverage.update((a.id, a.coverage_from_seq) for a in sleepers)
            _check_group(store, group, runs, found, sleepers)
    violations = [f"{name}: {detail}" for name, details in found.items() for detail in details][
        :max_violations
    ]
    return InvariantReport(
        groups=len(groups),
        runs=run_count,
        checks={name: not details for name, details in found.items()},
        violations=violations,
        coverage=coverage,
    )


def _check_group(
    store: Store,
    group: Group,
    runs: list[Run],
    found: dict[str, list[str]],
    sleepers: list[Agent] | None = None,
) -> None:
    """`sleepers`: every sleeptime agent the group ever had (default: its members now)."""
    if sleepers is None:
        sleepers = [a for a in store.group_agents(group.id) if a.role == "sleeptime"]
    histories = store.event_histories(group.id)
    for run in runs:
        if not run.status.terminal:
            found["runs_terminal"].append(f"run {run.id} is {run.status.value}")
        events = histories.get(run.id, [])
        path = [status for status, _, _ in events]
        if not is_legal_history(path) or path[-1] != run.status.value:
            found["histories_legal"].append(f"run {run.id}: {' -> '.join(path)}")
        if attempts_decrease(events):
            attempts = " -> ".join(str(attempt) for _, attempt, _ in events)
            found["attempts_monotonic"].append(f"run {run.id}: attempts {attempts}")
    for agent_id in [a.id for a in sleepers]:
        mine = [r for r in runs if r.agent_id == agent_id]
        found["agent_runs_disjoint"] += [
            f"agent {agent_id}: {problem}" for problem in overlapping_runs(mine, histories)
        ]
        found["agent_runs_in_order"] += [
            f"agent {agent_id}: {problem}" for problem in runs_out_of_order(mine, histories)
        ]
    found["request_ids_unique"] += [
        f"group {group.id}: {problem}"
        for problem in request_problems(store.request_ids(group.id), group.turns)
    ]
    found["epochs_monotonic"] += [
        f"group {group.id}: {problem}" for problem in stale_writes(store.event_epochs(group.id))
    ]

    found["block_histories_consistent"] += [
        f"group {group.id}: {problem}"
        for problem in block_problems(
            store.group_blocks(group.id),
            store.block_versions(group.id),
            [group.primary_agent_id, *group.sleeptime_agent_ids],
        )
    ]

    history = store.turn_numbers(group.primary_agent_id)
    marks = store.retention_marks(group.id)  # what retention removed: a prefix of each
    sequences = [seq for seq, _, _ in history]
    first_seq = marks.messages_pruned_through + 1
    if sequences != list(range(first_seq, first_seq + len(sequences))):
        found["turns_counted"].append(f"group {group.id}: message sequences have gaps")
    turns = sorted({turn for _, turn, _ in history if turn is not None})
    if turns != list(range(marks.turns_pruned_through + 1, group.turns + 1)):
        found["turns_counted"].append(
            f"group {group.id}: {group.turns} turns counted, turns stored: "
            f"{len(turns)} (last {turns[-1] if turns else None})"
        )
    # update_group keeps the counter, so it may exceed a lowered frequency until the next
    # turn; once a turn was the group's last change, it is within [0, frequency).
    last_change_was_a_turn = (
        group.last_turn_at is not None and group.last_turn_at == group.updated_at
    )
    if (
        group.frequency
        and group.turns
        and last_change_was_a_turn
        and not (0 <= group.counter < group.frequency)
    ):
        found["counters_consistent"].append(
            f"group {group.id}: counter {group.counter} with frequency {group.frequency}"
        )
    if group.turns == 0 and group.counter != -1:
        found["counters_consistent"].append(f"group {group.id}: counter moved without a turn")

    by_turn: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        if not is_backfill(run):
            by_turn[run.turn].append(run)
    for turn, fired in by_turn.items():
        agents = sorted(r.agent_id for r in fired)
        windows = {(r.window_first_seq, r.window_last_seq) for r in fired}
        # An agent whose runs up to this window were pruned has none left for it.
        end = max(last for _, last in windows)
        expected = [
            a for a in members_at(sleepers, turn) if marks.runs_pruned_through_seq.get(a, 0) < end
        ]
        if agents != sorted(expected) or len(windows) != 1:
            found["one_run_per_agent_per_fire"].append(
                f"group {group.id} turn {turn}: {len(fired)} run(s), windows {sorted(windows)}"
            )

    cursor_seq = marks.cursor_seq  # the cursor's message itself may have been pruned
    stored_at = next((seq for seq, _, mid in history if mid == group.cursor), cursor_seq)
    if stored_at != cursor_seq:
        found["windows_contiguous_disjoint_covering"].append(
            f"group {group.id}: the cursor's message is at {stored_at}, cursor_seq {cursor_seq}"
        )
    for agent in sleepers:
        mine = sorted(
            (r for r in runs if r.agent_id == agent.id),
            key=lambda r: (r.turn, r.metadata.get("position", 0)),  # creation order
        )
        ends_at = None if agent.removed_at is not None else cursor_seq
        # Retention removes a prefix of an agent's runs: coverage goes on after it.
        start = max(agent.coverage_from_seq, marks.runs_pruned_through_seq.get(agent.id, 0) + 1)
        found["windows_contiguous_disjoint_covering"] += [
            f"agent {agent.id}: {problem}" for problem in coverage_problems(start, mine, ends_at)
        ]


def is_backfill(run: Run) -> bool:
    """Whether the run is one of an agent's backfill runs (created as it joined)."""
    return bool(run.metadata.get("backfill"))


def members_at(sleepers: Sequence[Agent], turn: int) -> list[str]:
    """The sleeptime agents that were members of their group at `turn`: added before it
    (`added_turn` < turn) and not removed before it (`removed_turn` >= turn)."""
    return [
        a.id
        for a in sleepers
        if a.added_turn < turn and (a.removed_turn is None or a.removed_turn >= turn)
    ]


def coverage_problems(coverage_from: int, runs: Sequence[Run], end: int | None) -> list[str]:
    """What is wrong with one agent's windows (its runs in creation order): they must be
    contiguous and disjoint from `coverage_from` on, and end at `end` (the cursor, for an
    agent still in its group; None: anywhere, for one removed). Its backfill runs, first,
    cover [coverage_from, the cursor at its join] exactly once."""
    problems = []
    covered = coverage_from - 1
    for run in runs:
        if run.window_first_seq != covered + 1 or run.window_last_seq < run.window_first_seq:
            problems.append(
                f"window {run.window_first_seq}-{run.window_last_seq} after {covered} "
                f"(coverage from {coverage_from})"
            )
        covered = max(covered, run.window_last_seq)
    backfill = [r for r in runs if is_backfill(r)]
    if backfill:
        through = backfill[0].metadata.get("backfill_through")
        if runs[: len(backfill)] != backfill or backfill[-1].window_last_seq != through:
            problems.append(
                f"backfill runs end at {backfill[-1].window_last_seq}, not at {through} "
                "(the cursor at the join), or do not come first"
            )
    if end is not None and covered != end:
        problems.append(
            f"windows end at {covered}, the cursor is at {end} (coverage from {coverage_from})"
        )
    return problems


def stale_writes(epochs: Sequence[tuple[int, int | None]]) -> list[str]:
    """Writes accepted from a stale lease: along a group's run events, in the order they
    were written ((event id, epoch) pairs), the epoch of its shard's lease never goes back
    (events written before epochs were recorded, None, are skipped)."""
    problems = []
    newest: tuple[int, int] | None = None
    for event_id, epoch in epochs:
        if epoch is None:
            continue
        if newest is not None and epoch < newest[1]:
            problems.append(
                f"event {event_id} written under epoch {epoch} after event {newest[0]} "
                f"under epoch {newest[1]}"
            )
        elif newest is None or epoch > newest[1]:
            newest = (event_id, epoch)
    return problems


def attempts_decrease(events: Sequence[Event]) -> bool:
    """Whether a run's attempt ever goes back along its events (oldest first)."""
    return any(later[1] < earlier[1] for earlier, later in pairwise(events))


def overlapping_runs(runs: Sequence[Run], histories: dict[str, list[Event]]) -> list[str]:
    """Where runs of one agent overlap in time: sorted by when they started, each must
    end at or before the next one starts. Only runs that started count; a run's own
    `started_at` / `completed_at` are used, else its events' times (its last `running`
    event, its terminal event); a run that started and never ended overlaps any later one.
    """
    spans: list[tuple[datetime, datetime | None, str]] = []
    for run in runs:
        events = histories.get(run.id, [])
        started = _started(run, events)
        if started is None:
            continue  # never started: cancelled or failed while created
        ended = run.completed_at or next(
            (at for status, _, at in reversed(events) if status in _TERMINAL), None
        )
        spans.append((started, ended, run.id))
    spans.sort(key=lambda span: span[0])
    problems = []
    for (_, ended, run_id), (next_start, _, next_id) in pairwise(spans):
        if ended is None or ended > next_start:
            end = "never ended" if ended is None else f"ended {ended.isoformat()}"
            problems.append(
                f"run {run_id} {end}, after run {next_id} started {next_start.isoformat()}"
            )
    return problems


def _started(run: Run, events: Sequence[Event]) -> datetime | None:
    """When the run's current attempt started: its `started_at`, else its last `running`
    event; None if it never started."""
    return run.started_at or max(
        (at for status, _, at in events if status == "running"), default=None
    )


def runs_out_of_order(runs: Sequence[Run], histories: dict[str, list[Event]]) -> list[str]:
    """Where runs of one agent started out of the order they were created in: by turn,
    then position (a backfill's runs, all of one turn), as its actor runs them. Only runs
    that started count, each at its `started_at`, else its last `running` event (as
    `overlapping_runs` takes them): a run re-queued after an interruption is run again
    before any later one, so its last start is still before theirs."""
    problems = []
    latest: tuple[datetime, str] | None = None  # the latest start so far, and its run
    created = sorted(runs, key=lambda run: (run.turn, int(run.metadata.get("position", 0))))
    for run in created:
        started = _started(run, histories.get(run.id, []))
        if started is None:
            continue  # never started: cancelled or failed while created
        if latest is not None and started < latest[0]:
            problems.append(
                f"run {run.id} (turn {run.turn}) started {started.isoformat()}, before run "
                f"{latest[1]}, created earlier, which started {latest[0].isoformat()}"
            )
        if latest is None or started > latest[0]:
            latest = (started, run.id)
    return problems


def request_problems(requests: Sequence[tuple[str, int]], turns: int) -> list[str]:
    """What is wrong with a group's recorded requests, (request id, turn) each: a request
    id recorded more than once, or not with a turn of its own among the group's turns."""
    problems = []
    seen: dict[str, int] = {}
    by_turn: dict[int, str] = {}
    for request_id, turn in requests:
        if request_id in seen:
            problems.append(
                f"request {request_id!r} recorded more than once (turns {seen[request_id]}, {turn})"
            )
        seen.setdefault(request_id, turn)
        if not 1 <= turn <= turns:
            problems.append(f"request {request_id!r} names turn {turn} of {turns}")
        elif turn in by_turn and by_turn[turn] != request_id:
            problems.append(f"requests {by_turn[turn]!r} and {request_id!r} both name turn {turn}")
        by_turn.setdefault(turn, request_id)
    return problems


def block_problems(
    blocks: Sequence[Block],
    versions: Sequence[tuple[str, int, str | None, str]],
    agent_ids: Sequence[str],
) -> list[str]:
    """What is wrong with a group's blocks and their histories ((block id, version,
    value, change) in writing order): each block's versions follow each other without a
    gap (retention may have removed the oldest), the last one is the block as stored, a
    deleted block's history ends with its deletion and nothing follows it, and no
    agent sees two blocks with one label."""
    problems = []
    by_block: dict[str, list[tuple[int, str | None, str]]] = defaultdict(list)
    for block_id, version, value, change in versions:
        by_block[block_id].append((version, value, change))
    current = {block.id: block for block in blocks}
    for block_id, history in by_block.items():
        numbers = [version for version, _, _ in history]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            problems.append(f"block {block_id}: versions {numbers}")
        deletions = [i for i, (_, _, change) in enumerate(history) if change == "deleted"]
        last_version, last_value, _ = history[-1]
        block = current.get(block_id)
        if block is None:
            if deletions != [len(history) - 1]:
                problems.append(f"block {block_id} is gone, its history does not end deleted")
        elif deletions:
            problems.append(f"block {block_id} is stored, its history says deleted")
        elif (last_version, last_value) != (block.version, block.value):
            problems.append(
                f"block {block_id} is at version {block.version}, its history at {last_version}"
                + ("" if last_version != block.version else " with another value")
            )
    views: dict[str | None, list[str]] = {None: [b.label for b in blocks if b.agent_id is None]}
    for agent_id in agent_ids:
        views[agent_id] = views[None] + [b.label for b in blocks if b.agent_id == agent_id]
    for viewer, labels in views.items():
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            who = "the group" if viewer is None else f"agent {viewer}"
            problems.append(f"{who} sees two blocks labelled {', '.join(twice)}")
    return problems
