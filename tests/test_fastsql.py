"""The writer's fast executemany does what `Connection.execute` does, on SQLite and PostgreSQL.

Each test runs the same statements and rows both ways, each in a transaction rolled back
after, and compares what reached the database (every column, as stored), the SQL sent, the
rowcounts and the errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, Insert, Table, Update, create_engine, event, text
from sqlalchemy.exc import DBAPIError

from messages import (
    Run,
    RunStatus,
    StopReason,
)
from persistence._committer import lost_connection
from persistence._engine import make_engines
from persistence._fastsql import FastExecutor
from persistence._models import Base
from persistence._store import (
    _END_RUN,
    _INSERT_EVENTS,
    _INSERT_MESSAGES,
    _INSERT_RUNS,
    _MOVE_GROUP,
    _REQUEUE_RUN,
    _START_RUN,
    _message_values,
    _run_values,
)
from persistence._tables import groups, messages, run_events, runs
from tests.stored_rows import AT, ELSEWHERE, MESSAGES, UNICODE

Rows = list[dict[str, Any]]
Statement = Insert | Update
Execute = Callable[[Connection, Statement, Rows], int]
WAYS = ("execute", "fast")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """The store's tables, with two groups and three runs (created, running, running)."""
    writer, reader = make_engines(db_url)
    reader.dispose()
    Base.metadata.create_all(writer)
    with writer.begin() as connection:
        connection.execute(groups.insert(), [group_row("g1"), group_row("g2")])
        connection.execute(
            _INSERT_RUNS,
            [
                _run_values(run("r-created", RunStatus.CREATED)),
                _run_values(run("r-running", RunStatus.RUNNING)),
                _run_values(run("r-requeued", RunStatus.RUNNING)),
            ],
        )
    try:
        yield writer
    finally:
        Base.metadata.drop_all(writer)
        writer.dispose()


def group_row(group_id: str) -> dict[str, Any]:
    return {
        "id": group_id,
        "primary_agent_id": f"agent-{group_id}",
        "frequency": 1,
        "counter": 0,
        "turns": 0,
        "cursor": None,
        "cursor_seq": 0,
        "preamble": None,
        "transcript_max_messages": None,
        "run_timeout": 60.0,
        "max_attempts": 3,
        "status": "active",
        "failure_reason": None,
        "created_at": AT,
        "updated_at": AT,
        "last_turn_at": None,
    }


def run(run_id: str, status: RunStatus = RunStatus.CREATED, **fields: Any) -> Run:
    values: dict[str, Any] = {
        "id": run_id,
        "group_id": "g1",
        "agent_id": "agent-s",
        "status": status,
        "turn": 1,
        "window_first_seq": 1,
        "window_last_seq": 2,
        "created_at": AT,
    }
    return Run(**{**values, **fields})


RUNS = [
    run("r-new-1"),
    run("r-new-2", metadata={"position": 1, "nested": {"a": [1, 2.5, None, True]}, "ü": "ç"}),
    run(
        "r-new-3",
        RunStatus.COMPLETED,
        stop_reason=StopReason.ERROR,
        attempt=2,
        started_at=AT + timedelta(seconds=1),
        completed_at=(AT + timedelta(seconds=2)).astimezone(ELSEWHERE),
        error=UNICODE,
        metadata={"position": 2},
    ),
]
EVENTS = [
    {"run_id": "r-new-1", "status": "created", "at": AT, "attempt": 1, "reason": "created"},
    {"run_id": "r-new-2", "status": "created", "at": AT, "attempt": 1, "reason": None},
    {"run_id": "r-new-3", "status": "failed", "at": AT, "attempt": 2, "reason": UNICODE},
]


def move(group_id: str, expected: int) -> dict[str, Any]:
    return {
        "group_id": group_id,
        "expected_turns": expected,
        "turns": expected + 1,
        "counter": 1,
        "cursor": "m-002",
        "cursor_seq": 2,
        "at": AT.astimezone(ELSEWHERE),
    }


def transition(run_id: str, status: RunStatus, **fields: Any) -> dict[str, Any]:
    values = {"run_id": run_id, "status": status.value, "attempt": 1, "at": AT}
    values["expected_attempt"] = fields.pop("expected_attempt", values["attempt"])
    return {**values, "stop_reason": None, "error": None, **fields}


# A turn's writes, merged as the committer merges them: guards (some refused), then inserts.
BATCH: list[tuple[Statement, Rows]] = [
    (_MOVE_GROUP, [move("g1", 0), move("g2", 7)]),  # g2 is not at turn 7
    (
        _START_RUN,
        [transition("r-created", RunStatus.RUNNING), transition("r-running", RunStatus.RUNNING)],
    ),
    (
        _END_RUN,
        [
            transition("r-running", RunStatus.COMPLETED, stop_reason="end_turn"),
            transition("r-missing", RunStatus.FAILED, error="gone"),
        ],
    ),
    (
        _REQUEUE_RUN,
        [{"run_id": "r-requeued", "status": "created", "attempt": 2, "expected_attempt": 1}],
    ),
    (_INSERT_MESSAGES, [_message_values(m) for m in MESSAGES]),
    (_INSERT_RUNS, [_run_values(r) for r in RUNS]),
    (_INSERT_EVENTS, EVENTS),
    (_INSERT_EVENTS, EVENTS[:1]),  # one row: an execute, not an executemany
]


def way(name: str, engine: Engine) -> Execute:
    if name == "execute":
        return lambda connection, statement, rows: connection.execute(statement, rows).rowcount
    return FastExecutor(engine.dialect).execute


def stored(connection: Connection, table: Table) -> list[tuple[Any, ...]]:
    """Every row of `table` as the database holds it (values and, on SQLite, storage
    classes), in insertion order; without run_events.id, which PostgreSQL's sequence
    does not give back on rollback."""
    columns = [c.name for c in table.c if not (table is run_events and c.name == "id")]
    if connection.dialect.name == "sqlite":
        shown = [f'"{c}", typeof("{c}")' for c in columns]
        order = "rowid"
    else:
        shown = [f'CAST("{c}" AS TEXT)' for c in columns]
        order = "id" if table is run_events else "ctid"
    query = f'SELECT {", ".join(shown)} FROM "{table.name}" ORDER BY {order}'
    return [tuple(row) for row in connection.exec_driver_sql(query)]


class Outcome:
    """What running a batch one way did, inside a transaction that is then rolled back."""

    def __init__(self, engine: Engine, how: str, batch: Sequence[tuple[Statement, Rows]]) -> None:
        execute = way(how, engine)
        self.sent: list[str] = []
        self.executed = 0  # statements that went through Connection.execute
        self.rowcounts: list[int] = []
        self.error: BaseException | None = None
        with engine.connect() as connection:
            event.listen(connection, "before_cursor_execute", self._sent)
            event.listen(connection, "before_execute", self._executed)
            with connection.begin() as transaction:
                try:
                    for statement, rows in batch:
                        self.rowcounts.append(execute(connection, statement, rows))
                except Exception as error:
                    self.error = error
                    transaction.rollback()
                    self.tables = {}
                    return
                self.tables = {
                    t.name: stored(connection, t) for t in (groups, messages, runs, run_events)
                }
                transaction.rollback()

    def _sent(self, _c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.startswith(("SELECT", "BEGIN")):
            self.sent.append(statement)

    def _executed(self, *_: Any) -> None:
        self.executed += 1

    def failure(self) -> tuple[Any, ...] | None:
        """The error as the committer and the store look at it."""
        error = self.error
        if error is None:
            return None
        orig = getattr(error, "orig", None)
        return (
            type(error),
            type(orig),
            str(orig if orig is not None else error).strip(),
            isinstance(error, DBAPIError) and error.connection_invalidated,
            lost_connection(error) if isinstance(error, Exception) else None,
        )


def both(engine: Engine, batch: Sequence[tuple[Statement, Rows]]) -> tuple[Outcome, Outcome]:
    return Outcome(engine, "execute", batch), Outcome(engine, "fast", batch)


def test_the_fast_path_stores_what_execute_stores_with_the_same_sql_and_rowcounts(
    engine: Engine, backend: str
) -> None:
    slow, fast = both(engine, BATCH)
    assert slow.error is None and fast.error is None
    assert fast.tables == slow.tables
    assert fast.sent == slow.sent
    assert fast.rowcounts[:4] == slow.rowcounts[:4] == [1, 1, 1, 1]  # an executemany's total
    assert len(fast.tables["messages"]) == len(MESSAGES)
    # Every statement took the fast path, but on PostgreSQL the one-row INSERT of an event,
    # which execute() sends with RETURNING of its generated id.
    assert fast.executed == (1 if backend == "postgresql" else 0)


def test_a_value_a_bind_processor_refuses_raises_what_execute_raises(engine: Engine) -> None:
    naive = [
        _message_values(MESSAGES[0]),
        {**_message_values(MESSAGES[1]), "created_at": AT.replace(tzinfo=None)},
    ]
    unserializable = [{**_run_values(RUNS[0]), "metadata": {"a": {1, 2}}}]
    for batch in ([(_INSERT_MESSAGES, naive)], [(_INSERT_RUNS, unserializable)]):
        slow, fast = both(engine, batch)
        # A StatementError; or on PostgreSQL the driver's TypeError for the set, which
        # psycopg meets only when it sends the value.
        assert fast.error is not None
        assert fast.failure() == slow.failure()
        assert str(fast.error) == str(slow.error)


def test_a_statement_the_database_refuses_raises_what_execute_raises(engine: Engine) -> None:
    duplicate = [(_INSERT_RUNS, [_run_values(RUNS[0]), _run_values(run("r-created"))])]
    slow, fast = both(engine, duplicate)
    assert isinstance(fast.error, DBAPIError) and not fast.error.connection_invalidated
    assert fast.failure() == slow.failure()
    assert fast.error.statement == slow.error.statement  # type: ignore[union-attr]


def test_rows_with_other_keys_than_the_first_are_treated_as_execute_treats_them(
    engine: Engine,
) -> None:
    first = _message_values(MESSAGES[0])
    second = _message_values(MESSAGES[1])
    missing = {k: v for k, v in second.items() if k != "turn"}  # execute() refuses it
    extra = {**second, "not_a_column": 1}  # execute() ignores it
    # A key that names a bind the statement fixes: execute() takes the row's value.
    fixed = {**transition("r-running", RunStatus.RUNNING), "status_1": "running"}
    for batch in (
        [(_INSERT_MESSAGES, [first, missing])],
        [(_INSERT_MESSAGES, [first, extra])],
        [(_START_RUN, [transition("r-created", RunStatus.RUNNING), fixed])],
    ):
        slow, fast = both(engine, batch)
        assert fast.failure() == slow.failure()
        assert fast.rowcounts == slow.rowcounts
        assert fast.tables == slow.tables


def test_a_lost_connection_is_reported_and_invalidated_as_execute_does(
    engine: Engine, backend: str
) -> None:
    for how in WAYS:
        execute = way(how, engine)
        with engine.connect() as connection:
            connection.begin()
            if backend == "sqlite":
                connection.connection.dbapi_connection.close()  # type: ignore[union-attr]
            else:
                pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                killer = create_engine(engine.url)  # the writer's pool has one connection
                with killer.connect() as other:
                    other.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
                killer.dispose()
            with pytest.raises(DBAPIError) as raised:
                execute(connection, _START_RUN, [transition("r-created", RunStatus.RUNNING)])
            assert raised.value.connection_invalidated, how
            assert lost_connection(raised.value), how
            assert connection.invalidated, how
