"""The store: every query the runtime makes, next to the tables it touches.

Reads run on a pool of reader connections in the caller's thread. Writes are functions
run by the single `Committer`, one function per transactional operation of the spec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from messages import (
    Agent,
    AgentNotFound,
    Block,
    Blocks,
    Group,
    GroupNotFound,
    Message,
    Run,
    RunEvent,
    RunNotFound,
    RunStatus,
    StoreUnavailable,
    TransitionRefused,
)
from persistence._committer import Committer
from persistence._engine import make_engines, redact
from persistence._models import (
    AgentRow,
    Base,
    BlockRow,
    GroupRow,
    MessageRow,
    RunEventRow,
    RunRow,
    utcnow,
)
from persistence._records import GroupState, NewGroup, Transition, TurnWrite

T = TypeVar("T")
OPEN_STATUSES = (RunStatus.CREATED.value, RunStatus.RUNNING.value)


class StaleTurn(Exception):
    """The stored turn count moved under a writer: someone else drove this group."""


class Store:
    """The database of one runtime.

    Example:
        >>> store = Store("sqlite:///sleeptime.db")
        >>> store.get_group(group_id).counter
    """

    def __init__(self, url: str) -> None:
        self.url = redact(url)
        self._writer, self._reader = make_engines(url)
        self._guard(lambda: Base.metadata.create_all(self._writer))
        self.committer = Committer(self._writer, translate=self._translate)

    def close(self) -> None:
        """Commit what is queued, then release every connection."""
        self.committer.close()
        self._writer.dispose()
        self._reader.dispose()

    # -- errors ---------------------------------------------------------------------------

    def _translate(self, error: Exception) -> Exception:
        if isinstance(error, DBAPIError):
            detail = str(error.orig).strip() or type(error.orig).__name__
            return StoreUnavailable(self.url, detail)
        return error

    def _guard(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except DBAPIError as error:
            raise self._translate(error) from error

    def _read(self, query: Callable[[Session], T]) -> T:
        def run() -> T:
            with Session(self._reader) as session:
                return query(session)

        return self._guard(run)

    # -- groups and agents ----------------------------------------------------------------

    def create_group(self, new: NewGroup) -> Future[None]:
        def op(session: Session) -> None:
            session.execute(insert(GroupRow), [_group_values(new.group)])
            session.execute(
                insert(AgentRow), [_agent_values(a, i) for i, a in enumerate(_ordered_agents(new))]
            )
            session.execute(
                insert(BlockRow), [_block_values(b, i) for i, b in enumerate(new.blocks)]
            )

        return self.committer.submit(op)

    def get_group(self, group_id: str) -> Group:
        return self._read(lambda s: _load_group(s, group_id))

    def group_state(self, group_id: str) -> GroupState:
        """The group with its agents and the end of its primary history."""

        def query(session: Session) -> GroupState:
            group = _load_group(session, group_id)
            row = session.get(GroupRow, group_id)
            assert row is not None
            agents = _group_agents(session, group_id)
            last = session.scalar(
                select(func.max(MessageRow.sequence)).where(
                    MessageRow.agent_id == group.primary_agent_id
                )
            )
            return GroupState(
                group=group,
                cursor_seq=row.cursor_seq,
                last_seq=last or 0,
                primary=agents[0],
                sleeptime=agents[1:],
            )

        return self._read(query)

    def group_ids(self) -> list[str]:
        return self._read(
            lambda s: list(s.scalars(select(GroupRow.id).order_by(GroupRow.created_at)))
        )

    def list_groups(self) -> list[Group]:
        def query(session: Session) -> list[Group]:
            ids = session.scalars(select(GroupRow.id).order_by(GroupRow.created_at))
            return [_load_group(session, group_id) for group_id in ids]

        return self._read(query)

    def update_group(self, group_id: str, values: dict[str, Any]) -> Future[None]:
        def op(session: Session) -> None:
            result = session.execute(
                update(GroupRow)
                .where(GroupRow.id == group_id)
                .values(**values, updated_at=utcnow())
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise GroupNotFound(group_id)

        return self.committer.submit(op)

    def get_agent(self, agent_id: str) -> Agent:
        def query(session: Session) -> Agent:
            row = session.get(AgentRow, agent_id)
            if row is None:
                raise AgentNotFound(agent_id)
            return _agent(row)

        return self._read(query)

    # -- memory blocks --------------------------------------------------------------------

    def get_blocks(self, agent_id: str) -> Blocks:
        """The group's shared blocks then the agent's own, in creation order."""

        def query(session: Session) -> Blocks:
            agent = session.get(AgentRow, agent_id)
            if agent is None:
                raise AgentNotFound(agent_id)
            rows = session.scalars(
                select(BlockRow)
                .where(
                    BlockRow.group_id == agent.group_id,
                    (BlockRow.agent_id.is_(None)) | (BlockRow.agent_id == agent_id),
                )
                .order_by(BlockRow.agent_id.is_not(None), BlockRow.position)
            )
            return Blocks(_block(r) for r in rows)

        return self._read(query)

    def edit_block(self, block_id: str, change: Callable[[Block], str]) -> Block:
        """Apply `change` to the block's current value in one transaction.

        An exception raised by `change` (a refused memory tool call) comes back to the
        caller and nothing is written.
        """

        def op(session: Session) -> Block | Exception:
            row = session.scalars(
                select(BlockRow).where(BlockRow.id == block_id).with_for_update()
            ).one()
            try:
                value = change(_block(row))
            except Exception as refused:  # returned, not raised: the batch must not roll back
                return refused
            row.value, row.version, row.updated_at = value, row.version + 1, utcnow()
            session.flush()
            return _block(row)

        outcome = self.committer.run(op)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    # -- messages -------------------------------------------------------------------------

    def list_messages(
        self, agent_id: str, first_seq: int | None = None, last_seq: int | None = None
    ) -> list[Message]:
        """An agent's history, oldest first, optionally one window of sequences."""

        def query(session: Session) -> list[Message]:
            statement = select(MessageRow).where(MessageRow.agent_id == agent_id)
            if first_seq is not None:
                statement = statement.where(MessageRow.sequence >= first_seq)
            if last_seq is not None:
                statement = statement.where(MessageRow.sequence <= last_seq)
            rows = list(session.scalars(statement.order_by(MessageRow.sequence)))
            if not rows and first_seq is None and session.get(AgentRow, agent_id) is None:
                raise AgentNotFound(agent_id)
            return [_message(r) for r in rows]

        return self._read(query)

    def last_sequence(self, agent_id: str) -> int:
        return self._read(
            lambda s: (
                s.scalar(
                    select(func.max(MessageRow.sequence)).where(MessageRow.agent_id == agent_id)
                )
                or 0
            )
        )

    # -- turns ----------------------------------------------------------------------------

    def record_turn(self, turn: TurnWrite) -> Future[None]:
        """Store a turn's messages, counter, cursor and runs in one transaction."""

        def op(session: Session) -> None:
            moved = session.execute(
                update(GroupRow)
                .where(GroupRow.id == turn.group_id, GroupRow.turns == turn.expected_turns)
                .values(
                    turns=turn.turns,
                    counter=turn.counter,
                    cursor=turn.cursor,
                    cursor_seq=turn.cursor_seq,
                    updated_at=utcnow(),
                )
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise StaleTurn(f"group {turn.group_id} is no longer at turn {turn.expected_turns}")
            if turn.messages:
                session.execute(insert(MessageRow), [_message_values(m) for m in turn.messages])
            if turn.runs:
                session.execute(insert(RunRow), [_run_values(r) for r in turn.runs])
                session.execute(
                    insert(RunEventRow),
                    [
                        {
                            "run_id": r.id,
                            "status": r.status.value,
                            "at": r.created_at,
                            "attempt": r.attempt,
                            "reason": "created",
                        }
                        for r in turn.runs
                    ],
                )

        return self.committer.submit(op)

    # -- runs -----------------------------------------------------------------------------

    def apply_transition(self, change: Transition) -> Future[None]:
        """Write one status change (refused if the stored status moved meanwhile)."""

        def op(session: Session) -> None:
            values: dict[str, Any] = {"status": change.new.value, "attempt": change.attempt}
            if change.new is RunStatus.RUNNING:
                values["started_at"] = change.at
            if change.new.terminal:
                values["completed_at"] = change.at
            if change.stop_reason is not None:
                values["stop_reason"] = change.stop_reason.value
            if change.error is not None:
                values["error"] = change.error
            moved = session.execute(
                update(RunRow)
                .where(RunRow.id == change.run_id, RunRow.status == change.old.value)
                .values(**values)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise TransitionRefused(change.run_id, change.old.value, change.new.value)
            session.execute(
                insert(RunEventRow),
                [
                    {
                        "run_id": change.run_id,
                        "status": change.new.value,
                        "at": change.at,
                        "attempt": change.attempt,
                        "reason": change.reason,
                    }
                ],
            )
            if change.messages:
                session.execute(insert(MessageRow), [_message_values(m) for m in change.messages])

        return self.committer.submit(op)

    def store_messages(self, messages: Sequence[Message]) -> Future[None]:
        """Append messages to agents' histories (e.g. those of a run refused late)."""

        def op(session: Session) -> None:
            session.execute(insert(MessageRow), [_message_values(m) for m in messages])

        return self.committer.submit(op)

    def get_run(self, run_id: str) -> Run:
        def query(session: Session) -> Run:
            row = session.get(RunRow, run_id)
            if row is None:
                raise RunNotFound(run_id)
            return _run(row)

        return self._read(query)

    def get_runs(self, run_ids: Iterable[str]) -> dict[str, Run]:
        wanted = list(dict.fromkeys(run_ids))

        def query(session: Session) -> dict[str, Run]:
            found: dict[str, Run] = {}
            for start in range(0, len(wanted), 500):
                rows = session.scalars(
                    select(RunRow).where(RunRow.id.in_(wanted[start : start + 500]))
                )
                found.update((r.id, _run(r)) for r in rows)
            return found

        return self._read(query)

    def list_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
        limit: int | None = None,
    ) -> list[Run]:
        def query(session: Session) -> list[Run]:
            statement = select(RunRow)
            if agent_id is not None:
                statement = statement.where(RunRow.agent_id == agent_id)
            if group_id is not None:
                statement = statement.where(RunRow.group_id == group_id)
            if statuses is not None:
                statement = statement.where(
                    RunRow.status.in_([RunStatus(s).value for s in statuses])
                )
            statement = statement.order_by(RunRow.created_at, RunRow.turn, RunRow.position)
            if limit is not None:
                statement = statement.limit(limit)
            return [_run(r) for r in session.scalars(statement)]

        return self._read(query)

    def open_runs(self) -> list[Run]:
        """Every run not yet terminal, per agent in creation order."""
        return self._read(
            lambda s: [
                _run(r)
                for r in s.scalars(
                    select(RunRow)
                    .where(RunRow.status.in_(OPEN_STATUSES))
                    .order_by(RunRow.agent_id, RunRow.turn)
                )
            ]
        )

    def run_events(self, run_id: str) -> list[RunEvent]:
        def query(session: Session) -> list[RunEvent]:
            if session.get(RunRow, run_id) is None:
                raise RunNotFound(run_id)
            rows = session.scalars(
                select(RunEventRow).where(RunEventRow.run_id == run_id).order_by(RunEventRow.id)
            )
            return [
                RunEvent(
                    run_id=r.run_id,
                    status=RunStatus(r.status),
                    at=r.at,
                    attempt=r.attempt,
                    reason=r.reason,
                )
                for r in rows
            ]

        return self._read(query)


# -- rows <-> models ----------------------------------------------------------------------


def _load_group(session: Session, group_id: str) -> Group:
    row = session.get(GroupRow, group_id)
    if row is None:
        raise GroupNotFound(group_id)
    agents = _group_agents(session, group_id)
    return Group(
        id=row.id,
        primary_agent_id=row.primary_agent_id,
        sleeptime_agent_ids=[a.id for a in agents if a.role == "sleeptime"],
        frequency=row.frequency,
        counter=row.counter,
        cursor=row.cursor,
        turns=row.turns,
        preamble=row.preamble,
        transcript_max_messages=row.transcript_max_messages,
        run_timeout=row.run_timeout,
        max_attempts=row.max_attempts,
        status=row.status,
        failure_reason=row.failure_reason,
        created_at=row.created_at,
    )


def _group_agents(session: Session, group_id: str) -> list[Agent]:
    """The primary agent first, then the sleeptime agents in the group's order."""
    rows = session.scalars(
        select(AgentRow).where(AgentRow.group_id == group_id).order_by(AgentRow.position)
    )
    return [_agent(r) for r in rows]


def _ordered_agents(new: NewGroup) -> list[Agent]:
    return sorted(new.agents, key=lambda a: a.role != "primary")


def _group_values(group: Group) -> dict[str, Any]:
    return {
        "id": group.id,
        "primary_agent_id": group.primary_agent_id,
        "frequency": group.frequency,
        "counter": group.counter,
        "turns": group.turns,
        "cursor": group.cursor,
        "cursor_seq": 0,
        "preamble": group.preamble,
        "transcript_max_messages": group.transcript_max_messages,
        "run_timeout": group.run_timeout,
        "max_attempts": group.max_attempts,
        "status": group.status,
        "failure_reason": group.failure_reason,
        "created_at": group.created_at,
        "updated_at": group.created_at,
    }


def _agent(row: AgentRow) -> Agent:
    return Agent(
        id=row.id,
        group_id=row.group_id,
        role=row.role,
        name=row.name,
        kind=row.kind,
        config=row.config,
        created_at=row.created_at,
    )


def _agent_values(agent: Agent, position: int) -> dict[str, Any]:
    return {
        "id": agent.id,
        "group_id": agent.group_id,
        "role": agent.role,
        "position": position,
        "name": agent.name,
        "kind": agent.kind,
        "config": agent.config,
        "created_at": agent.created_at,
    }


def _block(row: BlockRow) -> Block:
    return Block(
        id=row.id,
        group_id=row.group_id,
        agent_id=row.agent_id,
        label=row.label,
        value=row.value,
        limit=row.limit,
        read_only=row.read_only,
        description=row.description,
        version=row.version,
    )


def _block_values(block: Block, position: int) -> dict[str, Any]:
    return {
        "id": block.id,
        "group_id": block.group_id,
        "agent_id": block.agent_id,
        "position": position,
        "label": block.label,
        "value": block.value,
        "limit": block.limit,
        "read_only": block.read_only,
        "description": block.description,
        "version": block.version,
        "updated_at": utcnow(),
    }


def _message(row: MessageRow) -> Message:
    return Message.model_validate(
        {
            "id": row.id,
            "agent_id": row.agent_id,
            "group_id": row.group_id,
            "sequence": row.sequence,
            "role": row.role,
            "content": row.content,
            "name": row.name,
            "tool_calls": row.tool_calls,
            "tool_call_id": row.tool_call_id,
            "turn": row.turn,
            "run_id": row.run_id,
            "created_at": row.created_at,
        }
    )


def _message_values(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "agent_id": message.agent_id,
        "group_id": message.group_id,
        "sequence": message.sequence,
        "role": message.role,
        "content": [p.model_dump(mode="json", exclude_none=True) for p in message.content],
        "name": message.name,
        "tool_calls": None
        if message.tool_calls is None
        else [c.model_dump(mode="json") for c in message.tool_calls],
        "tool_call_id": message.tool_call_id,
        "turn": message.turn,
        "run_id": message.run_id,
        "created_at": message.created_at,
    }


def _run(row: RunRow) -> Run:
    return Run.model_validate(
        {
            "id": row.id,
            "group_id": row.group_id,
            "agent_id": row.agent_id,
            "status": row.status,
            "stop_reason": row.stop_reason,
            "attempt": row.attempt,
            "turn": row.turn,
            "window_first_seq": row.window_first_seq,
            "window_last_seq": row.window_last_seq,
            "created_at": row.created_at,
            "started_at": row.started_at,
            "completed_at": row.completed_at,
            "error": row.error,
            "metadata": row.run_metadata,
        }
    )


def _run_values(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "group_id": run.group_id,
        "agent_id": run.agent_id,
        "position": run.metadata.get("position", 0),
        "status": run.status.value,
        "stop_reason": None if run.stop_reason is None else run.stop_reason.value,
        "attempt": run.attempt,
        "turn": run.turn,
        "window_first_seq": run.window_first_seq,
        "window_last_seq": run.window_last_seq,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "completed_at": run.completed_at,
        "error": run.error,
        "run_metadata": run.metadata,
    }
