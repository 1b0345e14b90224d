"""The tracker's open runs, kept by id and by agent (`actors.tracker.OpenRuns`).

A (re)started agent's actor asks for its own open runs at every activation: the index by
agent must always say exactly what a scan of every open run would."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.tracker import OpenRuns, _Open, _opened
from messages import Run, RunStatus

AGENTS = ["agent-a", "agent-b", "agent-c"]


def run(number: int, agent: str) -> Run:
    return Run(
        id=f"run-{number}",
        group_id="group-1",
        agent_id=agent,
        status=RunStatus.CREATED,
        turn=number,
        window_first_seq=1,
        window_last_seq=2,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


operations = st.lists(
    st.tuples(
        st.sampled_from(["set", "setdefault", "pop"]),
        st.integers(0, 12),
        st.sampled_from(AGENTS),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_the_runs_of_an_agent_are_what_a_scan_of_every_open_run_finds(
    steps: list[tuple[str, int, str]],
) -> None:
    open_runs = OpenRuns()
    model: dict[str, _Open] = {}
    agent_of: dict[int, str] = {}  # a run's agent never changes
    for operation, number, drawn in steps:
        agent = agent_of.setdefault(number, drawn)
        run_id = f"run-{number}"
        if operation == "set":
            open_runs[run_id] = model[run_id] = _opened(run(number, agent))
        elif operation == "setdefault":
            kept = open_runs.setdefault(run_id, _opened(run(number, agent)))
            assert kept is model.setdefault(run_id, kept)
        else:
            assert open_runs.pop(run_id) is model.pop(run_id, None)
        assert len(open_runs) == len(model)
        assert sorted(open_runs.items(), key=lambda item: item[0]) == sorted(model.items())
        for each in AGENTS:
            scanned = [found for found in model.values() if found.run.agent_id == each]
            assert sorted(map(id, open_runs.of_agent(each))) == sorted(map(id, scanned))
        for number_ in range(13):
            assert (f"run-{number_}" in open_runs) == (f"run-{number_}" in model)
            assert open_runs.get(f"run-{number_}") is model.get(f"run-{number_}")


def test_an_agent_with_no_open_run_leaves_nothing_behind() -> None:
    open_runs = OpenRuns()
    open_runs["run-1"] = _opened(run(1, "agent-a"))
    assert [found.run.id for found in open_runs.of_agent("agent-a")] == ["run-1"]
    assert open_runs.pop("run-1") is not None
    assert open_runs.of_agent("agent-a") == []
    assert open_runs._by_agent == {}  # no empty entry kept per agent ever seen
    assert open_runs.pop("run-1") is None
