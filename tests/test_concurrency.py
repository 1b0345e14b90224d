"""Concurrent callers: turns are serialized per group, nothing lost or counted twice."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import Runtime
from messages import MessageCreate, RunStatus
from tests.agents import Echo, Recorder, Silent, user, wait_until
from tests.invariants import check_group


def test_eight_threads_on_one_group_make_exactly_forty_runs(rt: Runtime) -> None:
    recorder = Recorder()
    rt.agents.register("echo", Echo)
    rt.agents.register("recorder", recorder.factory)
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "recorder"}], frequency=5)
    start = threading.Barrier(8)

    def caller(thread: int) -> list[str]:
        start.wait(10)
        run_ids = []
        for turn in range(25):
            run_ids += rt.step(group.id, [user(f"t{thread}-{turn}")]).run_ids
        return run_ids

    with ThreadPoolExecutor(8) as pool:
        run_ids = [r for ids in pool.map(caller, range(8)) for r in ids]
    assert len(run_ids) == 40 == len(set(run_ids))
    runs = rt.wait_for_runs(run_ids, timeout=60)
    assert all(r.status is RunStatus.COMPLETED for r in runs)
    stored = rt.get_group(group.id)
    assert (stored.turns, stored.counter) == (200, (200 - 1) % 5)
    history = rt.list_messages(group.primary_agent_id)
    assert len(history) == 400
    assert sorted(m.text() for m in history if m.role == "user") == sorted(
        f"t{t}-{n}" for t in range(8) for n in range(25)
    )
    # Every primary message up to the last fire (turn 196) was handed over exactly once;
    # the four turns after it wait for the next fire.
    handed = [
        line
        for text in recorder.transcripts
        for line in text.split("Messages:\n", 1)[1].splitlines()
    ]
    assert len(handed) == len(set(handed)) == 2 * 196
    assert stored.cursor == history[2 * 196 - 1].id
    check_group(rt, group.id)


def test_many_groups_in_parallel_stay_consistent(rt: Runtime) -> None:
    rt.agents.register("echo", Echo)
    groups = [
        rt.create_group(
            primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}] * 2, frequency=frequency
        )
        for frequency in (None, 1, 2, 3, 7, 0) * 2
    ]

    def drive(group_id: str) -> list[str]:
        return [r for n in range(15) for r in rt.step(group_id, [user(f"my n is {n}")]).run_ids]

    with ThreadPoolExecutor(6) as pool:
        run_ids = [r for ids in pool.map(drive, [g.id for g in groups]) for r in ids]
    rt.wait_for_runs(run_ids, timeout=60)
    for group in groups:
        check_group(rt, group.id)
        assert rt.get_group(group.id).turns == 15


# A turn: (kind of turn, frequency to switch to before it or "keep").
_TURNS = st.lists(
    st.tuples(
        st.sampled_from(["step", "silent", "record", "record_user_only"]),
        st.one_of(st.just("keep"), st.none(), st.integers(0, 4)),
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(turns=_TURNS, frequency=st.one_of(st.none(), st.integers(0, 4)))
def test_windows_are_contiguous_disjoint_and_cover_up_to_the_cursor(
    rt: Runtime, turns: list[tuple[str, object]], frequency: int | None
) -> None:
    rt.agents.register("echo", Echo)
    rt.agents.register("silent", Silent)
    group = rt.create_group(
        primary={"kind": "echo"},
        sleeptime=[{"kind": "memory"}, {"kind": "memory"}],
        frequency=frequency,
    )
    silent = rt.create_group(primary={"kind": "silent"}, sleeptime=[{"kind": "memory"}])
    expected_counter, current = -1, frequency
    run_ids: list[str] = []
    for kind, change in turns:
        if change != "keep":
            current = change  # type: ignore[assignment]
            rt.update_group(group.id, frequency=current)
        if kind == "step":
            result = rt.step(group.id, [user("hello")])
        elif kind == "silent":  # a turn with no output: record only the user input
            result = rt.record_turn(group.id, [user("nothing back")])
        elif kind == "record":
            result = rt.record_turn(
                group.id, [user("q"), MessageCreate(role="assistant", content="a")]
            )
        else:
            result = rt.record_turn(group.id, [user("a"), user("b")])
        fires = current is None or (current > 0 and (expected_counter + 1) % current == 0)
        if current:
            expected_counter = (expected_counter + 1) % current
        assert result.fired == fires
        run_ids += result.run_ids
    rt.wait_for_runs(run_ids, timeout=60)
    stored = rt.get_group(group.id)
    assert (stored.turns, stored.counter) == (len(turns), expected_counter)
    check_group(rt, group.id)
    rt.step(silent.id, [user("x")])
    check_group(rt, silent.id)


class _Where:
    """A primary agent noting the thread each of its steps ran on, and holding a step
    while `hold` is clear (set by default)."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.inside = threading.Event()

    def factory(self, config: dict[str, object]) -> _Where:
        return self

    def step(self, context: object, messages: object) -> list[MessageCreate]:
        self.threads.append(threading.get_ident())
        self.inside.set()
        assert self.hold.wait(30)
        return [MessageCreate(role="assistant", content="ok")]


def _idle(rt: Runtime, group_id: str) -> bool:
    """Whether the group's actor is up and idle (it may have answered a turn and not yet
    let go of its lock: a caller then leaves the turn to it), waiting a little for it."""

    def idle() -> bool:
        address = rt._running_group(group_id)
        local = None if address is None else address._local
        return local is not None and not local._serving.locked()  # type: ignore[attr-defined]

    return wait_until(idle)


def _on_a_thread(call: object) -> object:
    """`call()` on a new thread (not the main one), its result or error returned."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())  # type: ignore[operator]
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return outcome[0]


def test_a_turn_on_an_idle_group_runs_on_its_callers_thread_unless_it_has_a_timeout(
    rt: Runtime,
) -> None:
    """Without a timeout, off the main thread, an idle group's turn is run by its caller
    (one thread woken less each way); with a timeout, on the main thread, or as a
    stream, by the group's actor, as before. Every turn is counted once either way."""
    where = _Where()
    rt.agents.register("where", where.factory)
    group = rt.create_group(primary={"kind": "where"}, sleeptime=[{"kind": "memory"}], frequency=1)
    rt.step(group.id, [user("started")])  # the actor is up (and the main thread waited)
    here: list[int] = []

    def mine(call: str) -> Callable[[], object]:
        def run() -> object:
            here.append(threading.get_ident())
            if call == "step":
                return rt.step(group.id, [user("inline")])
            if call == "record":
                return rt.record_turn(
                    group.id, [user("r"), MessageCreate(role="assistant", content="a")]
                )
            if call == "timeout":
                return rt.step(group.id, [user("t")], timeout=30)
            return list(rt.stream(group.id, [user("s")]))

        return run

    assert _idle(rt, group.id)
    _on_a_thread(mine("step"))
    assert where.threads[-1] == here[-1]
    _on_a_thread(mine("record"))  # (no agent steps in a recorded turn)
    _on_a_thread(mine("timeout"))
    assert where.threads[-1] != here[-1]  # a caller that may give up does not run it
    rt.step(group.id, [user("main")])
    assert where.threads[-1] != threading.get_ident()
    _on_a_thread(mine("stream"))
    assert where.threads[-1] != here[-1]
    assert rt.get_group(group.id).turns == 6
    rt.wait_for_runs([r.id for r in rt.list_runs(group_id=group.id)], timeout=60)
    check_group(rt, group.id)


def test_a_caller_never_goes_ahead_of_a_turn_admitted_before_it_nor_starves_the_actor(
    rt: Runtime,
) -> None:
    """While a turn runs (held in its agent), a second caller's turn is queued behind it,
    not run by its caller; a settings change told meanwhile is handled before the turns
    that come after it, however fast a caller takes them."""
    where = _Where()
    rt.agents.register("where", where.factory)
    group = rt.create_group(primary={"kind": "where"}, sleeptime=[{"kind": "memory"}], frequency=1)
    rt.step(group.id, [user("started")])
    where.hold.clear()
    where.inside.clear()
    first = threading.Thread(target=lambda: rt.step(group.id, [user("first")]))
    first.start()
    assert where.inside.wait(30)
    second_result: list[object] = []
    second = threading.Thread(
        target=lambda: second_result.append(rt.step(group.id, [user("second")]))
    )
    second.start()
    changed: list[object] = []
    change = threading.Thread(target=lambda: changed.append(rt.update_group(group.id, frequency=3)))
    change.start()
    where.hold.set()
    for thread in (first, second, change):
        thread.join(30)
    assert changed and second_result
    stop, hammered = threading.Event(), threading.Semaphore(0)

    def hammer() -> None:  # turns one after the other, each run by this caller if it can
        while not stop.is_set():
            rt.step(group.id, [user("h")])
            hammered.release()

    hammering = threading.Thread(target=hammer)
    hammering.start()
    try:
        for _ in range(5):  # the caller is under way
            assert hammered.acquire(timeout=30)
        update: list[object] = []
        change = threading.Thread(
            target=lambda: update.append(rt.update_group(group.id, frequency=2))
        )
        change.start()
        change.join(30)
        assert update and update[0].frequency == 2  # type: ignore[attr-defined]  # not starved
        assert hammered.acquire(timeout=30)  # and the caller goes on after it
    finally:
        stop.set()
        hammering.join(30)
    history = [m.text() for m in rt.list_messages(group.primary_agent_id) if m.role == "user"]
    assert history[:3] == ["started", "first", "second"]
    rt.wait_for_runs([r.id for r in rt.list_runs(group_id=group.id)], timeout=60)
    check_group(rt, group.id)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    calls=st.lists(
        st.sampled_from(["step", "step_timeout", "record", "stream", "settings"]),
        min_size=8,
        max_size=40,
    ),
    threads=st.integers(2, 6),
)
def test_mixed_calls_from_many_threads_count_every_turn_once(
    rt: Runtime, calls: list[str], threads: int
) -> None:
    """Turns run by their callers, by the actor, streamed, with timeouts, and settings
    changes, from several threads at once on one group: every turn stored once, in one
    order, and the group's invariants hold."""
    rt.agents.register("echo", Echo)
    group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}], frequency=2)

    def call(index_kind: tuple[int, str]) -> int:
        index, kind = index_kind
        text = [user(f"c{index}")]
        if kind == "step":
            rt.step(group.id, text)
        elif kind == "step_timeout":
            rt.step(group.id, text, timeout=30)
        elif kind == "record":
            rt.record_turn(group.id, [*text, MessageCreate(role="assistant", content="a")])
        elif kind == "stream":
            list(rt.stream(group.id, text))
        else:
            rt.update_group(group.id, frequency=1 + index % 3)
            return 0
        return 1

    with ThreadPoolExecutor(threads) as pool:
        turns = sum(pool.map(call, enumerate(calls)))
    assert rt.get_group(group.id).turns == turns
    users = [m.text() for m in rt.list_messages(group.primary_agent_id) if m.role == "user"]
    assert sorted(users) == sorted(f"c{i}" for i, k in enumerate(calls) if k != "settings")
    runs = rt.list_runs(group_id=group.id)
    rt.wait_for_runs([r.id for r in runs], timeout=60)
    check_group(rt, group.id)
