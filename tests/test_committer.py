"""The group committer: merged writes behave exactly like the same writes one by one."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError

from actors import Runtime
from messages import RunStatus, StoreRejected
from persistence import Store, Transition, utcnow
from persistence._committer import Committer, Planned, Txn, Write
from persistence._engine import make_engines
from tests.agents import Echo, user

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", String, primary_key=True),
    Column("status", String, nullable=False),
)
log = Table(
    "log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("item_id", String, ForeignKey("items.id"), nullable=False),
    Column("status", String, nullable=False),
)
notes = Table(
    "notes",
    metadata,
    Column("owner", String, primary_key=True),
    Column("sequence", Integer, primary_key=True),
    Column("text", String, nullable=False),
)
INSERT_ITEMS, INSERT_LOG, INSERT_NOTES = insert(items), insert(log), insert(notes)
MOVE = (
    update(items)
    .where(items.c.id == bindparam("item"), items.c.status == bindparam("old"))
    .values(status=bindparam("new"))
)
LAST = (
    select(notes.c.owner, func.max(notes.c.sequence))
    .where(notes.c.owner.in_(bindparam("owners", expanding=True)))
    .group_by(notes.c.owner)
)


class Refused(Exception):
    pass


def number(connection: Connection, rows: list[dict[str, Any]], _txn: Txn) -> list[dict[str, Any]]:
    owners = list(dict.fromkeys(r["owner"] for r in rows))
    following = dict.fromkeys(owners, 1)
    following.update((o, last + 1) for o, last in connection.execute(LAST, {"owners": owners}))
    numbered = []
    for row in rows:
        numbered.append({**row, "sequence": following[row["owner"]]})
        following[row["owner"]] += 1
    return numbered


def move(item: str, old: str, new: str) -> Write:
    """Move `item` from `old` to `new` and log it; refused if it is not at `old`."""
    return Write(
        guard=(MOVE, {"item": item, "old": old, "new": new}),
        refusal=lambda: Refused(f"{item} is not {old}"),
        inserts=[(INSERT_LOG, [{"item_id": item, "status": new}])],
        keys=[item],
    )


@pytest.fixture
def engines(db_url: str) -> Iterator[tuple[Engine, Engine]]:
    writer, reader = make_engines(db_url)
    metadata.create_all(writer)
    try:
        yield writer, reader
    finally:
        reader.dispose()
        metadata.drop_all(writer)  # the committer, closed by now, gave its connection back
        writer.dispose()


@pytest.fixture
def engine(engines: tuple[Engine, Engine]) -> Engine:
    """The tests' own reads (the writer's one connection belongs to the committer)."""
    return engines[1]


@pytest.fixture
def committer(engines: tuple[Engine, Engine]) -> Iterator[Committer]:
    committer = Committer(
        engines[0],
        translate=lambda error: StoreRejected("test", str(error)),
        insert_order=(INSERT_ITEMS, INSERT_LOG, INSERT_NOTES),
        append=(INSERT_NOTES, number),
    )
    try:
        yield committer
    finally:
        committer.close()


def in_one_batch(
    committer: Committer, writes: list[Any], submit: Callable[[Any], Future[Any]] | None = None
) -> list[Future[Any]]:
    """Submit `writes` while the writer is held, so they are committed as one batch."""
    held, release = threading.Event(), threading.Event()

    def hold(connection: Connection) -> None:
        held.set()
        assert release.wait(30)

    first = committer.submit(hold)
    assert held.wait(30)
    futures: list[Future[Any]] = [(submit or committer.submit)(w) for w in writes]
    release.set()
    first.result(timeout=30)
    for future in futures:
        future.exception(timeout=30)
    return futures


def statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return {r.id: r.status for r in connection.execute(select(items))}


def logged(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as connection:
        return [(r.item_id, r.status) for r in connection.execute(select(log).order_by(log.c.id))]


def seed(committer: Committer, count: int) -> list[str]:
    ids = [f"item-{i}" for i in range(count)]
    committer.submit(
        Write(inserts=[(INSERT_ITEMS, [{"id": i, "status": "created"} for i in ids])])
    ).result(timeout=30)
    return ids


def test_a_batch_of_writes_to_different_rows_is_a_few_statements(
    committer: Committer, engine: Engine
) -> None:
    ids = seed(committer, 50)
    before = (committer.transactions, committer.statements)
    futures = in_one_batch(committer, [move(i, "created", "running") for i in ids])
    assert all(f.result() is None for f in futures)
    assert committer.transactions - before[0] == 2  # the held op, then all fifty
    assert committer.statements - before[1] == 2  # one UPDATE, one INSERT, for fifty writes
    assert set(statuses(engine).values()) == {"running"}
    assert len(logged(engine)) == 50


def test_merged_statements_bypass_connection_execute(
    committer: Committer, engines: tuple[Engine, Engine], engine: Engine
) -> None:
    """They go through the committer's FastExecutor (tests/test_fastsql.py: the same SQL,
    rows, rowcounts and errors as Connection.execute)."""
    ids = seed(committer, 5)
    executed: list[object] = []
    event.listen(engines[0], "before_execute", lambda _c, statement, *_: executed.append(statement))
    futures = in_one_batch(committer, [move(i, "created", "running") for i in ids])
    assert all(f.result() is None for f in futures)
    assert executed == []
    assert set(statuses(engine).values()) == {"running"}
    assert len(logged(engine)) == 5


def test_a_refused_write_fails_alone_and_the_rest_of_its_batch_commits(
    committer: Committer, engine: Engine
) -> None:
    ids = seed(committer, 5)
    writes = [move(i, "created", "running") for i in ids]
    writes[2] = move(ids[2], "running", "completed")  # item 2 is not running: refused
    futures = in_one_batch(committer, writes)
    assert isinstance(futures[2].exception(), Refused)
    assert all(f.result() is None for i, f in enumerate(futures) if i != 2)
    assert statuses(engine) == {i: "created" if i == ids[2] else "running" for i in ids}
    assert ids[2] not in [item for item, _ in logged(engine)]  # nothing of it was written


def test_writes_to_one_row_keep_their_order_within_a_batch(
    committer: Committer, engine: Engine
) -> None:
    (a, b) = seed(committer, 2)
    # a: created -> running -> completed, in order; b: the end comes first, so it is refused.
    futures = in_one_batch(
        committer,
        [
            move(a, "created", "running"),
            move(b, "running", "completed"),
            move(a, "running", "completed"),
            move(b, "created", "running"),
        ],
    )
    assert [f.exception() is None for f in futures] == [True, False, True, True]
    assert statuses(engine) == {a: "completed", b: "running"}
    assert [s for item, s in logged(engine) if item == a] == ["running", "completed"]


def test_inserts_follow_the_foreign_keys_whatever_the_order_of_the_writes(
    committer: Committer, engine: Engine
) -> None:
    futures = in_one_batch(
        committer,
        [
            Write(inserts=[(INSERT_LOG, [{"item_id": "x", "status": "created"}])], keys=["lx"]),
            Write(inserts=[(INSERT_ITEMS, [{"id": "x", "status": "created"}])], keys=["x"]),
        ],
    )
    assert all(f.result() is None for f in futures)
    assert logged(engine) == [("x", "created")]


def test_a_failing_statement_fails_only_its_write(committer: Committer, engine: Engine) -> None:
    (a,) = seed(committer, 1)
    futures = in_one_batch(
        committer,
        [
            move(a, "created", "running"),
            Write(inserts=[(INSERT_ITEMS, [{"id": a, "status": "created"}])], keys=["dup"]),
            Write(inserts=[(INSERT_ITEMS, [{"id": "fresh", "status": "created"}])], keys=["f"]),
        ],
    )
    assert futures[0].result() is None and futures[2].result() is None
    assert isinstance(futures[1].exception(), StoreRejected)
    assert statuses(engine) == {a: "running", "fresh": "created"}


def test_appended_rows_are_numbered_after_each_owner_across_a_batch(
    committer: Committer, engine: Engine
) -> None:
    committer.submit(Write(appends=[{"owner": "o1", "text": "stored before"}])).result(timeout=30)
    writes = [
        Write(appends=[{"owner": "o1", "text": "a"}, {"owner": "o2", "text": "b"}]),
        Write(appends=[{"owner": "o1", "text": "c"}]),
    ]
    assert all(f.result() is None for f in in_one_batch(committer, writes))
    with engine.connect() as connection:
        rows = connection.execute(select(notes).order_by(notes.c.owner, notes.c.sequence))
        assert [(r.owner, r.sequence, r.text) for r in rows] == [
            ("o1", 1, "stored before"),
            ("o1", 2, "a"),
            ("o1", 3, "c"),
            ("o2", 1, "b"),
        ]


STATUSES = ["created", "running", "completed"]
moves = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(STATUSES), st.sampled_from(STATUSES)),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=moves)
def test_a_merged_batch_has_the_outcome_of_its_writes_one_by_one(
    committer: Committer, engine: Engine, batch: list[tuple[int, str, str]]
) -> None:
    with engine.begin() as connection:
        connection.execute(log.delete())
        connection.execute(items.delete())
    ids = seed(committer, 3)
    model = dict.fromkeys(ids, "created")
    expected_ok, expected_log = [], []
    for index, old, new in batch:
        ok = model[ids[index]] == old
        expected_ok.append(ok)
        if ok:
            model[ids[index]] = new
            expected_log.append((ids[index], new))
    futures = in_one_batch(committer, [move(ids[i], old, new) for i, old, new in batch])
    assert [f.exception() is None for f in futures] == expected_ok
    assert statuses(engine) == model
    per_item = {i: [s for item, s in logged(engine) if item == i] for i in ids}
    assert per_item == {i: [s for item, s in expected_log if item == i] for i in ids}


def test_the_store_merges_turns_and_run_changes_of_many_groups(db_url: str) -> None:
    """Every guarded statement of the store can go in one executemany (none is expanding)."""
    with Runtime.start(db_url) as rt:
        rt.agents.register("echo", Echo)
        rt.agents.register("later", Echo)
        group_ids = [
            rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "later"}]).id
            for _ in range(6)
        ]
    rt = Runtime.start(db_url)  # without "later": the runs stay created
    try:
        rt.agents.register("echo", Echo)
        run_ids = [r for g in group_ids for r in rt.step(g, [user("hi")]).run_ids]
    finally:
        rt.stop(drain_timeout=0)  # their kind is missing: they would never finish
    store = Store(db_url)
    store.take_shards()  # on PostgreSQL, as a runtime would
    try:
        now = utcnow()

        def change(run_id: str, old: RunStatus, new: RunStatus, attempt: int = 1) -> Transition:
            expected = attempt - 1 if new is RunStatus.CREATED else attempt
            return Transition(
                run_id=run_id, old=old, new=new, at=now, attempt=attempt, expected_attempt=expected
            )

        created, running = RunStatus.CREATED, RunStatus.RUNNING
        for steps in (
            [change(r, created, running) for r in run_ids],
            [change(r, running, created, 2) for r in run_ids],
            [change(r, created, running, 2) for r in run_ids],
            [change(r, running, RunStatus.COMPLETED, 2) for r in run_ids],
        ):
            before = (store.committer.transactions, store.committer.statements)
            futures = in_one_batch(store.committer, steps, store.apply_transition)
            stamped = [f.result() for f in futures]  # the times the writer gave them
            assert all(at is not None and at >= now for at in stamped)
            assert store.committer.transactions - before[0] == 2
            assert store.committer.statements - before[1] == 2  # UPDATE + INSERT of events
        assert {r.status for r in store.get_runs(run_ids).values()} == {RunStatus.COMPLETED}
    finally:
        store.close()


def test_an_op_that_names_its_rows_does_not_split_the_merged_writes(
    committer: Committer, engine: Engine
) -> None:
    a, b = seed(committer, 2)

    def note(connection: Connection) -> str:
        connection.execute(INSERT_NOTES, {"owner": "op", "sequence": 1, "text": "by an op"})
        return "noted"

    before = (committer.transactions, committer.statements)
    futures = in_one_batch(
        committer,
        [move(a, "created", "running"), (note, ["op"]), move(b, "created", "running")],
        submit=lambda work: (
            committer.submit(*work) if isinstance(work, tuple) else committer.submit(work)
        ),
    )
    assert [f.result() for f in futures] == [None, "noted", None]
    assert committer.transactions - before[0] == 2
    assert committer.statements - before[1] == 2  # both moves still in one UPDATE + INSERT
    assert statuses(engine) == {a: "running", b: "running"}


def item_status(connection: Connection, item: str) -> str:
    return str(connection.execute(select(items.c.status).where(items.c.id == item)).scalar_one())


def append_mark(item: str, remembered: dict[str, str], committed: list[str]) -> Planned[str]:
    """Add "+" to the item's status: planned against what the transaction saw last, else
    what `remembered` says when merged (maybe wrong), else the database."""

    def plan(connection: Connection, txn: Txn) -> tuple[Write | None, str]:
        current = txn.scratch.get(item)
        if current is None:
            current = remembered.get(item) if not txn.exact else None
        if current is None:
            current = item_status(connection, item)
        new = current + "+"
        txn.scratch[item] = new
        txn.on_commit(lambda: committed.append(new))
        guard = (MOVE, {"item": item, "old": current, "new": new})
        write = Write(guard=guard, refusal=lambda: Refused(f"{item} moved"), keys=[item])
        return write, new

    return Planned(plan, keys=[item])


def test_planned_writes_merge_and_see_what_their_transaction_did_before(
    committer: Committer, engine: Engine
) -> None:
    a, b = seed(committer, 2)
    committed: list[str] = []
    before = committer.transactions
    futures = in_one_batch(
        committer,
        [
            append_mark(a, {}, committed),
            append_mark(b, {}, committed),
            append_mark(a, {}, committed),
        ],
    )
    assert [f.result() for f in futures] == ["created+", "created+", "created++"]
    assert committer.transactions - before == 2  # the held op, then the three plans
    assert statuses(engine) == {a: "created++", b: "created+"}
    assert sorted(committed) == ["created+", "created+", "created++"]  # once each, after commit


def test_a_plan_from_a_wrong_memory_is_run_again_exactly(
    committer: Committer, engine: Engine
) -> None:
    (a,) = seed(committer, 1)
    committed: list[str] = []
    stale = {a: "running"}  # what the plan remembers is not what is stored
    futures = in_one_batch(committer, [append_mark(a, stale, committed), move(a, "created+", "x")])
    assert [f.exception() for f in futures] == [None, None]
    assert futures[0].result() == "created+"  # planned again from the database
    assert statuses(engine) == {a: "x"}
    assert committed == ["created+"]  # the refused merged attempt left no trace


def test_a_writer_whose_connection_was_killed_reconnects_without_failing_a_write(
    committer: Committer, engine: Engine, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip("killing a server backend is a PostgreSQL matter")
    (a,) = seed(committer, 1)

    def backend_pid(connection: Connection) -> int:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())

    before = committer.submit(backend_pid).result(timeout=30)
    with engine.connect() as connection:  # wait (up to 5 s) until that backend is gone
        killed = connection.execute(
            text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": before}
        ).scalar_one()
    assert killed is True
    committer.submit(move(a, "created", "running")).result(timeout=30)
    assert statuses(engine) == {a: "running"}
    assert committer.submit(backend_pid).result(timeout=30) != before  # a new connection


# A step of a mixed batch: ("move", item, old, new), or ("mark", item, remembered wrongly).
mixed = st.lists(
    st.one_of(
        st.tuples(
            st.just("move"),
            st.integers(0, 2),
            st.sampled_from(STATUSES),
            st.sampled_from(STATUSES),
        ),
        st.tuples(st.just("mark"), st.integers(0, 2), st.booleans(), st.just("")),
    ),
    min_size=1,
    max_size=20,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=mixed)
def test_planned_and_guarded_writes_merged_have_the_outcome_of_running_them_one_by_one(
    committer: Committer, engine: Engine, batch: list[tuple[str, int, Any, str]]
) -> None:
    """Plans (some from a wrong memory) between guarded moves (some refused): the batch ends
    as if each had run alone, in order, and each plan's callback ran once, after commit."""
    with engine.begin() as connection:
        connection.execute(log.delete())
        connection.execute(items.delete())
    ids = seed(committer, 3)
    model = dict.fromkeys(ids, "created")
    expected: list[str | bool | None] = []
    works: list[Any] = []
    committed: list[str] = []
    for kind, index, arg, new in batch:
        item = ids[index]
        if kind == "move":
            ok = model[item] == arg
            if ok:
                model[item] = new
            expected.append(ok)
            works.append(move(item, arg, new))
        else:
            model[item] += "+"
            expected.append(model[item])
            remembered = {item: "running"} if arg else {}  # True: a wrong memory
            works.append(append_mark(item, remembered, committed))
    futures = in_one_batch(committer, works)
    outcomes = [
        f.exception() is None if kind == "move" else f.result()
        for f, (kind, *_) in zip(futures, batch, strict=True)
    ]
    assert outcomes == expected
    assert statuses(engine) == model
    marks = [value for value in expected if isinstance(value, str)]
    assert sorted(committed) == sorted(marks)


def test_when_the_database_is_out_of_reach_a_batch_fails_after_one_try_alone(
    tmp_path: Path,
) -> None:
    """Every write fails with the same error, and the batch does not try to connect
    once per write (each try could cost a connect timeout)."""
    path = tmp_path / "x.db"
    down = threading.Event()
    tries_while_down: list[None] = []

    def connect() -> sqlite3.Connection:
        if down.is_set():
            tries_while_down.append(None)
            raise sqlite3.OperationalError("unable to open database file")
        return sqlite3.connect(path, check_same_thread=False)

    engine = create_engine("sqlite://", creator=connect)
    committer = Committer(engine, translate=lambda error: StoreRejected("test", str(error)))
    held, release = threading.Event(), threading.Event()

    def hold_then_go_away(connection: Connection) -> None:
        connection.connection.dbapi_connection.close()  # type: ignore[union-attr]
        down.set()  # the server is gone: its connection too
        held.set()
        assert release.wait(30)

    try:
        first = committer.submit(hold_then_go_away)
        assert held.wait(30)
        futures: list[Future[None]] = [
            committer.submit(move(f"item-{i}", "created", "running")) for i in range(5)
        ]
        release.set()
        assert first.exception(timeout=30) is not None
        errors = [f.exception(timeout=30) for f in futures]
    finally:
        committer.close()
        engine.dispose()
    assert all(isinstance(e, StoreRejected) and "unable to open" in str(e) for e in errors)
    assert len(tries_while_down) == 2  # the batch, then its first write alone; not one each


def test_a_batch_whose_commit_lost_its_answer_fails_as_an_outage_and_is_not_run_again(
    tmp_path: Path,
) -> None:
    """The connection is lost as the COMMIT goes: the batch may have landed, so its writes
    fail as the outage it is (their callers read back what the store holds), and are not
    run again one by one; run again, each would be refused by its own guard as if some
    other write had moved its row ("turn not recorded... retry", of a turn recorded)."""
    writer, reader = make_engines(f"sqlite:///{tmp_path / 'x.db'}")
    metadata.create_all(writer)
    committer = Committer(writer, translate=lambda error: StoreRejected("test", str(error)))
    commits = {"seen": 0, "lose": -1}

    def commit_then_lose_the_answer(connection: Connection) -> None:
        commits["seen"] += 1
        if commits["seen"] == commits["lose"]:
            connection.connection.dbapi_connection.commit()  # type: ignore[union-attr]
            error = sqlite3.OperationalError("server closed the connection unexpectedly")
            raise OperationalError("COMMIT", {}, error)

    event.listen(writer, "commit", commit_then_lose_the_answer)
    try:
        ids = seed(committer, 3)
        held, release = threading.Event(), threading.Event()

        def hold(connection: Connection) -> None:
            commits["lose"] = commits["seen"] + 2  # this batch's commit, then the next one
            held.set()
            assert release.wait(30)

        first = committer.submit(hold)
        assert held.wait(30)
        futures: list[Future[Any]] = [committer.submit(move(i, "created", "running")) for i in ids]
        release.set()
        first.result(timeout=30)
        errors = [f.exception(timeout=30) for f in futures]
        assert all(
            isinstance(e, StoreRejected) and "closed the connection" in str(e) for e in errors
        )
        assert statuses(reader) == dict.fromkeys(ids, "running")  # it landed, once
        assert logged(reader) == [(i, "running") for i in ids]
        committer.submit(move(ids[0], "running", "completed")).result(timeout=30)  # goes on
    finally:
        committer.close()
        reader.dispose()
        writer.dispose()
