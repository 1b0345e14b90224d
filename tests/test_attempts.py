"""Every run transition is guarded by its attempt as well as its status (SPEC 15).

A late write from an earlier attempt is refused (`TransitionRefused`) and never applied,
and the stored attempt never goes back: in the store, and end to end through a runtime
whose tracker re-queued the run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any

import pytest

from actors import Chaos, RunNotFound, Runtime, StoreUnavailable, TransitionRefused
from actors._execute import stamp
from actors._protocol import FinishRun
from messages import MessageCreate, RunStatus, StopReason
from persistence import Store, Transition, utcnow
from tests.agents import Echo, Recorder, user, wait_until
from tests.logs import Records, host_logging
from tests.test_committer import in_one_batch

CREATED, RUNNING = RunStatus.CREATED, RunStatus.RUNNING
COMPLETED, FAILED, CANCELLED = RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED


class Later:
    """A sleeptime kind only registered when a test wants its runs to go ahead."""

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def step(self, context: Any, messages: Any) -> list[MessageCreate]:
        return [MessageCreate(role="assistant", content="done")]


def created_runs(db_url: str, turns: int = 1) -> list[str]:
    """Runs stored `created` (their kind is missing, so nothing started them)."""
    with Runtime.start(db_url, kinds={"echo": Echo, "later": Later}) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "later"}])
    rt = Runtime.start(db_url, kinds={"echo": Echo})
    try:
        return [r for n in range(turns) for r in rt.step(group.id, [user(f"hi {n}")]).run_ids]
    finally:
        rt.stop(drain_timeout=0)  # their kind is missing: they would never finish


def change(
    run_id: str, old: RunStatus, new: RunStatus, attempt: int, expected: int | None = None
) -> Transition:
    """`run_id` from `old` to `new`, expected at `expected` (default: the attempt it leaves)."""
    if expected is None:
        expected = attempt - 1 if new is CREATED else attempt
    return Transition(
        run_id=run_id,
        old=old,
        new=new,
        at=utcnow(),
        attempt=attempt,
        expected_attempt=expected,
        reason=new.value,
    )


def stored(store: Store, run_id: str) -> tuple[RunStatus, int]:
    run = store.get_run(run_id)
    return run.status, run.attempt


def test_a_transition_never_moves_the_attempt_back() -> None:
    with pytest.raises(ValueError, match="leaves it at attempt 2, not 1"):
        change("run-x", RUNNING, CREATED, attempt=1, expected=1)
    with pytest.raises(ValueError, match="leaves it at attempt 3, not 2"):
        change("run-x", RUNNING, COMPLETED, attempt=2, expected=3)
    assert change("run-x", RUNNING, CREATED, attempt=3).expected_attempt == 2


LATE = [
    pytest.param(RUNNING, COMPLETED, id="finish"),
    pytest.param(RUNNING, FAILED, id="fail"),
    pytest.param(CREATED, RUNNING, id="start"),
    pytest.param(RUNNING, CREATED, id="requeue"),
    pytest.param(CREATED, CANCELLED, id="cancel"),
]


@pytest.mark.parametrize(("old", "new"), LATE)
def test_the_store_refuses_a_late_write_from_an_earlier_attempt(
    db_url: str, old: RunStatus, new: RunStatus
) -> None:
    (run_id,) = created_runs(db_url)
    store = Store(db_url)
    try:
        store.apply_transition(change(run_id, CREATED, RUNNING, 1)).result()
        store.apply_transition(change(run_id, RUNNING, CREATED, 2)).result()  # re-queued
        late = change(run_id, old, new, 2 if new is CREATED else 1, expected=1)
        with pytest.raises(TransitionRefused, match="at attempt 1"):
            store.apply_transition(late).result()
        assert stored(store, run_id) == (CREATED, 2)  # nothing of it applied
        store.apply_transition(change(run_id, CREATED, RUNNING, 2)).result()
        store.apply_transition(change(run_id, RUNNING, COMPLETED, 2)).result()
        assert stored(store, run_id) == (COMPLETED, 2)
        events = [(e.status.value, e.attempt) for e in store.run_events(run_id)]
        assert events == [
            ("created", 1),
            ("running", 1),
            ("created", 2),
            ("running", 2),
            ("completed", 2),
        ]
    finally:
        store.close()


def test_a_late_write_merged_with_others_fails_alone(db_url: str) -> None:
    late_id, *others = created_runs(db_url, turns=3)
    store = Store(db_url)
    try:
        for run_id in (late_id, *others):
            store.apply_transition(change(run_id, CREATED, RUNNING, 1)).result()
        store.apply_transition(change(late_id, RUNNING, CREATED, 2)).result()
        writes = [change(late_id, RUNNING, COMPLETED, 1)] + [
            change(r, RUNNING, COMPLETED, 1) for r in others
        ]
        futures = in_one_batch(store.committer, writes, store.apply_transition)
        assert isinstance(futures[0].exception(), TransitionRefused)
        assert all(f.exception() is None for f in futures[1:])
        assert stored(store, late_id) == (CREATED, 2)
        assert {stored(store, r) for r in others} == {(COMPLETED, 1)}
    finally:
        store.close()


def test_a_late_finish_after_a_restart_requeued_the_run_is_refused(db_url: str) -> None:
    """A runtime stopped mid-run: the next one re-queues the run as attempt 2; attempt 1's
    finish, told to its tracker or written through its store, is refused and the run
    goes on to complete as attempt 2."""
    gate = threading.Event()
    hung = Recorder(gate=gate)
    try:
        rt = Runtime.start(db_url, kinds={"echo": Echo, "worker": hung.factory})
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "worker"}])
        run_id = rt.step(group.id, [user("hello")]).run_ids[0]
        hung.wait_started()  # attempt 1 is running
        rt.stop(drain_timeout=0.05)

        finishing = Recorder()
        with Runtime.start(db_url, kinds={"echo": Echo}) as again:  # no worker yet
            assert (again.get_run(run_id).status, again.get_run(run_id).attempt) == (CREATED, 2)
            said = stamp(
                MessageCreate(role="assistant", content="attempt 1 was here"),
                agent_id=group.sleeptime_agent_ids[0],
                group_id=group.id,
                sequence=1,
                run_id=run_id,
            )
            again._parts.tracker.tell(
                FinishRun(
                    run_id=run_id,
                    attempt=1,
                    status=COMPLETED,
                    stop_reason=StopReason.END_TURN,
                    messages=[said],
                )
            )
            with pytest.raises(TransitionRefused, match="at attempt 1"):
                again._store.apply_transition(change(run_id, RUNNING, COMPLETED, 1)).result()
            # What the late attempt said is kept in its agent's history, nothing else moved.
            assert wait_until(
                lambda: any(m.id == said.id for m in again.list_messages(said.agent_id))
            )
            run = again.get_run(run_id)
            assert (run.status, run.attempt) == (CREATED, 2)

            again.agents.register("worker", finishing.factory)
            (done,) = again.wait_for_runs([run_id], timeout=30)
            assert (done.status, done.attempt) == (COMPLETED, 2)
            assert [(e.status.value, e.attempt) for e in again.run_events(run_id)] == [
                ("created", 1),
                ("running", 1),
                ("created", 2),
                ("running", 2),
                ("completed", 2),
            ]
            report = again.check_invariants()
            assert report.ok, report.violations
    finally:
        gate.set()


def _drop_first_requeue(monkeypatch: pytest.MonkeyPatch) -> list[Transition]:
    """Make the store lose the first re-queue it is asked for (as in an outage), unwritten."""
    dropped: list[Transition] = []
    original = Store.apply_transition

    def apply(
        self: Store, transition: Transition, after: Sequence[Future[Any]] = ()
    ) -> Future[datetime | None]:
        if transition.new is CREATED and not dropped:
            dropped.append(transition)
            failed: Future[datetime | None] = Future()
            failed.set_exception(StoreUnavailable(self.url, "injected: the re-queue was lost"))
            return failed
        return original(self, transition, after)

    monkeypatch.setattr(Store, "apply_transition", apply)
    return dropped


@pytest.mark.parametrize("then", ["start", "cancel"])
def test_a_requeue_that_never_landed_is_made_again_before_the_next_change(
    db_url: str, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """The tracker re-queues a run whose agent crashed mid-run, but the write is lost: the
    stored run is still `running` at attempt 1. Its next start (or a cancel) reads that
    back and re-queues it again first, so the guarded write for attempt 2 lands."""
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    with Runtime.start(db_url, kinds={"echo": Echo, "rec": recorder.factory}) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "rec"}])
    dropped = _drop_first_requeue(monkeypatch)
    # As in test_supervision: the agent's actor crashes while its first run steps.
    chaos = Chaos(
        crash_rate=1.0, only=f"agent:{group.sleeptime_agent_ids[0]}", crash_limit=1, after=2
    )
    try:
        with Runtime.start(
            db_url, kinds={"echo": Echo, "rec": recorder.factory}, chaos=chaos
        ) as rt:
            first = rt.step(group.id, [user("one")]).run_ids[0]
            recorder.wait_started()
            rt.step(group.id, [user("two")])  # crashes the agent's actor: first is re-queued
            assert wait_until(lambda: bool(dropped))
            assert (rt.get_run(first).status, rt.get_run(first).attempt) == (RUNNING, 1)
            if then == "cancel":
                cancelled = rt.cancel_run(first)
                assert (cancelled.status, cancelled.attempt) == (CANCELLED, 2)
                gate.set()
            else:
                gate.set()  # attempt 1 returns; attempt 2 starts
                (done,) = rt.wait_for_runs([first], timeout=30)
                assert (done.status, done.attempt) == (COMPLETED, 2)
            rt.wait_for_runs([r.id for r in rt.list_runs(group_id=group.id)], timeout=30)
            events = [(e.status.value, e.attempt) for e in rt.run_events(first)]
            assert events[:3] == [("created", 1), ("running", 1), ("created", 2)]
            assert events[-1] == (("cancelled", 2) if then == "cancel" else ("completed", 2))
            report = rt.check_invariants()
            assert report.ok, report.violations
    finally:
        gate.set()


def test_a_run_whose_group_is_deleted_while_its_start_is_written_ends_without_a_crash(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's rows go while the tracker writes its run's start: the guarded write finds
    no row, so the tracker reads the run back before its end, finds it gone, and stops
    following it (it crashed on `RunNotFound` before, and was restarted)."""
    with Runtime.start(db_url, kinds={"echo": Echo}) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "echo"}])
        original = Store.apply_transition
        deleted: list[str] = []

        def apply(
            self: Store, change: Transition, after: Sequence[Future[Any]] = ()
        ) -> Future[datetime | None]:
            if change.new is RUNNING and not deleted:
                deleted.extend(self.delete_group(group.id).result(timeout=30))
            return original(self, change, after)

        monkeypatch.setattr(Store, "apply_transition", apply)
        (run_id,) = rt.step(group.id, [user("hi")]).run_ids
        assert wait_until(lambda: bool(deleted))
        with pytest.raises(RunNotFound):
            rt.wait_for_runs([run_id], timeout=30)
        assert rt.stats()["restarts"] == 0
        assert rt.stats()["escalations"] == 0


def test_a_run_whose_rows_go_while_it_steps_is_forgotten_without_an_error(db_url: str) -> None:
    """The run's end is refused because its row is gone (its group deleted beside the
    tracker, say, or pruned): the tracker forgets it (`run_gone`, at info), its waiter
    hears RunNotFound, and nothing is logged at error (it logged `resync_failed`)."""
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    records = Records()
    with host_logging():
        logging.getLogger("sleeptime").addHandler(records)
        logging.getLogger("sleeptime").setLevel(logging.INFO)
        with Runtime.start(db_url, kinds={"echo": Echo, "rec": recorder.factory}) as rt:
            group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "rec"}])
            (run_id,) = rt.step(group.id, [user("hi")]).run_ids
            assert recorder.started.acquire(timeout=30)
            rt._store.delete_group(group.id).result(timeout=30)  # behind the tracker's back
            gate.set()
            with pytest.raises(RunNotFound):
                rt.wait_for_runs([run_id], timeout=30)
            assert wait_until(lambda: bool(records.events("run_gone")))
            assert rt.stats()["restarts"] == 0
    assert [r.getMessage() for r in records.records if r.levelno >= logging.ERROR] == []


def test_a_start_after_a_write_that_failed_is_not_stored(db_url: str) -> None:
    """`after`: a start queued behind its agent's earlier run's end fails with that end
    (StoreUnavailable, nothing stored) when the end's write failed; it goes through when
    the end's write is merely still to come."""
    (run_id,) = created_runs(db_url)
    store = Store(db_url)
    try:
        lost: Future[datetime | None] = Future()
        lost.set_exception(StoreUnavailable(store.url, "injected: the end was lost"))
        with pytest.raises(StoreUnavailable, match="earlier run of the agent"):
            store.apply_transition(change(run_id, CREATED, RUNNING, 1), [lost]).result()
        assert stored(store, run_id) == (CREATED, 1)
        assert [e.status.value for e in store.run_events(run_id)] == ["created"]
        to_come: Future[datetime | None] = Future()  # queued with it: commits with it
        store.apply_transition(change(run_id, CREATED, RUNNING, 1), [to_come]).result()
        assert stored(store, run_id) == (RUNNING, 1)
    finally:
        store.close()


def test_an_agents_next_run_starts_only_once_its_earlier_runs_end_is_stored(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 6, one run at a time in order, as stored: the store loses the end of an
    agent's first run (an outage as it was written; the tracker writes it again half a
    second later). The agent's second run does not start meanwhile: its `running` comes
    after the first run's end, and both complete."""
    lost: list[Transition] = []
    original = Store.apply_transition

    def apply(
        self: Store, transition: Transition, after: Sequence[Future[Any]] = ()
    ) -> Future[datetime | None]:
        if transition.new.terminal and not lost:
            lost.append(transition)
            failed: Future[datetime | None] = Future()
            failed.set_exception(StoreUnavailable(self.url, "injected: the end was lost"))
            return failed
        return original(self, transition, after)

    monkeypatch.setattr(Store, "apply_transition", apply)
    recorder = Recorder()
    with Runtime.start(db_url) as rt:
        rt.agents.register("echo", Echo)
        rt.agents.register("recorder", recorder.factory)
        group = rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}], frequency=1
        )
        first = rt.step(group.id, [user("one")]).run_ids[0]
        second = rt.step(group.id, [user("two")]).run_ids[0]
        runs = rt.wait_for_runs([first, second], timeout=30)
        assert [r.status for r in runs] == [COMPLETED, COMPLETED]
        assert lost and lost[0].run_id == first
        ended = next(e for e in rt.run_events(first) if e.status == "completed")
        began = next(e for e in rt.run_events(second) if e.status == "running")
        assert ended.at <= began.at
        assert runs[0].completed_at is not None and runs[1].started_at is not None
        assert runs[0].completed_at <= runs[1].started_at
        assert rt.check_invariants().ok
