"""Schema migrations: fresh databases, upgrades that keep every row, refusals that explain."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData, create_engine, text
from sqlalchemy.exc import IntegrityError

from actors import ReadOnlyRuntime, Runtime, SchemaMismatch
from messages import RunStatus
from persistence import _schema as schema
from persistence._engine import parse_url
from persistence._models import Base
from tests.agents import user

HEAD = schema.head_revision()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A plain engine on the test database, for setting up old schemas by hand."""
    made = create_engine(parse_url(db_url))
    yield made
    made.dispose()


def _revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return schema.current_revision(connection)


def _fill_first_revision(engine: Engine) -> dict[str, str]:
    """Rows of one group with a finished run, written as revision 0001 stores them."""
    tables = MetaData()
    tables.reflect(engine)
    t0 = datetime(2026, 1, 1, 12, 0, 0)
    ids = {
        "group": "group-old",
        "primary": "agent-old-p",
        "sleeper": "agent-old-s",
        "run": "run-old",
    }
    rows: dict[str, list[dict[str, Any]]] = {
        "groups": [
            {
                "id": ids["group"],
                "primary_agent_id": ids["primary"],
                "frequency": 2,
                "counter": 0,
                "turns": 1,
                "cursor": "message-2",
                "cursor_seq": 2,
                "preamble": None,
                "transcript_max_messages": None,
                "run_timeout": 600.0,
                "max_attempts": 3,
                "status": "active",
                "failure_reason": None,
                "created_at": t0,
                "updated_at": t0,
            }
        ],
        "agents": [
            {
                "id": ids["primary"],
                "group_id": ids["group"],
                "role": "primary",
                "position": 0,
                "name": "p",
                "kind": "scripted",
                "config": {},
                "created_at": t0,
            },
            {
                "id": ids["sleeper"],
                "group_id": ids["group"],
                "role": "sleeptime",
                "position": 1,
                "name": "s",
                "kind": "memory",
                "config": {},
                "created_at": t0,
            },
        ],
        "blocks": [
            {
                "id": "block-h",
                "group_id": ids["group"],
                "agent_id": None,
                "position": 0,
                "label": "human",
                "value": "name: Old",
                "limit": 5000,
                "read_only": False,
                "description": None,
                "version": 2,
                "updated_at": t0,
            }
        ],
        "messages": [
            {
                "id": f"message-{n}",
                "agent_id": ids["primary"],
                "group_id": ids["group"],
                "sequence": n,
                "role": role,
                "content": [{"type": "text", "text": said}],
                "name": None,
                "tool_calls": None,
                "tool_call_id": None,
                "turn": 1,
                "run_id": None,
                "created_at": t0 + timedelta(seconds=n),
            }
            for n, role, said in ((1, "user", "my name is Old"), (2, "assistant", "Got it."))
        ],
        "runs": [
            {
                "id": ids["run"],
                "group_id": ids["group"],
                "agent_id": ids["sleeper"],
                "position": 0,
                "status": "completed",
                "stop_reason": "end_turn",
                "attempt": 1,
                "turn": 1,
                "window_first_seq": 1,
                "window_last_seq": 2,
                "created_at": t0,
                "started_at": t0,
                "completed_at": t0,
                "error": None,
                "metadata": {"position": 0},
            }
        ],
        "run_events": [
            {"run_id": ids["run"], "status": s, "at": t0, "attempt": 1, "reason": s}
            for s in ("created", "running", "completed")
        ],
    }
    with engine.begin() as connection:
        for name, values in rows.items():
            connection.execute(tables.tables[name].insert(), values)
    return ids


def test_fresh_database_is_migrated_to_the_newest_revision(db_url: str, engine: Engine) -> None:
    with Runtime.start(db_url):
        pass
    assert _revision(engine) == HEAD
    assert Runtime.migrate(db_url) == (HEAD, HEAD)


def test_upgrade_from_the_first_revision_keeps_every_row(db_url: str, engine: Engine) -> None:
    schema.upgrade_to(engine, "0001")
    ids = _fill_first_revision(engine)
    with Runtime.start(db_url) as rt:
        assert _revision(engine) == HEAD
        group = rt.get_group(ids["group"])
        assert (group.turns, group.counter, group.cursor) == (1, 0, "message-2")
        # The new column is filled in from the newest message of the primary agent.
        assert group.last_turn_at == datetime(2026, 1, 1, 12, 0, 2, tzinfo=UTC)
        assert [m.text() for m in rt.list_messages(ids["primary"])] == ["my name is Old", "Got it."]
        assert rt.get_run(ids["run"]).status is RunStatus.COMPLETED
        assert [e.status for e in rt.run_events(ids["run"])] == ["created", "running", "completed"]
        assert rt.get_blocks(ids["primary"])["human"].value == "name: Old"
        # The group goes on from where it was: turn 2 does not fire, turn 3 does.
        assert not rt.step(ids["group"], [user("my favorite color is green")]).fired
        third = rt.step(ids["group"], [user("hello again")])
        assert third.fired
        (run,) = rt.wait_for_runs(third.run_ids, timeout=30)
        assert (run.window_first_seq, run.window_last_seq) == (3, 6)
        assert "favorite color: green" in rt.get_blocks(ids["primary"])["human"].value


def test_older_database_is_refused_when_asked_not_to_upgrade(db_url: str, engine: Engine) -> None:
    schema.upgrade_to(engine, "0001")
    with pytest.raises(SchemaMismatch, match="sleeptime migrate --db URL"):
        Runtime.start(db_url, auto_upgrade=False)
    with pytest.raises(SchemaMismatch, match="revision 0001"):
        Runtime.start(db_url, read_only=True)
    assert _revision(engine) == "0001"
    assert Runtime.migrate(db_url) == ("0001", HEAD)
    with Runtime.start(db_url, auto_upgrade=False) as rt:
        assert rt.list_groups() == []


def test_database_newer_than_the_code_is_refused(db_url: str, engine: Engine) -> None:
    with Runtime.start(db_url):
        pass
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaMismatch, match="newer than this code"):
        Runtime.start(db_url)
    with pytest.raises(SchemaMismatch, match="newer than this code"):
        Runtime.migrate(db_url)


def test_database_made_before_migrations_is_adopted(db_url: str, engine: Engine) -> None:
    schema.upgrade_to(engine, "0001")
    ids = _fill_first_revision(engine)
    with engine.begin() as connection:  # what create_all left before migrations existed
        connection.execute(text("DROP TABLE alembic_version"))
    with Runtime.start(db_url) as rt:
        assert rt.get_group(ids["group"]).turns == 1
    assert _revision(engine) == HEAD


def test_read_only_runtime_needs_no_upgrade_at_head(db_url: str) -> None:
    with Runtime.start(db_url) as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    with Runtime.start(db_url, read_only=True) as viewer:
        assert viewer.get_group(group.id).id == group.id
        with pytest.raises(ReadOnlyRuntime):
            viewer.record_turn(group.id, [user("x")])


def test_the_migrations_build_the_tables_the_models_declare(db_url: str, engine: Engine) -> None:
    """Tables, columns, keys and indexes (types aside: the models' are richer)."""
    with Runtime.start(db_url):
        pass
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        assert compare_metadata(context, Base.metadata) == []


def test_turn_requests_hold_one_answer_per_group_and_request_id(
    db_url: str, engine: Engine
) -> None:
    with Runtime.start(db_url):
        pass
    row = {
        "group_id": "group-a",
        "request_id": "req-1",
        "turn": 1,
        "result": {"message_ids": [], "fired": False, "run_ids": [], "error": None},
        "created_at": datetime(2026, 1, 1, 12, 0, 0),
    }
    tables = MetaData()
    tables.reflect(engine)
    requests = tables.tables["turn_requests"]
    with engine.begin() as connection:
        connection.execute(requests.insert(), [row, {**row, "group_id": "group-b"}])
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(requests.insert(), [{**row, "turn": 2}])
