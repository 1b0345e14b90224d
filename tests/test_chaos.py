"""Chaos: actors crash and agents fail at random; afterwards every invariant holds.

Chaos is wired in from outside (no production class takes a chaos parameter) and its
decisions are the same for the same seed, identity and incarnation."""

from __future__ import annotations

import ast
import inspect
import random
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import actors
from actors import Chaos, RestartPolicy, Runtime
from actors._address import Address
from actors._chaos import (
    ChaosAgent,
    CrashInjection,
    InjectedCrash,
    InjectedFailure,
    failing_steps,
)
from actors._execute import execute_run
from actors._protocol import Ask
from actors._scheduler import Scheduler
from actors._supervised import CrashReporter, SupervisedActor
from actors._supervisor import ChildSpec, Supervisor
from actors.group import GroupActor
from actors.sleeptime_agent import SleeptimeAgentActor
from actors.tracker import RunTrackerActor
from messages import MessageCreate, RunStatus, SleeptimeError, StopReason
from tests.agents import Echo, user

SIMULATED = {"kind": "simulated", "config": {"latency_ms": 1, "jitter_ms": 1, "seed": 5}}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_crashes_and_failures_cost_nothing_but_time(db_url: str, seed: int) -> None:
    chaos = Chaos(crash_rate=0.05, failure_rate=0.1, seed=seed)
    policy = RestartPolicy(
        max_restarts=100, within_seconds=10, backoff_base=0.001, backoff_max=0.02
    )
    with Runtime.start(db_url, chaos=chaos, restart_policy=policy) as rt:
        groups = [
            rt.create_group(
                primary={"kind": "scripted"},
                sleeptime=[{"kind": "memory"}, SIMULATED],
                frequency=frequency,
                max_attempts=20,
            ).id
            for frequency in (None, 1, 2, 3, 1, 2)
        ]

        def drive(group_id: str) -> list[str]:
            run_ids = []
            for n in range(12):  # a turn that raised would fail the test, as it should
                run_ids += rt.step(group_id, [user(f"my number is {n}")]).run_ids
            return run_ids

        with ThreadPoolExecutor(len(groups)) as pool:
            run_ids = [r for ids in pool.map(drive, groups) for r in ids]
        runs = rt.wait_for_runs(run_ids, timeout=120)
        stats = rt.stats()
        report = rt.check_invariants()
    assert report.ok, report.violations
    assert stats["injected_crashes"] > 0 and stats["restarts"] > 0
    assert stats["escalations"] == 0
    failed = [r for r in runs if r.status is RunStatus.FAILED]
    assert failed, "some agent steps failed on purpose"
    assert all(r.stop_reason is StopReason.ERROR and "chaos" in (r.error or "") for r in failed)
    assert {r.status for r in runs} <= {RunStatus.COMPLETED, RunStatus.FAILED}


# -- chaos is applied from outside, and decides by seed --------------------------------------

PRODUCTION = [
    GroupActor.__init__,
    SleeptimeAgentActor.__init__,
    RunTrackerActor.__init__,
    SupervisedActor.__init__,
    CrashReporter.__init__,
    Supervisor.__init__,
    Address.__init__,
    execute_run,
]
CHAOS_WORDS = ("chaos", "dice", "inject", "crash_rate", "failure_rate", "strike")
WIRING = {"__init__.py", "_arguments.py", "_chaos.py", "_parts.py", "runtime.py"}


@pytest.mark.parametrize("function", PRODUCTION, ids=lambda f: f.__qualname__)
def test_production_classes_take_no_chaos_parameters(function: Any) -> None:
    names = list(inspect.signature(function).parameters)
    assert not [n for n in names if any(word in n.lower() for word in CHAOS_WORDS)], names


def test_only_the_wiring_imports_chaos() -> None:
    importers = set()
    for path in Path(actors.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "actors._chaos":
                importers.add(path.name)
    assert importers <= WIRING, importers - WIRING


@dataclass(frozen=True)
class Note:
    n: int


@dataclass(frozen=True)
class Notes(Ask[list[tuple[int, int]]]):
    reply: Future[list[tuple[int, int]]] = field(default_factory=Future)


class Notebook(SupervisedActor):
    """Notes each number with the incarnation that handled it."""

    def __init__(self, reporter: CrashReporter, notes: list[tuple[int, int]]) -> None:
        super().__init__(reporter)
        self._notes = notes
        self._incarnation = reporter.address.incarnation

    def receive(self, message: Any) -> Any:
        if isinstance(message, Notes):
            return list(self._notes)
        self._notes.append((message.n, self._incarnation))
        return None


def _crash_pattern(chaos: Chaos) -> tuple[list[tuple[int, int]], int]:
    """Tell 40 numbers to a notebook that chaos crashes: who handled which, and crashes."""
    scheduler = Scheduler()
    supervisor = Supervisor(scheduler)
    crashes = CrashInjection(chaos)
    notes: list[tuple[int, int]] = []
    policy = RestartPolicy(max_restarts=1000, backoff_base=0.0005, backoff_max=0.002)
    try:
        address = supervisor.supervise(
            ChildSpec(
                "notebook",
                lambda reporter: Notebook.start(reporter, notes),
                escalate=lambda reason: None,
                policy=policy,
                wrap=crashes.wrapper,
            )
        )
        for n in range(40):
            address.tell(Note(n))
        handled: list[tuple[int, int]] = address.ask(Notes(), timeout=30)
        supervisor.stop("notebook", SleeptimeError("done"))
        return handled, crashes.injected
    finally:
        scheduler.close()


def test_injected_crashes_are_the_same_for_the_same_seed() -> None:
    first, crashed = _crash_pattern(Chaos(crash_rate=0.3, seed=7))
    again, crashed_again = _crash_pattern(Chaos(crash_rate=0.3, seed=7))
    other, _ = _crash_pattern(Chaos(crash_rate=0.3, seed=8))
    assert [n for n, _ in first] == list(range(40))  # each once, in order: nothing lost
    assert crashed > 0 and first[-1][1] > 0  # it crashed, and later incarnations took over
    assert (again, crashed_again) == (first, crashed)
    assert other != first


def test_only_crash_limit_and_after_shape_the_crashes() -> None:
    def crashes(chaos: Chaos, identity: str, messages: int = 50) -> int:
        wrapper = CrashInjection(chaos).wrapper(Address(identity))
        if wrapper is None:
            return 0
        count = 0
        for n in range(messages):
            try:
                wrapper(n, lambda message: None)
            except InjectedCrash:
                count += 1
        return count

    assert crashes(Chaos(crash_rate=1.0, only="tracker"), "group:g1") == 0
    assert crashes(Chaos(crash_rate=1.0, only="tracker"), "tracker") == 50
    assert crashes(Chaos(crash_rate=1.0, crash_limit=3), "agent:a1") == 3
    assert crashes(Chaos(crash_rate=1.0, after=10), "agent:a1") == 40
    assert crashes(Chaos(crash_rate=0.0, failure_rate=1.0), "agent:a1") == 0


class Quiet:
    def step(self, context: Any, messages: list[Any]) -> list[MessageCreate]:
        return []


def _failures(agent: Any, steps: int) -> list[bool]:
    failed = []
    for _ in range(steps):
        try:
            agent.step(None, [])
            failed.append(False)
        except InjectedFailure as error:
            assert "chaos" in str(error)
            failed.append(True)
    return failed


def test_failing_steps_are_the_same_for_the_same_seed_and_incarnation() -> None:
    chaos = Chaos(failure_rate=0.5, seed=3)
    build = failing_steps(lambda kind, config: Quiet(), chaos, "agent-1", 0)
    pattern = _failures(build("quiet", {}), 10) + _failures(build("quiet", {}), 10)
    # One dice per incarnation, whatever is rebuilt: the same as one agent's 20 steps.
    assert pattern == _failures(ChaosAgent(Quiet(), chaos.dice("steps/agent-1", 0), 0.5), 20)
    assert any(pattern) and not all(pattern)
    next_incarnation = failing_steps(lambda kind, config: Quiet(), chaos, "agent-1", 1)
    assert _failures(next_incarnation("quiet", {}), 20) != pattern
    assert _failures(ChaosAgent(Quiet(), random.Random(1), 0.0), 20) == [False] * 20
    assert _failures(ChaosAgent(Quiet(), random.Random(1), 1.0), 20) == [True] * 20


def test_no_failure_rate_builds_the_agent_as_it_is() -> None:
    def build(kind: str, config: Any) -> Quiet:
        return Quiet()

    assert failing_steps(build, Chaos(crash_rate=0.5), "agent-1", 0) is build
    assert failing_steps(build, None, "agent-1", 0) is build


def test_a_runtime_fails_the_same_steps_for_the_same_seed(db_url: str) -> None:
    chaos = Chaos(failure_rate=0.5, seed=21)
    with Runtime.start(db_url, kinds={"echo": Echo}) as rt:
        group = rt.create_group(primary={"kind": "echo"}, sleeptime=[{"kind": "memory"}])

    def twelve_turns() -> list[RunStatus]:
        # The agent's actor starts at incarnation 0 in each runtime: the same dice.
        with Runtime.start(db_url, kinds={"echo": Echo}, chaos=chaos) as rt:
            statuses = []
            for n in range(12):
                run_ids = rt.step(group.id, [user(f"my number is {n}")]).run_ids
                (run,) = rt.wait_for_runs(run_ids, timeout=30)
                assert run.status is RunStatus.COMPLETED or "chaos" in (run.error or "")
                statuses.append(run.status)
            return statuses

    assert twelve_turns() == twelve_turns()
