"""Letta's own scenario and the trigger table, end to end on real actors and SQLite."""

from __future__ import annotations

import pytest

from actors import Runtime
from messages import RunStatus
from tests.agents import user


def test_frequency_two_fires_on_turns_one_three_five(rt: Runtime) -> None:
    group = rt.create_group(
        primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=2
    )
    agent_id = group.sleeptime_agent_ids[0]
    fired_on = []
    for turn in range(1, 7):
        result = rt.step(group.id, [user(f"turn {turn}: my turn number is {turn}")])
        assert result.turn == turn
        assert result.fired == (len(result.run_ids) == 1)
        if result.fired:
            fired_on.append(turn)
            runs = rt.wait_for_runs(result.run_ids, timeout=30)
            assert [r.status for r in runs] == [RunStatus.COMPLETED]
        else:
            assert result.run_ids == []
        assert len(rt.list_runs(agent_id=agent_id)) == len(fired_on)
    assert fired_on == [1, 3, 5]
    stored = rt.get_group(group.id)
    assert (stored.turns, stored.counter) == (6, 1)


@pytest.mark.parametrize(
    ("frequency", "expected"),
    [(None, [1, 2, 3, 4, 5, 6]), (1, [1, 2, 3, 4, 5, 6]), (3, [1, 4]), (0, [])],
)
def test_trigger_table_end_to_end(rt: Runtime, frequency: int | None, expected: list[int]) -> None:
    group = rt.create_group(
        primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=frequency
    )
    fired = [turn for turn in range(1, 7) if rt.step(group.id, [user(f"hello {turn}")]).fired]
    assert fired == expected
    stored = rt.get_group(group.id)
    # None and 0 leave the counter alone.
    assert stored.counter == (-1 if frequency in (None, 0) else (6 - 1) % frequency)


def test_memory_improves_the_primary_answer(rt: Runtime) -> None:
    group = rt.create_group(
        primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
    )
    first = rt.step(group.id, [user("my favorite color is orange")])
    rt.wait_for_runs(first.run_ids, timeout=30)
    second = rt.step(group.id, [user("what is my favorite color?")])
    assert second.messages[0].text() == "Your favorite color is orange."
    third = rt.step(group.id, [user("my favorite color is coral")])
    rt.wait_for_runs(third.run_ids, timeout=30)
    human = rt.get_blocks(group.primary_agent_id)["human"].value
    assert human.splitlines() == ["favorite color: coral"]
    assert rt.step(group.id, [user("what's my favorite color?")]).messages[0].text() == (
        "Your favorite color is coral."
    )
