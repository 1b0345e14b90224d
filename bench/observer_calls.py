"""What the observers' own calls cost: CPU per turn and its run, away from the runtime.

`bench/observability.py` measures metrics and tracing end to end, where the machine's
noise (the same mode measures 20% apart from one process to the next on a shared 2-core
box) is larger than what it looks for. This one makes, on one thread, exactly the calls
the runtime makes for one turn that fires one run (the caller's context, the turn's watch
with its step and commit, the run's step, the run's start and end committed) and times
them with the thread's CPU clock, for: metrics; tracing with every turn sampled; tracing
with one turn in ten (the SDK's parent-based ratio sampler); tracing with none kept. The
spans go through a `BatchSpanProcessor` into an exporter that drops them. Ending a run's
span happens on the tracing's own thread (`actors/tracing.py`): that CPU is measured
apart, as the process's CPU minus this thread's.

    python bench/observer_calls.py                  # 20,000 turns per mode, 3 rounds
    python bench/observer_calls.py --turns 5000 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from actors._observer import Observer
from actors.metrics import RuntimeMetrics
from actors.tracing import RuntimeTracing
from messages import Run, RunStatus
from persistence import Transition


class _Dropped(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _runs(count: int) -> list[Run]:
    now = datetime.now(UTC)
    return [
        Run(
            id=f"run-{number}",
            group_id="group-1",
            agent_id="agent-1",
            status=RunStatus.CREATED,
            turn=number,
            window_first_seq=1,
            window_last_seq=2,
            created_at=now,
        )
        for number in range(count)
    ]


def _drive(observer: Observer, runs: list[Run]) -> None:
    """The observer calls of one turn firing one run, then of that run, for each run."""
    started = datetime.now(UTC)
    ended = started + timedelta(milliseconds=3)
    for run in runs:
        parent = observer.caller_context()
        with observer.turn(run.group_id, "agent-primary", parent) as watch:
            with watch.step():
                pass
            with watch.commit():
                pass
            watch.recorded(run.turn, True, [run], None)
        with observer.run_step(run, 1):
            pass
        start = Transition(run.id, RunStatus.CREATED, RunStatus.RUNNING, started, 1, 1)
        end = Transition(run.id, RunStatus.RUNNING, RunStatus.COMPLETED, ended, 1, 1)
        observer.run_committed(run, start, None)
        observer.run_committed(run, end, started)


def _baseline(runs: list[Run]) -> None:
    """What `_drive` costs with no observer's work in it (the loop and the transitions)."""
    _drive(Observer(), runs)


def _traced(ratio: float) -> tuple[Callable[[], Observer], Callable[[], None]]:
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    return (lambda: RuntimeTracing(provider)), provider.shutdown


def measure(mode: str, turns: int) -> tuple[float, float]:
    """(us of this thread's CPU, us of the other threads') per turn and its run, beyond
    the loop's own cost."""
    runs = _runs(turns)
    shutdown: Callable[[], None] = lambda: None  # noqa: E731
    if mode == "metrics":
        make: Callable[[], Observer] = RuntimeMetrics
    else:
        ratio = {"tracing, every turn": 1.0, "tracing, 1 in 10": 0.1, "tracing, none kept": 0.0}
        make, shutdown = _traced(ratio[mode])
    loop_began = time.thread_time()
    _baseline(runs)
    loop_s = time.thread_time() - loop_began
    observer = make()
    thread_began, process_began = time.thread_time(), time.process_time()
    _drive(observer, runs)
    observer.close()  # waits for the tracing's thread to end the runs' spans
    thread_s = time.thread_time() - thread_began
    process_s = time.process_time() - process_began
    shutdown()
    here = (thread_s - loop_s) * 1e6 / turns
    elsewhere = max(0.0, process_s - thread_s) * 1e6 / turns
    return here, elsewhere


MODES = ("metrics", "tracing, every turn", "tracing, 1 in 10", "tracing, none kept")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20_000, help="turns per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each mode")
    options = parser.parse_args()
    if options.turns < 1 or options.rounds < 1:
        parser.error("--turns and --rounds must be at least 1")
    figures: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for _ in range(options.rounds):
        for mode in MODES:
            figures[mode].append(measure(mode, options.turns))
    print(f"CPU per turn and its run, us (medians of {options.rounds} x {options.turns:,} turns)")
    print(f"{'observer':<22} {'in the calls':>12} {'own threads':>11} {'total':>7}")
    for mode in MODES:
        here = statistics.median(h for h, _ in figures[mode])
        elsewhere = statistics.median(e for _, e in figures[mode])
        print(f"{mode:<22} {here:12.1f} {elsewhere:11.1f} {here + elsewhere:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
