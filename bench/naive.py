"""The naive baseline: sleeptime orchestrated the way Letta does it, over plain SQLAlchemy.

Letta's `SleeptimeMultiAgentV4` (../shared/seeds/000_72e9ca06e75060f4.txt) runs each step
of a turn through a manager that opens its own session, reads, changes and commits:

- the agent step stores the turn's messages (user input and reply): one session;
- `bump_turns_counter_async`: read the group, `counter = (counter + 1) % frequency`,
  write it back: one session;
- when the turn fires, `get_last_processed_message_id_and_update_async`: read the group's
  last processed message id, write the new one: one session;
- per sleeptime agent, `create_run` (status created): one session; then, in a
  fire-and-forget background task, `update_run_by_id_async` to running and later to
  completed: one session each.

Here those are ORM sessions on an engine with SQLAlchemy's defaults for a SQLite file
(pysqlite's 5 s busy timeout; its transaction begins at the first write, so a session's read
is outside it and two turns can read the same counter, as under PostgreSQL's read committed)
plus WAL and synchronous=FULL, the runtime's durability, so the comparison is fair; the pool
is sized to the threads, as Letta sizes its pool. The background tasks run on a thread
pool. It does less than Letta (no transcript read, no sleeptime messages stored), which only
makes it faster. The read-modify-write also counts `turns` (Letta does not) so lost updates
show with frequency 1, where the counter itself is always 0.

    >>> baseline = NaiveSleeptime.open(Path("naive.db"), threads=64)
    >>> group_id = baseline.create_group(frequency=1, sleeptime_agents=1)
    >>> baseline.step(group_id)   # run ids of the turn
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from sqlalchemy import JSON, Engine, String, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class _Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class NaiveGroup(_Base):
    __tablename__ = "groups"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    manager_agent_id: Mapped[str] = mapped_column(String(64))
    agent_ids: Mapped[list[Any]]
    sleeptime_agent_frequency: Mapped[int | None]
    turns_counter: Mapped[int]
    turns: Mapped[int]
    last_processed_message_id: Mapped[str | None] = mapped_column(String(64))


class NaiveMessage(_Base):
    __tablename__ = "messages"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    group_id: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[list[Any]]
    created_at: Mapped[datetime]


class NaiveRun(_Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    run_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.close()


@dataclass(frozen=True, slots=True)
class NaiveCounts:
    """What the baseline stored, and what it lost."""

    groups: int
    messages: int
    runs: int
    completed_runs: int
    stored_turns: int
    fires: int
    repeated_cursors: int

    def lost_updates(self, turns_made: int) -> int:
        """Turns whose counter bump another turn's read-modify-write overwrote."""
        return turns_made - self.stored_turns


class NaiveSleeptime:
    """Letta-style sleeptime orchestration: one session per read-modify-write.

    `step` is safe to call from many threads, as Letta's request handlers are; nothing
    serializes two turns of one group.
    """

    def __init__(self, engine: Engine, background_workers: int) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._background = ThreadPoolExecutor(background_workers, "naive-background")
        self._lock = threading.Lock()
        self._pending: list[Future[None]] = []
        # The cursor each fire read before moving it: two fires reading the same one
        # handed the same messages over twice.
        self._claimed: list[tuple[str, str | None]] = []
        self._groups: dict[str, tuple[str, list[str], int | None]] = {}
        self.background_errors = 0

    @classmethod
    def open(cls, path: Path, threads: int, background_workers: int = 32) -> Self:
        """A new database at `path`, its tables created, for `threads` caller threads."""
        engine = create_engine(
            f"sqlite:///{path}", pool_size=threads + background_workers, max_overflow=0
        )
        event.listen(engine, "connect", _pragmas)
        _Base.metadata.create_all(engine)
        return cls(engine, background_workers)

    def close(self) -> None:
        """Wait for the background tasks, then release the connections."""
        self._background.shutdown(wait=True)
        self.engine.dispose()

    def create_group(self, frequency: int | None, sleeptime_agents: int) -> str:
        group = NaiveGroup(
            id=_id("group"),
            manager_agent_id=_id("agent"),
            agent_ids=[_id("agent") for _ in range(sleeptime_agents)],
            sleeptime_agent_frequency=frequency,
            turns_counter=-1,
            turns=0,
            last_processed_message_id=None,
        )
        with self._sessions() as session:
            session.add(group)
            session.commit()
        # Letta's agent object holds its group; reading it back per turn is not counted.
        self._groups[group.id] = (group.manager_agent_id, list(group.agent_ids), frequency)
        return group.id

    # -- one turn -------------------------------------------------------------------------

    def step(self, group_id: str, text: str = "my favorite color is coral") -> list[str]:
        """One turn: store its messages, bump the counter, and on a fire move the cursor
        and create the runs, each in its own session; the runs go on in the background."""
        primary_id, sleeptime_ids, frequency = self._groups[group_id]
        reply_id = self._store_messages(group_id, primary_id, text)
        counter = None
        if frequency is not None and frequency > 0:
            counter = self._bump_turns_counter(group_id)
        if frequency is not None and (counter is None or counter % frequency != 0):
            return []
        self._claim(group_id, reply_id)
        run_ids = []
        for agent_id in sleeptime_ids:
            run_id = self._create_run(agent_id)
            future = self._background.submit(self._participant_step, run_id)
            with self._lock:
                self._pending.append(future)
            run_ids.append(run_id)
        return run_ids

    def _store_messages(self, group_id: str, agent_id: str, text: str) -> str:
        now = _now()
        reply = NaiveMessage(
            id=_id("message"),
            agent_id=agent_id,
            group_id=group_id,
            role="assistant",
            content=[{"type": "text", "text": "ok"}],
            created_at=now,
        )
        with self._sessions() as session:
            session.add(
                NaiveMessage(
                    id=_id("message"),
                    agent_id=agent_id,
                    group_id=group_id,
                    role="user",
                    content=[{"type": "text", "text": text}],
                    created_at=now,
                )
            )
            session.add(reply)
            session.commit()
        return reply.id

    def _bump_turns_counter(self, group_id: str) -> int:
        with self._sessions() as session:
            group = session.get_one(NaiveGroup, group_id)
            frequency = group.sleeptime_agent_frequency or 1
            group.turns_counter = (group.turns_counter + 1) % frequency
            group.turns += 1
            session.commit()
            return group.turns_counter

    def _claim(self, group_id: str, last_processed_message_id: str) -> str | None:
        with self._sessions() as session:
            group = session.get_one(NaiveGroup, group_id)
            previous = group.last_processed_message_id
            group.last_processed_message_id = last_processed_message_id
            session.commit()
        with self._lock:
            self._claimed.append((group_id, previous))
        return previous

    def _create_run(self, agent_id: str) -> str:
        run = NaiveRun(
            id=_id("run"),
            agent_id=agent_id,
            status="created",
            created_at=_now(),
            completed_at=None,
            run_metadata={"run_type": "sleeptime_agent_send_message_async", "agent_id": agent_id},
        )
        with self._sessions() as session:
            session.add(run)
            session.commit()
        return run.id

    def _participant_step(self, run_id: str) -> None:
        try:
            self._update_run(run_id, status="running")
            # The zero-latency sleeptime agent steps here.
            self._update_run(run_id, status="completed", completed_at=_now())
        except Exception:
            with self._lock:
                self.background_errors += 1
            raise

    def _update_run(self, run_id: str, **changes: Any) -> None:
        with self._sessions() as session:
            run = session.get_one(NaiveRun, run_id)
            for name, value in changes.items():
                setattr(run, name, value)
            session.commit()

    # -- after the load -------------------------------------------------------------------

    def wait_for_runs(self, timeout: float | None = None) -> int:
        """Wait for every background task so far; return how many are still running."""
        with self._lock:
            pending, self._pending = self._pending, []
        _, not_done = wait(pending, timeout=timeout)
        return len(not_done)

    def counts(self) -> NaiveCounts:
        with self._sessions() as session:
            count = session.scalar
            groups = count(select(func.count()).select_from(NaiveGroup)) or 0
            messages = count(select(func.count()).select_from(NaiveMessage)) or 0
            runs = count(select(func.count()).select_from(NaiveRun)) or 0
            completed = (
                count(
                    select(func.count()).where(NaiveRun.status == "completed").select_from(NaiveRun)
                )
                or 0
            )
            stored_turns = count(select(func.sum(NaiveGroup.turns))) or 0
        with self._lock:
            claimed = list(self._claimed)
        return NaiveCounts(
            groups=groups,
            messages=messages,
            runs=runs,
            completed_runs=completed,
            stored_turns=stored_turns,
            fires=len(claimed),
            repeated_cursors=len(claimed) - len(set(claimed)),
        )
