"""The run state machine of SPEC 6, checked against a table written from the SPEC itself."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from messages import ALLOWED_TRANSITIONS, TERMINAL_STATUSES, RunStatus, TransitionRefused
from messages._runs import check_transition, is_legal_history

CREATED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    RunStatus.CREATED,
    RunStatus.RUNNING,
    RunStatus.COMPLETED,
    RunStatus.FAILED,
    RunStatus.CANCELLED,
)

# SPEC 6, independent of the code: every other (from, to) pair is refused.
LEGAL = {
    (CREATED, RUNNING),
    (CREATED, CANCELLED),
    (CREATED, FAILED),
    (RUNNING, COMPLETED),
    (RUNNING, FAILED),
    (RUNNING, CANCELLED),
    (RUNNING, CREATED),  # re-queued after an interruption
}
TERMINAL = {COMPLETED, FAILED, CANCELLED}
ALL_PAIRS = list(itertools.product(RunStatus, RunStatus))
# A legal history that ends at each status.
REACH = {
    CREATED: [CREATED],
    RUNNING: [CREATED, RUNNING],
    COMPLETED: [CREATED, RUNNING, COMPLETED],
    FAILED: [CREATED, FAILED],
    CANCELLED: [CREATED, RUNNING, CANCELLED],
}


def successors(status: RunStatus) -> list[RunStatus]:
    return sorted(to for frm, to in LEGAL if frm is status)


def test_there_are_five_statuses() -> None:
    assert {s.value for s in RunStatus} == {
        "created",
        "running",
        "completed",
        "failed",
        "cancelled",
    }


def test_terminal_statuses() -> None:
    assert set(TERMINAL_STATUSES) == TERMINAL
    for status in RunStatus:
        assert status.terminal is (status in TERMINAL)


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=lambda s: s.value)
def test_every_pair(current: RunStatus, new: RunStatus) -> None:
    legal = (current, new) in LEGAL
    assert (new in ALLOWED_TRANSITIONS[current]) is legal
    assert is_legal_history([*REACH[current], new]) is legal
    if legal:
        check_transition("run-1", current, new)
    else:
        with pytest.raises(TransitionRefused) as refused:
            check_transition("run-1", current, new)
        message = str(refused.value)
        assert "run-1" in message
        assert current.value in message
        assert new.value in message
        assert (refused.value.run_id, refused.value.current, refused.value.new) == (
            "run-1",
            current.value,
            new.value,
        )


def test_table_covers_every_status() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(RunStatus)
    for status in TERMINAL:
        assert ALLOWED_TRANSITIONS[status] == frozenset()


@pytest.mark.parametrize(
    "history",
    [
        [CREATED],
        [CREATED, RUNNING, COMPLETED],
        [CREATED, CANCELLED],
        [CREATED, FAILED],
        [CREATED, RUNNING, CREATED, RUNNING, FAILED],
        [CREATED, RUNNING, CANCELLED],
        [CREATED, RUNNING],
    ],
)
def test_legal_histories(history: list[RunStatus]) -> None:
    assert is_legal_history(history)


@pytest.mark.parametrize(
    "history",
    [
        [],
        [RUNNING],
        [RUNNING, COMPLETED],
        [CREATED, COMPLETED],
        [CREATED, CREATED],
        [CREATED, RUNNING, RUNNING],
        [CREATED, CANCELLED, RUNNING],
        [CREATED, RUNNING, COMPLETED, FAILED],
        [CREATED, RUNNING, CANCELLED, COMPLETED],
    ],
)
def test_illegal_histories(history: list[RunStatus]) -> None:
    assert not is_legal_history(history)


statuses = st.sampled_from(list(RunStatus))


@st.composite
def legal_walks(draw: st.DrawFn) -> list[RunStatus]:
    """A history that starts at created and only takes steps of SPEC 6."""
    history = [CREATED]
    for _ in range(draw(st.integers(0, 30))):
        options = successors(history[-1])
        if not options:
            break
        history.append(draw(st.sampled_from(options)))
    return history


@given(legal_walks())
def test_legal_walks_are_legal_histories(history: list[RunStatus]) -> None:
    assert is_legal_history(history)


@given(
    prefix=legal_walks().filter(lambda h: h[-1] in TERMINAL),
    after=statuses,
    rest=st.lists(statuses, max_size=5),
)
def test_any_step_out_of_a_terminal_status_is_illegal(
    prefix: list[RunStatus], after: RunStatus, rest: list[RunStatus]
) -> None:
    assert not is_legal_history([*prefix, after, *rest])


@given(
    first=st.sampled_from([s for s in RunStatus if s is not CREATED]),
    rest=st.lists(statuses, max_size=10),
)
def test_histories_not_starting_with_created_are_illegal(
    first: RunStatus, rest: list[RunStatus]
) -> None:
    assert not is_legal_history([first, *rest])


@given(st.lists(statuses, max_size=12))
def test_is_legal_history_matches_the_spec_model(history: list[RunStatus]) -> None:
    expected = (
        bool(history)
        and history[0] is CREATED
        and all(pair in LEGAL for pair in itertools.pairwise(history))
    )
    assert is_legal_history(history) is expected
