"""Messages handled on the sender's thread (`Address.tell_here`, `serve_here`), by actors
with a thread of their own and by actors run on a dispatcher's shared threads.

An actor that `serves_callers` handles a message on its sender's thread while it is idle:
every message told to its incarnation handled, none being handled. These tests hold it to
what its own thread guarantees: one message at a time, none overtaking one told before
it, a message that raises is the actor's crash (restarted, nothing told after it lost).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import RestartPolicy, Runtime
from actors._address import Address
from actors._pykka import Dispatcher
from actors._scheduler import Scheduler
from actors._supervised import CrashReporter, DispatchedSupervisedActor, SupervisedActor
from actors._supervisor import ChildSpec, Supervisor
from messages import SleeptimeError
from tests.agents import user, wait_until


@dataclass(frozen=True)
class Note:
    sender: int
    number: int


@dataclass(frozen=True)
class Hold:
    """Handled by waiting for `gate` (the actor is busy meanwhile)."""

    gate: threading.Event


@dataclass(frozen=True)
class Explode:
    error: BaseException


class Journal(SupervisedActor):
    """Writes down each message it handles, with the thread that handled it."""

    serves_callers = True

    def __init__(
        self,
        reporter: CrashReporter,
        journal: list[tuple[Any, int]],
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__(reporter)
        self.journal = journal
        self.inside = False
        if dispatcher is not None:
            self.dispatcher = dispatcher

    def receive(self, message: Any) -> Any:
        assert not self.inside, "two messages handled at once"
        self.inside = True
        try:
            match message:
                case Hold(gate=gate):
                    assert gate.wait(10)
                case Explode(error=error):
                    raise error
            self.journal.append((message, threading.get_ident()))
        finally:
            self.inside = False
        return None


class DispatchedJournal(Journal, DispatchedSupervisedActor):
    """The same, with no thread of its own: a dispatcher's threads run its messages."""


KINDS = ["own thread", "dispatched"]


def journal_kind(kind: str, dispatcher: Dispatcher) -> Any:
    """How to start a journal of `kind` (`start(reporter, journal)`)."""
    if kind == "dispatched":
        return lambda reporter, journal: DispatchedJournal.start(reporter, journal, dispatcher)
    return Journal.start


@dataclass
class Harness:
    address: Address
    journal: list[tuple[Any, int]]
    starts: list[int]

    def handled(self) -> list[Any]:
        return [message for message, _ in self.journal]


@pytest.fixture(params=KINDS)
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    scheduler = Scheduler()
    supervisor = Supervisor(scheduler)
    dispatcher = Dispatcher(2)
    journal: list[tuple[Any, int]] = []
    starts: list[int] = []
    make = journal_kind(request.param, dispatcher)

    def start(reporter: CrashReporter) -> pykka.ActorRef[Any]:
        starts.append(reporter.address.incarnation)
        return make(reporter, journal)  # type: ignore[no-any-return]

    address = supervisor.supervise(
        ChildSpec(
            "journal",
            start,
            lambda reason: None,
            RestartPolicy(backoff_base=0.01, max_restarts=50),
            refuse=lambda reason: SleeptimeError("journal gone"),
        )
    )
    assert wait_until(lambda: address._local is not None)  # up, and serving senders
    yield Harness(address, journal, starts)
    supervisor.shut_down(SleeptimeError("test over"))
    dispatcher.close()
    scheduler.close()


def test_an_idle_actor_handles_a_message_on_the_senders_thread(harness: Harness) -> None:
    harness.address.tell_here(Note(0, 1))
    assert harness.journal == [(Note(0, 1), threading.get_ident())]  # done on return
    assert harness.address._owed == 0


def test_a_message_told_here_never_overtakes_one_told_before(harness: Harness) -> None:
    gate = threading.Event()
    harness.address.tell(Hold(gate))  # the actor's thread is busy with it
    harness.address.tell(Note(0, 1))
    harness.address.tell_here(Note(0, 2))  # not idle: queued behind the others
    assert harness.journal == []
    gate.set()
    assert wait_until(lambda: len(harness.journal) == 3)
    assert harness.handled() == [Hold(gate), Note(0, 1), Note(0, 2)]
    assert all(thread != threading.get_ident() for _, thread in harness.journal)
    assert wait_until(lambda: harness.address._owed == 0)
    harness.address.tell_here(Note(0, 3))  # idle again: here
    assert harness.journal[-1] == (Note(0, 3), threading.get_ident())


@settings(max_examples=25, deadline=None)
@given(
    plans=st.lists(st.lists(st.booleans(), min_size=1, max_size=30), min_size=1, max_size=4),
    kind=st.sampled_from(KINDS),
)
def test_every_message_is_handled_once_and_each_senders_in_the_order_told(
    plans: list[list[bool]], kind: str
) -> None:
    """Senders on threads of their own, each telling its messages here or to the inbox
    as drawn: whatever the interleaving, each is handled once, a sender's in its order."""
    scheduler = Scheduler()
    supervisor = Supervisor(scheduler)
    dispatcher = Dispatcher(2)
    journal: list[tuple[Any, int]] = []
    make = journal_kind(kind, dispatcher)
    address = supervisor.supervise(
        ChildSpec(
            "journal",
            lambda reporter: make(reporter, journal),
            lambda reason: None,
            RestartPolicy(),
            refuse=lambda reason: SleeptimeError("journal gone"),
        )
    )
    try:
        assert wait_until(lambda: address._local is not None)
        begin = threading.Barrier(len(plans))

        def send(sender: int, plan: list[bool]) -> None:
            begin.wait(10)
            for number, here in enumerate(plan):
                (address.tell_here if here else address.tell)(Note(sender, number))

        threads = [
            threading.Thread(target=send, args=(sender, plan)) for sender, plan in enumerate(plans)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        total = sum(len(plan) for plan in plans)
        assert wait_until(lambda: len(journal) == total)
        for sender, plan in enumerate(plans):
            mine = [m.number for m, _ in journal if m.sender == sender]
            assert mine == list(range(len(plan)))
        assert wait_until(lambda: address._owed == 0)
    finally:
        supervisor.shut_down(SleeptimeError("test over"))
        dispatcher.close()
        scheduler.close()


def test_a_message_that_raises_here_is_the_actors_crash_and_nothing_after_it_is_lost(
    harness: Harness,
) -> None:
    harness.address.tell_here(Explode(RuntimeError("boom")))  # the actor's, not the sender's
    harness.address.tell_here(Note(0, 1))  # not served here any more: told, kept
    harness.address.tell(Note(0, 2))
    assert wait_until(lambda: len(harness.starts) == 2)  # restarted
    assert wait_until(lambda: len(harness.journal) == 2)
    assert harness.handled() == [Note(0, 1), Note(0, 2)]
    assert all(thread != threading.get_ident() for _, thread in harness.journal)
    assert wait_until(lambda: harness.address._local is not None)  # the new one serves
    harness.address.tell_here(Note(0, 3))
    assert harness.journal[-1] == (Note(0, 3), threading.get_ident())


def test_an_exit_raised_here_reaches_the_sender_and_crashes_the_actor(harness: Harness) -> None:
    with pytest.raises(SystemExit):
        harness.address.tell_here(Explode(SystemExit(3)))
    harness.address.tell(Note(0, 1))
    assert wait_until(lambda: len(harness.starts) == 2)
    assert wait_until(lambda: harness.handled() == [Note(0, 1)])


def test_a_dispatcher_runs_many_actors_each_in_order_one_message_at_a_time() -> None:
    """300 actors on 3 shared threads, told from 4 threads at once: every message handled,
    each actor's in the order told, never two of one actor at once (`Journal` checks),
    and no thread made for any of them; stopping each answers, and what is told to a
    stopped one is refused."""
    dispatcher = Dispatcher(3)
    threads_before = threading.active_count()
    journals: list[list[tuple[Any, int]]] = [[] for _ in range(300)]
    refs = [DispatchedJournal.start(None, journal, dispatcher) for journal in journals]
    assert threading.active_count() == threads_before
    begin = threading.Barrier(4)

    def send(sender: int) -> None:
        begin.wait(10)
        for number in range(20):
            for ref in refs:
                ref.tell(Note(sender, number))

    senders = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(30)
    assert wait_until(lambda: all(len(j) == 80 for j in journals), timeout=30)
    for journal in journals:
        for sender in range(4):
            assert [m.number for m, _ in journal if m.sender == sender] == list(range(20))
    assert {thread for journal in journals for _, thread in journal} <= {
        t.ident for t in threading.enumerate() if t.name.startswith("sleeptime-dispatch")
    }
    for ref in refs:
        assert ref.stop(timeout=10) is True
    with pytest.raises(pykka.ActorDeadError):
        refs[0].tell(Note(0, 99))
    dispatcher.close()
    assert wait_until(lambda: threading.active_count() == threads_before - 3)


def test_a_runtimes_sleeptime_agents_cost_no_thread(tmp_path: Path) -> None:
    """40 sleeptime agents of 20 groups, all active: a thread for each group's actor, none
    for an agent's (their actors run on the runtime's dispatcher)."""
    with Runtime.start(f"sqlite:///{tmp_path / 'threads.db'}") as rt:
        groups = [
            rt.create_group(
                primary={"kind": "scripted"},
                sleeptime=[{"kind": "memory"}, {"kind": "memory"}],
                frequency=1,
            )
            for _ in range(20)
        ]
        before = threading.active_count()
        run_ids = [r for g in groups for r in rt.step(g.id, [user("my name is Ada")]).run_ids]
        assert len(run_ids) == 40
        rt.wait_for_runs(run_ids, timeout=60)
        stats = rt.stats()
        assert (stats["active_groups"], stats["active_agents"]) == (20, 40)
        alive = [thread.name for thread in threading.enumerate()]
        assert not [name for name in alive if name.startswith("SleeptimeAgentActor")]
        assert threading.active_count() - before <= 20  # the groups' actors' (or fewer: any
        # thread of an earlier test that ends meanwhile only lowers the count)


class BrokenRun(DispatchedJournal):
    """An actor whose every run on the dispatcher fails outside its own code."""

    def _run_some(self) -> None:
        raise RuntimeError("pykka's loop broke")


def test_a_dispatcher_thread_outlives_an_actor_whose_run_fails() -> None:
    """A failure outside an actor's own code (pykka's loop, its teardown) is logged, and
    the one thread of this dispatcher goes on serving the other actors."""
    dispatcher = Dispatcher(1)
    broken_journal: list[tuple[Any, int]] = []
    broken = BrokenRun.start(None, broken_journal, dispatcher)
    broken.tell(Note(0, 1))  # its runs (the start, then this) fail
    journal: list[tuple[Any, int]] = []
    other = DispatchedJournal.start(None, journal, dispatcher)
    other.tell(Note(1, 1))
    assert wait_until(lambda: [m for m, _ in journal] == [Note(1, 1)])
    assert broken_journal == []
    assert other.stop(timeout=10) is True
    dispatcher.close()


class QuietJournal(Journal):
    """A journal that serves no sender on its thread: every message goes to its inbox."""

    serves_callers = False


def test_the_address_counts_what_waits_for_any_actor_serving_senders_or_not() -> None:
    scheduler = Scheduler()
    supervisor = Supervisor(scheduler)
    journal: list[tuple[Any, int]] = []
    gate = threading.Event()
    address = supervisor.supervise(
        ChildSpec(
            "quiet",
            lambda reporter: QuietJournal.start(reporter, journal),
            lambda reason: None,
            RestartPolicy(),
            refuse=lambda reason: SleeptimeError("journal gone"),
        )
    )
    try:
        address.tell(Hold(gate))
        for number in range(50):
            address.tell_here(Note(0, number))  # never here: this one serves no sender
        assert wait_until(lambda: address._owed == 51)  # the hold, taken; the rest, waiting
        gate.set()
        assert wait_until(lambda: len(journal) == 51)
        assert wait_until(lambda: address._owed == 0)
        assert all(thread != threading.get_ident() for _, thread in journal)
    finally:
        supervisor.shut_down(SleeptimeError("test over"))
        scheduler.close()
