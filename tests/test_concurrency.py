"""Concurrent callers: turns are serialized per group, nothing lost or counted twice."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import Runtime
from messages import MessageCreate, RunStatus
from tests.agents import Echo, Recorder, Silent, user
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
