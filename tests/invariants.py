"""Checks of SPEC 4-6 over what a runtime stored, through its public API only."""

from __future__ import annotations

from actors import Runtime
from messages._runs import is_legal_history


def check_group(rt: Runtime, group_id: str) -> None:
    """Assert the stored state of one group is consistent (call after the runs finished).

    - every run terminal, and its event history a legal path of the state machine;
    - turns recorded == distinct turns among the primary messages;
    - per sleeptime agent, run windows are contiguous, disjoint, in creation order, and
      cover every primary message up to the cursor exactly once.
    """
    group = rt.get_group(group_id)
    history = rt.list_messages(group.primary_agent_id)
    assert [m.sequence for m in history] == list(range(1, len(history) + 1))
    assert len({m.turn for m in history}) <= group.turns
    cursor_seq = next((m.sequence for m in history if m.id == group.cursor), 0)
    assert (group.cursor is None) == (cursor_seq == 0)
    for agent_id in group.sleeptime_agent_ids:
        runs = rt.list_runs(agent_id=agent_id)
        covered = 0
        for run in sorted(runs, key=lambda r: r.turn):
            assert run.status.terminal, f"run {run.id} is {run.status}"
            assert is_legal_history([e.status for e in rt.run_events(run.id)])
            assert run.window_first_seq == covered + 1, "windows must be contiguous"
            assert run.window_last_seq >= run.window_first_seq
            covered = run.window_last_seq
        assert covered == cursor_seq, "the windows must end at the cursor"
