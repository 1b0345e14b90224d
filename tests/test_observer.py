"""The observer interface: a no-op by default, and several observers told every fact."""

from __future__ import annotations

from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from actors._observer import (
    NO_OBSERVER,
    NO_TURN,
    NO_WATCH,
    Observer,
    RequestWatch,
    TurnWatch,
    Watch,
    actor_kind,
    combine,
)
from messages import Run, RunStatus
from persistence import Transition

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RUN = Run(
    id="run-1",
    group_id="group-1",
    agent_id="agent-2",
    status=RunStatus.CREATED,
    turn=1,
    window_first_seq=1,
    window_last_seq=2,
    created_at=NOW,
)


class Told(Observer):
    """Writes down every fact it is told, in order, under its name."""

    def __init__(self, name: str, told: list[str]) -> None:
        self.name = name
        self.told = told

    def caller_context(self) -> Any:
        return f"{self.name}-context"

    def turn(self, group_id: str, agent_id: str, parent: Any) -> TurnWatch:
        self.told.append(f"{self.name}: turn {group_id} {agent_id} {parent}")
        return _TurnNotes(self.name, self.told)

    def run_committed(self, run: Run, change: Transition, started_at: datetime | None) -> None:
        self.told.append(f"{self.name}: {run.id} {change.new.value}")

    def run_step(self, run: Run, attempt: int) -> Watch:
        return _Notes(f"{self.name} step {run.id}", self.told)

    def model_request(
        self, agent_id: str, group_id: str, run_id: str | None, model: str
    ) -> RequestWatch:
        return _RequestNotes(f"{self.name} request {model}", self.told)

    def actor_restarted(self, identity: str, incarnation: int) -> None:
        self.told.append(f"{self.name}: restarted {identity} {incarnation}")

    def batch_committed(self, writes: int, seconds: float) -> None:
        self.told.append(f"{self.name}: batch {writes}")


class _Notes(Watch):
    def __init__(self, name: str, told: list[str]) -> None:
        self.name, self.told = name, told

    def __enter__(self) -> Self:
        self.told.append(f"{self.name} in")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.told.append(f"{self.name} out{'' if exc is None else f' ({exc})'}")


class _TurnNotes(TurnWatch):
    def __init__(self, name: str, told: list[str]) -> None:
        self.name, self.told = name, told

    def step(self) -> Watch:
        return _Notes(f"{self.name} step", self.told)

    def recorded(self, turn: int, fired: bool, runs: Any, error: BaseException | None) -> None:
        self.told.append(f"{self.name} recorded {turn} {fired} {len(runs)}")


class _RequestNotes(RequestWatch, _Notes):
    def failed(self, outcome: str, error: BaseException) -> None:
        self.told.append(f"{self.name} failed {outcome}")


def test_the_default_observer_does_nothing_and_shares_its_watches() -> None:
    assert combine([]) is NO_OBSERVER
    assert NO_OBSERVER.caller_context() is None
    watch = NO_OBSERVER.turn("group-1", "agent-1", None)
    assert watch is NO_TURN and watch.step() is NO_WATCH and watch.commit() is NO_WATCH
    with watch as entered:
        assert entered is watch
    assert NO_OBSERVER.run_step(RUN, 1) is NO_WATCH


def test_several_observers_are_each_told_every_fact_in_order() -> None:
    told: list[str] = []
    first, second = Told("a", told), Told("b", told)
    assert combine([first]) is first
    both = combine([first, second])
    assert both.caller_context() == "a-context"
    with both.turn("group-1", "agent-1", "ctx") as turn:
        with turn.step():
            pass
        with turn.commit():  # neither watches commits: their default
            pass
        turn.recorded(3, True, [RUN], None)
    both.run_committed(
        RUN, Transition("run-1", RunStatus.CREATED, RunStatus.RUNNING, NOW, 1, 1), None
    )
    try:
        with both.run_step(RUN, 1):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with both.model_request("agent-2", "group-1", "run-1", "m") as request:
        request.failed("timeout", TimeoutError())
    both.actor_restarted("group:group-1", 2)
    both.batch_committed(7, 0.01)
    both.close()
    assert told == [
        "a: turn group-1 agent-1 ctx",
        "b: turn group-1 agent-1 ctx",
        "a step in",
        "b step in",
        "b step out",
        "a step out",
        "a recorded 3 True 1",
        "b recorded 3 True 1",
        "a: run-1 running",
        "b: run-1 running",
        "a step run-1 in",
        "b step run-1 in",
        "b step run-1 out (boom)",
        "a step run-1 out (boom)",
        "a request m in",
        "b request m in",
        "a request m failed timeout",
        "b request m failed timeout",
        "b request m out",
        "a request m out",
        "a: restarted group:group-1 2",
        "b: restarted group:group-1 2",
        "a: batch 7",
        "b: batch 7",
    ]


def test_actor_kinds() -> None:
    assert [actor_kind(i) for i in ("group:g-1", "agent:a-1", "tracker")] == [
        "group",
        "agent",
        "tracker",
    ]
