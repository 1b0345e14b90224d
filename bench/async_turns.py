"""The asyncio API under load: 1,000 concurrent `await rt.step(...)` on one event loop.

One runtime, 100 groups of zero-latency simulated agents (1 sleeptime agent each, frequency 1,
as in `bench/run.py`). In the same run, the same number of turns twice: from the synchronous
API, driven by 100 threads (one per group), then from `AsyncRuntime`, driven by 1,000
coroutines on one loop (10 per group), each taking its turns one after the other. A turn
counts when its call returned (committed). Meanwhile a ticker coroutine sleeps 5 ms again and
again: how late it wakes is the event loop's lag. A sampler thread counts the process's
threads.

    python bench/async_turns.py              # 3,000 turns per API on a new SQLite file
    python bench/async_turns.py --quick      # 1,000 turns per API
    python bench/async_turns.py --db postgresql://user@127.0.0.1:5432/bench

Targets (issue 16): event loop lag p99 below 10 ms; the process's threads while the
coroutines wait bounded by the runtime's own (its threads with every group active, plus the
AsyncRuntime's executor): no thread per waiting call; turns/s of the asyncio API at least those
of the synchronous one (ratio >= 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import AsyncRuntime, Runtime
from actors.async_runtime import DEFAULT_BLOCKING_THREADS
from bench.cases import MESSAGE, RUNS_TIMEOUT_S, SIMULATED, CaseResult
from bench.drive import drive
from bench.report import Target
from cli.loadsim import percentile
from messages import RunStatus

GROUPS = 100
CALLERS = 1000
THREADS = 100
TICK_S = 0.005
TARGET_LAG_P99_MS = 10.0
TARGET_RATIO = 1.0


def percentile_ms(values: list[float], percent: float) -> float | None:
    return 1000 * percentile(sorted(values), percent) if values else None


class ThreadSampler:
    """Counts the process's threads every few milliseconds, on a thread of its own (not
    counted in `peak`)."""

    def __init__(self, every_s: float = 0.005) -> None:
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-sampler", daemon=True)
        self.peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, threading.active_count() - 1)

    def __enter__(self) -> ThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(slots=True)
class Phase:
    """One API's share of the run."""

    api: str
    callers: int
    turns: int
    seconds: float
    cpu_ms_per_turn: float
    p50_ms: float | None
    p99_ms: float | None
    peak_threads: int
    errors: int = 0
    run_ids: list[str] = field(default_factory=list, repr=False)

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        figures = asdict(self)
        del figures["run_ids"]
        return {**figures, "turns_per_s": self.turns_per_s}


def sync_phase(rt: Runtime, ids: list[str], turns_per_group: int) -> Phase:
    """`rt.step` from one thread per group."""
    with ThreadSampler() as threads:
        cpu = time.process_time()
        done = drive(ids, turns_per_group, THREADS, lambda g: rt.step(g, MESSAGE).run_ids)
        cpu = time.process_time() - cpu
    return Phase(
        api=f"sync, {THREADS} threads",
        callers=THREADS,
        turns=done.calls,
        seconds=done.seconds,
        cpu_ms_per_turn=1000 * cpu / max(1, done.calls),
        p50_ms=done.percentile_ms(50),
        p99_ms=done.percentile_ms(99),
        peak_threads=threads.peak,
        errors=done.errors,
        run_ids=[run_id for ids_ in done.results for run_id in ids_],
    )


async def async_phase(
    art: AsyncRuntime, ids: list[str], turns_per_caller: int
) -> tuple[Phase, list[float]]:
    """`await art.step` from `CALLERS` coroutines on this loop; and the loop's lags."""
    lags: list[float] = []
    latencies: list[float] = []
    run_ids: list[str] = []
    errors: list[BaseException] = []
    finished = asyncio.Event()

    async def ticker() -> None:
        while not finished.is_set():
            began = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lags.append(max(0.0, time.perf_counter() - began - TICK_S))

    async def caller(index: int) -> None:
        group_id = ids[index % len(ids)]
        for _ in range(turns_per_caller):
            began = time.perf_counter()
            try:
                result = await art.step(group_id, MESSAGE)
            except Exception as error:
                errors.append(error)
                continue
            latencies.append(time.perf_counter() - began)
            run_ids.extend(result.run_ids)

    ticking = asyncio.ensure_future(ticker())
    with ThreadSampler() as threads:
        cpu = time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(caller(index) for index in range(CALLERS)))
        seconds = time.perf_counter() - began
        cpu = time.process_time() - cpu
    finished.set()
    await ticking
    phase = Phase(
        api=f"async, {CALLERS:,} coroutines",
        callers=CALLERS,
        turns=len(latencies),
        seconds=seconds,
        cpu_ms_per_turn=1000 * cpu / max(1, len(latencies)),
        p50_ms=percentile_ms(latencies, 50),
        p99_ms=percentile_ms(latencies, 99),
        peak_threads=threads.peak,
        errors=len(errors),
        run_ids=run_ids,
    )
    return phase, lags


def measure(url: str, turns_per_group: int, workers: int = 32) -> dict[str, Any]:
    """Both phases on one runtime; the figures, the lags and the thread counts."""
    turns_per_caller = max(1, turns_per_group * GROUPS // CALLERS)
    rt = Runtime.start(url, workers=workers)
    art = AsyncRuntime.wrap(rt)
    try:
        ids = [
            rt.create_group(primary=SIMULATED, sleeptime=[SIMULATED], frequency=1).id
            for _ in range(GROUPS)
        ]
        warm = drive(ids, 1, THREADS, lambda g: rt.step(g, MESSAGE).run_ids)
        rt.wait_for_runs([r for ids_ in warm.results for r in ids_], timeout=RUNS_TIMEOUT_S)
        own_threads = threading.active_count()  # every group's and agent's actor is up

        sync = sync_phase(rt, ids, turns_per_group)
        rt.wait_for_runs(sync.run_ids, timeout=RUNS_TIMEOUT_S)
        phase, lags = asyncio.run(async_phase(art, ids, turns_per_caller))
        runs = rt.wait_for_runs(phase.run_ids, timeout=RUNS_TIMEOUT_S)
        stats = rt.stats()
    finally:
        asyncio.run(art.stop(drain_timeout=30))
    return {
        "database": make_url(url).get_backend_name(),
        "groups": GROUPS,
        "sync": sync.to_json(),
        "async": phase.to_json(),
        "ratio_async_to_sync": phase.turns_per_s / sync.turns_per_s if sync.turns_per_s else 0.0,
        "loop_lag_p50_ms": percentile_ms(lags, 50),
        "loop_lag_p99_ms": percentile_ms(lags, 99),
        "loop_lag_max_ms": 1000 * max(lags) if lags else None,
        "loop_ticks": len(lags),
        "runtime_threads": own_threads,
        "blocking_threads": DEFAULT_BLOCKING_THREADS,
        "runs_completed": sum(run.status is RunStatus.COMPLETED for run in runs),
        "restarts": stats["restarts"],
    }


def targets(figures: dict[str, Any]) -> list[Target]:
    """Issue 16's lines, PASS/MISS with the figures."""
    lag = figures["loop_lag_p99_ms"]
    bound = figures["runtime_threads"] + figures["blocking_threads"]
    peak = figures["async"]["peak_threads"]
    ratio = figures["ratio_async_to_sync"]
    return [
        Target(
            f"async: loop lag p99 < {TARGET_LAG_P99_MS:g} ms",
            None if lag is None else lag < TARGET_LAG_P99_MS,
            "not measured"
            if lag is None
            else f"{lag:.2f} ms (p50 {figures['loop_lag_p50_ms']:.2f})",
        ),
        Target(
            "async: threads bounded by the runtime's own",
            peak <= bound,
            f"peak {peak} while {CALLERS:,} calls waited; the runtime's own {bound} "
            f"({figures['runtime_threads']} + executor {figures['blocking_threads']})",
        ),
        Target(
            f"async: turns/s >= {TARGET_RATIO:g}x sync ({THREADS} threads)",
            ratio >= TARGET_RATIO,
            f"{ratio:.2f}x ({figures['async']['turns_per_s']:,.0f} against "
            f"{figures['sync']['turns_per_s']:,.0f} turns/s)",
        ),
    ]


def rows(figures: dict[str, Any]) -> list[CaseResult]:
    """The two phases as rows of `bench/run.py`'s table."""
    found = []
    for key in ("sync", "async"):
        phase = figures[key]
        notes = [
            f"CPU {phase['cpu_ms_per_turn']:.2f} ms/turn",
            f"peak {phase['peak_threads']} threads",
        ]
        if key == "async":
            notes.append(f"loop lag p99 {figures['loop_lag_p99_ms']:.2f} ms")
        found.append(
            CaseResult(
                case=phase["api"],
                groups=figures["groups"],
                turns=phase["turns"],
                seconds=phase["seconds"],
                threads=phase["callers"],
                p50_ms=phase["p50_ms"],
                p99_ms=phase["p99_ms"],
                errors=phase["errors"],
                notes=notes,
                details=figures if key == "async" else {},
            )
        )
    return found


def render(figures: dict[str, Any]) -> str:
    """The figures as a table, then the targets."""
    header = ["api", "turns", "turns/s", "p50 ms", "p99 ms", "CPU ms/turn", "peak threads"]
    lines = [
        [
            phase["api"],
            f"{phase['turns']:,}",
            f"{phase['turns_per_s']:,.1f}",
            f"{phase['p50_ms']:.1f}",
            f"{phase['p99_ms']:.1f}",
            f"{phase['cpu_ms_per_turn']:.2f}",
            str(phase["peak_threads"]),
        ]
        for phase in (figures["sync"], figures["async"])
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]

    def row(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    out = [
        f"asyncio API against the synchronous one: {figures['groups']} groups, zero-latency "
        f"simulated agents, on {figures['database']}",
        "",
        row(header),
        "  ".join("-" * width for width in widths),
        *(row(line) for line in lines),
        "",
        f"async / sync turns/s           {figures['ratio_async_to_sync']:.2f}x",
        f"event loop lag p50 / p99 / max {figures['loop_lag_p50_ms']:.2f} / "
        f"{figures['loop_lag_p99_ms']:.2f} / {figures['loop_lag_max_ms']:.2f} ms "
        f"({figures['loop_ticks']:,} ticks of {TICK_S * 1000:g} ms)",
        f"runtime's own threads          {figures['runtime_threads']} (+ executor "
        f"{figures['blocking_threads']}), restarts {figures['restarts']}",
        "",
        "targets:",
    ]
    out += [f"  {t.verdict}  {t.name:<44} {t.detail}" for t in targets(figures)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", metavar="URL", help="database URL (default: a new SQLite file)")
    parser.add_argument("--quick", action="store_true", help="10 turns per group, not 30")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sleeptime-bench-async-") as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'async.db'}"
        figures = measure(url, 10 if args.quick else 30)
    print(render(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
