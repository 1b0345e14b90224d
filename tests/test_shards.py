"""Several runtime processes on one PostgreSQL database (SPEC 15), as real processes.

Each test runs runtimes in child processes (and one in the test's own process) with short
leases, and attacks them: a clean stop, kill -9, SIGSTOP past the lease, a server restart.
The shards each process holds stay disjoint, nothing a paused process does after losing
its shards reaches the database, and the invariants hold over what is stored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

import run
from actors import Chaos, NotOwner, Runtime, ShardLost
from messages import Group, RunStatus
from tests.agents import Echo, Recorder, user, wait_until
from tests.postgres import PostgresCluster

ROOT = Path(__file__).resolve().parent.parent
LEASE_S = 1.0
SHARDS = 64
SLOW = {"kind": "simulated", "config": {"latency_ms": 400, "seed": 1}}
MEMORY = {"kind": "memory"}

CHILD = """
import concurrent.futures, json, sys, threading
from actors import Runtime
from tests.agents import Recorder, user
rt = Runtime.start(sys.argv[1], lease_s=float(sys.argv[2]), shards=int(sys.argv[3]))
background = concurrent.futures.ThreadPoolExecutor(4)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    try:
        if line.startswith("!"):
            exec(line[1:])
            answer = {"ok": None}
        else:
            answer = {"ok": eval(line)}
    except Exception as error:
        answer = {"error": type(error).__name__, "detail": str(error)}
    print(json.dumps(answer, default=str), flush=True)
rt.stop(drain_timeout=5)
"""


class Member:
    """A runtime in a child process, driven line by line: an expression is evaluated
    and its value returned; a line starting with `!` is executed."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(LEASE_S), str(SHARDS)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "SLEEPTIME_LOG_LEVEL": "critical"},
        )
        assert json.loads(self.readline()) == {"ready": True}

    @property
    def pid(self) -> int:
        return self.process.pid

    def readline(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the member exited with {self.process.poll()}"
        return line

    def send(self, line: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self.readline())
        return answer

    def ask(self, expression: str) -> Any:
        answer = self.send(expression)
        assert "ok" in answer, answer
        return answer["ok"]

    def held(self) -> set[int]:
        return set(self.ask("[int(s) for s in rt._store.book.held()]"))

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            assert self.process.wait(60) == 0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.process.send_signal(sig)
        if sig == signal.SIGKILL:
            self.process.wait(10)


@pytest.fixture
def pg_url(postgres_cluster: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = postgres_cluster.create_database(request.node.name)
    try:
        yield postgres_cluster.url(name)
    finally:
        postgres_cluster.drop_database(name)


@pytest.fixture
def members() -> Iterator[list[Member]]:
    started: list[Member] = []
    yield started
    for member in started:
        if member.process.poll() is None:
            member.kill(signal.SIGCONT)
            member.kill()


def join(url: str, members: list[Member]) -> Member:
    member = Member(url)
    members.append(member)
    return member


def start(url: str) -> Runtime:
    return Runtime.start(url, lease_s=LEASE_S, shards=SHARDS)


def held(rt: Runtime) -> set[int]:
    return set(rt._store.book.held())


def make_groups(member: Member, count: int, sleeptime: dict[str, Any]) -> list[str]:
    spec = json.dumps(sleeptime)
    return [
        member.ask(
            f"rt.create_group(primary={{'kind': 'scripted'}}, sleeptime=[{spec}], frequency=1).id"
        )
        for _ in range(count)
    ]


def test_two_processes_share_the_shards_and_each_serves_its_own_groups(
    pg_url: str, members: list[Member]
) -> None:
    a = join(pg_url, members)
    assert len(a.held()) == SHARDS  # alone: every shard
    b = start(pg_url)
    try:
        assert len(held(b)) == SHARDS // 2  # start returns once it holds its share
        assert held(b).isdisjoint(a.held()) and len(held(b) | a.held()) == SHARDS

        theirs = make_groups(a, 4, MEMORY)
        ours = [
            b.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY], frequency=1).id
            for _ in range(4)
        ]
        their_runs = [
            r for g in theirs for r in a.ask(f"rt.step({g!r}, [user('hi from a')]).run_ids")
        ]
        our_runs = [r for g in ours for r in b.step(g, [user("hi from b")]).run_ids]

        with pytest.raises(NotOwner, match=f"pid {a.pid} on ") as refused:
            b.step(theirs[0], [user("not mine")])
        assert refused.value.group_id == theirs[0] and refused.value.owner is not None
        owner = b.owner_of(theirs[0])
        assert not owner.here and f"pid {a.pid} " in (owner.owner or "")
        assert b.owner_of(ours[0]).here
        assert a.send(f"rt.step({ours[0]!r}, [user('not mine either')])")["error"] == "NotOwner"
        cancel = a.send(f"rt.cancel_run({our_runs[0]!r}).status")  # an open run: not a's
        assert cancel.get("error") == "NotOwner" or cancel["ok"] == "completed", cancel

        assert len(a.ask(f"[r.id for r in rt.wait_for_runs({their_runs!r}, timeout=30)]")) == 4
        assert all(r.status is RunStatus.COMPLETED for r in b.wait_for_runs(our_runs, timeout=30))

        a.stop()  # a clean hand-over: b takes every shard within a few renewals
        assert wait_until(lambda: len(held(b)) == SHARDS, timeout=15)
        run_ids = b.step(theirs[0], [user("now mine")]).run_ids
        b.wait_for_runs(run_ids, timeout=30)
        report = b.check_invariants()
        assert report.ok, report.violations
        assert report.groups == 8
    finally:
        b.stop()


def test_a_process_killed_under_load_loses_its_shards_and_its_runs_are_recovered(
    pg_url: str, members: list[Member]
) -> None:
    a = join(pg_url, members)
    b = start(pg_url)
    try:
        groups = make_groups(a, 4, SLOW)
        runs: list[str] = []
        for n in range(3):  # each turn a caller saw succeed must survive the kill
            for g in groups:
                runs += a.ask(f"rt.step({g!r}, [user('turn {n}')]).run_ids")
        killed = time.monotonic()
        a.kill()
        assert wait_until(lambda: len(held(b)) == SHARDS, timeout=15)
        taken_over = time.monotonic() - killed
        done = b.wait_for_runs(runs, timeout=60)
        assert all(r.status is RunStatus.COMPLETED for r in done)
        assert any(r.attempt == 2 for r in done)  # those it was running were re-queued
        assert all(b.get_group(g).turns == 3 for g in groups)
        report = b.check_invariants()
        assert report.ok, report.violations
        assert taken_over < 4 * LEASE_S + 2
    finally:
        b.stop()


def test_runs_taken_over_are_recovered_when_the_tracker_restarts_during_the_takeover(
    pg_url: str, members: list[Member]
) -> None:
    """The tracker crashes once, on the takeover's AdoptShards: its next incarnation loads
    the runs of the shards just put in the book as its own; the takeover still recovers
    those left running and starts their agents."""
    a = join(pg_url, members)
    chaos = Chaos(crash_rate=1.0, only="tracker", crash_limit=1)
    b = Runtime.start(pg_url, lease_s=LEASE_S, shards=SHARDS, chaos=chaos)
    try:
        groups = make_groups(a, 4, SLOW)
        runs: list[str] = []
        for g in groups:
            runs += a.ask(f"rt.step({g!r}, [user('turn')]).run_ids")
        a.kill()
        assert wait_until(lambda: len(held(b)) == SHARDS, timeout=15)
        done = b.wait_for_runs(runs, timeout=60)
        assert all(r.status is RunStatus.COMPLETED for r in done)
        assert b.stats()["injected_crashes"] == 1
        report = b.check_invariants()
        assert report.ok, report.violations
    finally:
        b.stop()


def test_a_paused_process_finds_its_shards_lost_and_writes_nothing_after(
    pg_url: str, members: list[Member]
) -> None:
    a = join(pg_url, members)
    a.send("!gate = threading.Event(); gated = Recorder(gate=gate)")
    a.send("!rt.agents.register('gated', gated.factory)")
    group = a.ask("rt.create_group(primary={'kind': 'gated'}, sleeptime=[{'kind': 'memory'}]).id")
    a.send(f"!turn = background.submit(rt.step, {group!r}, [user('from before the pause')])")
    assert a.ask("gated.started.acquire(timeout=10)")  # its primary agent is in the turn
    a.kill(signal.SIGSTOP)  # and the process is paused there, past its leases
    b = start(pg_url)  # takes every shard once a's leases expired
    try:
        b.agents.register("gated", Echo)
        assert len(held(b)) == SHARDS
        b.wait_for_runs(b.step(group, [user("while a was away")]).run_ids, timeout=30)
        a.kill(signal.SIGCONT)
        a.send("!gate.set()")
        # a's turn goes on and tries to commit under the epoch it held: refused, by the
        # fence (or, if a had a new epoch for that shard by then, by the turn's guard).
        refused = a.ask("type(turn.exception(timeout=30)).__name__")
        assert refused in ("ShardLost", "SleeptimeError"), refused
        stored = b.get_group(group)
        assert stored.turns == 1
        texts = [m.text() for m in b.list_messages(stored.primary_agent_id)]
        assert texts == ["while a was away", "echo 0: while a was away"]
        assert a.held().isdisjoint(held(b))  # a may have rejoined: never the same shards
        assert b.check_invariants().ok
    finally:
        b.stop()


def test_a_server_restart_keeps_one_owner_per_shard_and_a_third_takes_only_free_shards(
    pg_url: str, members: list[Member], postgres_cluster: PostgresCluster
) -> None:
    a = join(pg_url, members)
    b = start(pg_url)
    try:
        ours = b.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY], frequency=1).id
        (theirs,) = make_groups(a, 1, MEMORY)
        postgres_cluster.restart()

        def both_work() -> bool:
            try:
                b.step(ours, [user("after the restart")])
            except Exception:
                return False
            return "ok" in a.send(f"rt.step({theirs!r}, [user('after the restart')])")

        assert wait_until(both_work, timeout=30)
        assert held(b).isdisjoint(a.held()) and len(held(b) | a.held()) == SHARDS

        c = start(pg_url)
        try:
            assert len(held(c)) >= SHARDS // 3 - 1
            mine, theirs_now = held(b), a.held()
            assert held(c).isdisjoint(mine) and held(c).isdisjoint(theirs_now)
            assert len(held(c) | mine | theirs_now) == SHARDS
            # Three processes, each taking turns on a group it made once the shards were
            # shared out (a group made before may have moved to c: that is the share).
            of_c = c.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY], frequency=1)
            of_b = b.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY], frequency=1)
            (of_a,) = make_groups(a, 1, MEMORY)
            assert c.owner_of(of_c.id).here and not b.owner_of(of_c.id).here
            c.wait_for_runs(c.step(of_c.id, [user("from c")]).run_ids, timeout=30)
            b.wait_for_runs(b.step(of_b.id, [user("from b")]).run_ids, timeout=30)
            assert "ok" in a.send(f"rt.step({of_a!r}, [user('from a')])")
        finally:
            c.stop()
        open_runs = b.list_runs(statuses=[RunStatus.CREATED, RunStatus.RUNNING])
        b.wait_for_runs([r.id for r in open_runs if b.owner_of(r.group_id).here], timeout=30)
        assert wait_until(lambda: b.check_invariants().ok, timeout=30)
    finally:
        b.stop()


def test_shard_lost_is_an_error_users_can_catch() -> None:
    error = ShardLost(7)
    assert error.shard == 7 and "shard 7" in str(error)


def test_a_shard_lost_to_a_write_and_taken_back_before_the_loss_is_handled_keeps_its_runs(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write finds its shard taken over (another member held it a moment), and this
    process takes the shard back at a new epoch before its busy scheduler handled the
    loss. The loss is handled first, then the shard adopted as after a takeover: every
    run of it ends, in order. (The late loss once dropped the runs just adopted: they
    stayed open, later runs of the same agent overtaking them, until the next restart.)"""
    rt = start(pg_url)
    engine = sqlalchemy.create_engine(pg_url)
    try:
        scheduler = rt._parts.scheduler
        schedule = scheduler.call_later
        late: list[str] = []

        def busy(delay: float, fn: Any) -> Any:
            name = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__", ""))
            if name in ("_handle_losses_soon", "_lost"):  # handling a loss a write found
                late.append(name)
                delay = 3.0  # as a scheduler thread behind other work would run it
            return schedule(delay, fn)

        monkeypatch.setattr(scheduler, "call_later", busy)
        slow = {"kind": "simulated", "config": {"latency_ms": 300, "seed": 1}}
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[slow], frequency=1)
        shard = rt.owner_of(group.id).shard
        runs = [r for n in range(3) for r in rt.step(group.id, [user(f"turn {n}")]).run_ids]
        with engine.begin() as connection:  # another member held the shard a moment
            connection.execute(
                sqlalchemy.text(
                    "UPDATE shard_leases SET epoch = epoch + 1, member = 'elsewhere', "
                    "holder = 'elsewhere', expires_at = (now() AT TIME ZONE 'UTC') "
                    "+ interval '1 second' WHERE shard = :shard"
                ),
                {"shard": shard},
            )
        with pytest.raises(ShardLost):
            rt.step(group.id, [user("under the old epoch")])  # the write finds it lost
        assert late  # the loss is handled late
        assert wait_until(lambda: rt.owner_of(group.id).here, timeout=30)  # taken back
        later = rt.step(group.id, [user("under the new epoch")]).run_ids
        ended = rt.wait_for_runs(runs + later, timeout=30)
        assert all(run.status is RunStatus.COMPLETED for run in ended), ended
        started = [run.started_at for run in ended if run.started_at is not None]
        assert len(started) == len(ended) and started == sorted(started)  # in creation order
        report = rt.check_invariants([group.id])
        assert report.ok, report.violations
    finally:
        engine.dispose()
        rt.stop()


def test_a_shard_being_handed_over_is_between_owners_not_ours(pg_url: str) -> None:
    """While a process hands a shard over, the lease row still names it: `owner_of` and
    `NotOwner` say the shard is between owners, not that this very process serves it (a
    router following that would come straight back)."""
    with start(pg_url) as rt:
        rt.agents.register("echo", Echo)
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[MEMORY])
        shard = rt.owner_of(group.id).shard
        assert rt.owner_of(group.id).here and rt.owner_of(group.id).owner is not None
        rt._store.book.leave([shard])  # what a hand-over does first
        owner = rt.owner_of(group.id)
        assert (owner.owner, owner.address, owner.here) == (None, None, False)
        with pytest.raises(NotOwner, match="no process") as refused:
            rt.step(group.id, [user("hi")])
        assert refused.value.owner is None


def test_a_read_only_runtime_names_the_owner_and_is_not_it(pg_url: str) -> None:
    with start(pg_url) as rt, Runtime.start(pg_url, read_only=True) as viewer:
        rt.agents.register("echo", Echo)
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[MEMORY])
        seen = viewer.owner_of(group.id)
        assert seen.owner == rt.owner_of(group.id).owner is not None
        assert not seen.here and rt.owner_of(group.id).here


def test_a_member_joining_takes_shards_where_nothing_runs_first(
    pg_url: str, members: list[Member]
) -> None:
    """SPEC 6: only a crash re-queues a run. A process handing shards over to one that
    joins gives those where no run is open first, so a run in progress, or one queued
    that its agent would start while the hand-over waits, is not handed over (its new
    owner would re-queue it, an attempt spent) when there is a choice."""
    with Runtime.start(pg_url, lease_s=LEASE_S, shards=SHARDS, workers=1) as a:
        gate = threading.Event()
        recorder = Recorder(gate=gate)
        a.agents.register("echo", Echo)
        a.agents.register("recorder", recorder.factory)
        chosen: list[Group] = []
        while len(chosen) < 2:  # groups in the highest shards: those a plain hand-over gives
            group = a.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}])
            if a.owner_of(group.id).shard >= SHARDS // 2:
                chosen.append(group)
        (running,) = a.step(chosen[0].id, [user("hi")]).run_ids
        recorder.wait_started()
        (queued,) = a.step(chosen[1].id, [user("hi")]).run_ids  # waits for the one thread
        join(pg_url, members)
        assert wait_until(lambda: len(held(a)) == SHARDS // 2, timeout=30)
        assert all(a.owner_of(g.id).here for g in chosen)  # kept: their runs are open here
        gate.set()
        for run in a.wait_for_runs([running, queued], timeout=30):
            assert (run.status, run.attempt) == (RunStatus.COMPLETED, 1)
            assert [e.status for e in a.run_events(run.id)] == ["created", "running", "completed"]


def test_the_prune_command_leaves_a_served_database_to_its_processes(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run.py prune` would join the serving processes as one more: take its share of
    their shards (their groups waiting meanwhile) and their runs, which it cannot run. It
    says to prune from inside them instead, and changes nothing; once they stopped, it
    prunes."""
    with start(pg_url) as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY])
        rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
        assert run.main(["prune", "--db", pg_url, "--keep-runs", "0"]) == 2
        error = capsys.readouterr().err
        assert "1 runtime process(es) serve this database now" in error
        assert f"pid {os.getpid()}" in error and "rt.prune" in error
        assert len(rt.list_runs(group_id=group.id)) == 1
    assert run.main(["prune", "--db", pg_url, "--keep-runs", "0"]) == 0
    with start(pg_url) as rt:
        assert rt.list_runs(group_id=group.id) == []
