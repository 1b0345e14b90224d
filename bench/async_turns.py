"""The asyncio API under load: 1,000 concurrent `await rt.step(...)` on one event loop.

One runtime, 100 groups of zero-latency simulated agents (1 sleeptime agent each, frequency 1,
as in `bench/run.py`). In the same run, the same number of turns from each API: the
synchronous one driven by 100 threads (one per group), `AsyncRuntime` by 1,000 coroutines on
one loop (10 per group), each taking its turns one after the other; in the order sync, async,
async, sync, so that both get their share of a heap that grows. A turn counts when its call
returned (committed). Meanwhile a ticker coroutine sleeps 5 ms again and again on that loop:
how late it wakes is the loop's lag. While the threads drive the synchronous API, the same
ticker runs alone on a loop of its own: the lag that any loop in this process has under that
load, whatever it does (the runtime's threads take turns at the GIL with it, and the
collector's passes stop them all). A sampler thread counts the process's threads, and the
collector's pauses are timed.

Then the asyncio API again, on a runtime started on the same database with
`max_turns_in_flight=16` (`--bounded N`): the other callers wait for a permit on the loop,
and fewer group actors contend for the GIL at once, which is what keeps the loop's lag low.

    python bench/async_turns.py              # 4,000 turns per phase on a new SQLite file
    python bench/async_turns.py --quick      # 2,000 turns per phase
    python bench/async_turns.py --db postgresql://user@127.0.0.1:5432/bench
    python bench/async_turns.py --quiet-gc   # the collector frozen once warm (see measure)

Targets (issue 16): event loop lag p99 below 10 ms; the process's threads while the
coroutines wait bounded by the runtime's own (its threads with every group active, plus the
AsyncRuntime's executor): no thread per waiting call; turns/s of the asyncio API at least those
of the synchronous one (ratio >= 1). Also the case `async` of `bench/run.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from messages import Run, RunStatus

GROUPS = 100
CALLERS = 1000
THREADS = 100
TICK_S = 0.005
TARGET_LAG_P99_MS = 10.0
TARGET_RATIO = 1.0
TURNS_PER_GROUP = 40
QUICK_TURNS_PER_GROUP = 20
QUIET_GC_THRESHOLD = 100_000
BOUNDED_IN_FLIGHT = 16
"""`max_turns_in_flight` of the bounded phase: about what two cores keep busy."""


def percentile_ms(values: list[float], percent: float) -> float | None:
    return 1000 * percentile(sorted(values), percent) if values else None


async def tick(lags: list[float], finished: Callable[[], bool]) -> None:
    """Sleep `TICK_S` again and again until `finished()`; note how late each wake-up is."""
    while not finished():
        began = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags.append(max(0.0, time.perf_counter() - began - TICK_S))


class Watch:
    """While entered: the process's peak thread count (sampled by a thread of its own,
    not counted), the GC's pauses, and optionally an idle loop's lags (its thread not
    counted either)."""

    def __init__(self, idle_loop: bool = False) -> None:
        self.peak_threads = 0
        self.lags: list[float] = []
        self.gc_pauses: list[float] = []
        self._own = 2 if idle_loop else 1
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, name="bench-sampler")]
        if idle_loop:
            idle = lambda: asyncio.run(tick(self.lags, self._stop.is_set))  # noqa: E731
            self._threads.append(threading.Thread(target=idle, name="bench-idle-loop"))
        self._gc_began = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_threads = max(self.peak_threads, threading.active_count() - self._own)

    def _collected(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_began = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_began)

    def __enter__(self) -> Watch:
        gc.callbacks.append(self._collected)
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        gc.callbacks.remove(self._collected)


@dataclass(slots=True)
class Phase:
    """One API's share of the run, gathered over its repeats; the loop lag is its loop's
    (for the synchronous API, an idle loop's)."""

    api: str
    callers: int
    seconds: float = 0.0
    cpu_s: float = 0.0
    peak_threads: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    gc_pauses: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    def add(self, watch: Watch, seconds: float, cpu_s: float, lags: list[float]) -> None:
        self.seconds += seconds
        self.cpu_s += cpu_s
        self.peak_threads = max(self.peak_threads, watch.peak_threads)
        self.lags += lags
        self.gc_pauses += watch.gc_pauses

    @property
    def turns(self) -> int:
        return len(self.latencies)

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "api": self.api,
            "callers": self.callers,
            "turns": self.turns,
            "seconds": self.seconds,
            "turns_per_s": self.turns_per_s,
            "cpu_ms_per_turn": 1000 * self.cpu_s / max(1, self.turns),
            "p50_ms": percentile_ms(self.latencies, 50),
            "p99_ms": percentile_ms(self.latencies, 99),
            "peak_threads": self.peak_threads,
            "loop_lag_p50_ms": percentile_ms(self.lags, 50),
            "loop_lag_p99_ms": percentile_ms(self.lags, 99),
            "loop_lag_max_ms": 1000 * max(self.lags) if self.lags else None,
            "gc_pause_total_ms": 1000 * sum(self.gc_pauses),
            "gc_pause_max_ms": 1000 * max(self.gc_pauses, default=0.0),
            "errors": self.errors,
        }


def sync_phase(rt: Runtime, ids: list[str], turns_per_group: int, into: Phase) -> None:
    """`rt.step` from one thread per group; an idle loop ticks meanwhile."""
    with Watch(idle_loop=True) as watch:
        cpu = time.process_time()
        done = drive(ids, turns_per_group, THREADS, lambda g: rt.step(g, MESSAGE).run_ids)
        cpu = time.process_time() - cpu
    into.add(watch, done.seconds, cpu, watch.lags)
    into.latencies += done.latencies
    into.errors += done.errors
    into.run_ids += [run_id for ids_ in done.results for run_id in ids_]


async def async_phase(
    art: AsyncRuntime, ids: list[str], turns_per_caller: int, into: Phase
) -> None:
    """`await art.step` from `CALLERS` coroutines on this loop, which ticks meanwhile."""
    lags: list[float] = []
    finished = False

    async def caller(index: int) -> None:
        group_id = ids[index % len(ids)]
        for _ in range(turns_per_caller):
            began = time.perf_counter()
            try:
                result = await art.step(group_id, MESSAGE)
            except Exception:
                into.errors += 1
                continue
            into.latencies.append(time.perf_counter() - began)
            into.run_ids.extend(result.run_ids)

    ticking = asyncio.ensure_future(tick(lags, lambda: finished))
    with Watch() as watch:
        cpu = time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(caller(index) for index in range(CALLERS)))
        seconds = time.perf_counter() - began
        cpu = time.process_time() - cpu
    finished = True
    await ticking
    into.add(watch, seconds, cpu, lags)


def _warm(rt: Runtime, ids: list[str]) -> None:
    """One turn per group, its runs ended: every group's and agent's actor is up."""
    warm = drive(ids, 1, THREADS, lambda g: rt.step(g, MESSAGE).run_ids)
    rt.wait_for_runs([r for ids_ in warm.results for r in ids_], timeout=RUNS_TIMEOUT_S)


def measure(
    url: str,
    turns_per_group: int = TURNS_PER_GROUP,
    workers: int = 32,
    quiet_gc: bool = False,
    bounded: int | None = BOUNDED_IN_FLIGHT,
) -> dict[str, Any]:
    """The phases on one database: their figures, and the runtime's own threads.

    The synchronous and the asyncio API share one runtime with the default bounds, and run
    in the order sync, async, async, sync (the heap grows as turns are stored, and with it
    the collector's pauses: each API gets its share of early and late). With `bounded`, a
    third phase drives the asyncio API twice more on a runtime started on the same
    database with `max_turns_in_flight=bounded`: the rest of the 1,000 callers wait for
    permits on the loop, and fewer group actors contend for the GIL at once.

    With `quiet_gc`, the garbage collector is set as a latency-minded service would set
    it once warm: what exists is frozen (`gc.freeze()`: its passes no longer walk it) and
    the young generation is collected every `QUIET_GC_THRESHOLD` allocations, not 700.
    """
    turns_per_caller = max(1, turns_per_group * GROUPS // (2 * CALLERS))  # each API twice
    rounds = turns_per_caller * CALLERS // GROUPS  # the same turns from the threads
    part = rounds * GROUPS
    sync = Phase(f"sync, {THREADS} threads", THREADS)
    free = Phase(f"async, {CALLERS:,} coroutines", CALLERS)
    limited = Phase(f"async, {CALLERS:,} coroutines, max_turns_in_flight={bounded}", CALLERS)
    thresholds = gc.get_threshold()
    restarts = 0
    runs: list[Run] = []
    try:
        rt = Runtime.start(url, workers=workers)
        art = AsyncRuntime.wrap(rt)
        try:
            ids = [
                rt.create_group(primary=SIMULATED, sleeptime=[SIMULATED], frequency=1).id
                for _ in range(GROUPS)
            ]
            _warm(rt, ids)
            own_threads = threading.active_count()
            if quiet_gc:
                gc.freeze()
                gc.set_threshold(QUIET_GC_THRESHOLD, *thresholds[1:])
            for phase in (sync, free, free, sync):
                if phase is sync:
                    sync_phase(rt, ids, rounds, sync)
                else:
                    asyncio.run(async_phase(art, ids, turns_per_caller, phase))
                runs += rt.wait_for_runs(phase.run_ids[-part:], timeout=RUNS_TIMEOUT_S)
            restarts += rt.stats()["restarts"]
        finally:
            asyncio.run(art.stop(drain_timeout=30))
            gc.unfreeze()
        if bounded is not None:
            rt = Runtime.start(url, workers=workers, max_turns_in_flight=bounded)
            art = AsyncRuntime.wrap(rt)
            try:
                _warm(rt, ids)
                if quiet_gc:
                    gc.freeze()
                for _ in range(2):
                    asyncio.run(async_phase(art, ids, turns_per_caller, limited))
                    runs += rt.wait_for_runs(limited.run_ids[-part:], timeout=RUNS_TIMEOUT_S)
                restarts += rt.stats()["restarts"]
            finally:
                asyncio.run(art.stop(drain_timeout=30))
                gc.unfreeze()
    finally:
        gc.set_threshold(*thresholds)
    phases = {"sync": sync, "async": free, **({"async_bounded": limited} if bounded else {})}
    return {
        "database": make_url(url).get_backend_name(),
        "quiet_gc": quiet_gc,
        "groups": GROUPS,
        **{key: phase.to_json() for key, phase in phases.items()},
        "ratio_async_to_sync": free.turns_per_s / sync.turns_per_s if sync.turns_per_s else 0.0,
        "bounded": bounded,
        "runtime_threads": own_threads,
        "blocking_threads": DEFAULT_BLOCKING_THREADS,
        "runs_not_completed": sum(run.status is not RunStatus.COMPLETED for run in runs),
        "restarts": restarts,
    }


PHASES = ("sync", "async", "async_bounded")


def targets(figures: dict[str, Any]) -> list[Target]:
    """Issue 16's lines, PASS/MISS with the figures (the lag and the ratio also with the
    bounded phase, when it ran)."""
    sync, idle = figures["sync"], figures["sync"]["loop_lag_p99_ms"]
    found = []
    for key in ("async", "async_bounded"):
        phase = figures.get(key)
        if phase is None:
            continue
        lag = phase["loop_lag_p99_ms"]
        suffix = "" if key == "async" else f" (max_turns_in_flight={figures['bounded']})"
        found.append(
            Target(
                f"async: loop lag p99 < {TARGET_LAG_P99_MS:g} ms{suffix}",
                None if lag is None else lag < TARGET_LAG_P99_MS,
                "not measured"
                if lag is None or idle is None
                else f"{lag:.2f} ms (an idle loop under the sync load: {idle:.2f} ms)",
            )
        )
        ratio = phase["turns_per_s"] / sync["turns_per_s"] if sync["turns_per_s"] else 0.0
        found.append(
            Target(
                f"async: turns/s >= {TARGET_RATIO:g}x sync{suffix}",
                ratio >= TARGET_RATIO,
                f"{ratio:.2f}x ({phase['turns_per_s']:,.0f} against "
                f"{sync['turns_per_s']:,.0f} turns/s of {THREADS} threads)",
            )
        )
    bound = figures["runtime_threads"] + figures["blocking_threads"]
    peak = figures["async"]["peak_threads"]
    found.append(
        Target(
            "async: threads bounded by the runtime's own",
            peak <= bound,
            f"peak {peak} while {CALLERS:,} calls waited; the runtime's own {bound} "
            f"({figures['runtime_threads']} + executor {figures['blocking_threads']})",
        )
    )
    return found


def rows(figures: dict[str, Any]) -> dict[str, CaseResult]:
    """The phases as rows of `bench/run.py`'s table, by case name (`async` holds the
    figures, for the targets)."""
    found = {}
    for key in PHASES:
        phase = figures.get(key)
        if phase is None:
            continue
        found["async_sync" if key == "sync" else key] = CaseResult(
            case=phase["api"],
            groups=figures["groups"],
            turns=phase["turns"],
            seconds=phase["seconds"],
            threads=phase["callers"],
            p50_ms=phase["p50_ms"],
            p99_ms=phase["p99_ms"],
            errors=phase["errors"],
            notes=[
                f"CPU {phase['cpu_ms_per_turn']:.2f} ms/turn",
                f"peak {phase['peak_threads']} threads",
                f"loop lag p99 {phase['loop_lag_p99_ms']:.1f} ms"
                + (" (idle loop)" if key == "sync" else ""),
            ],
            details=figures if key == "async" else {},
        )
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def render(figures: dict[str, Any]) -> str:
    """The figures as a table, then the targets."""
    header = [
        "api",
        "turns",
        "turns/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/turn",
        "threads",
        "loop lag p50/p99/max ms",
        "GC pauses total/max ms",
    ]
    lines = [
        [
            phase["api"],
            f"{phase['turns']:,}",
            f"{phase['turns_per_s']:,.1f}",
            _ms(phase["p50_ms"]),
            _ms(phase["p99_ms"]),
            f"{phase['cpu_ms_per_turn']:.2f}",
            str(phase["peak_threads"]),
            f"{_ms(phase['loop_lag_p50_ms'])} / {_ms(phase['loop_lag_p99_ms'])} / "
            f"{_ms(phase['loop_lag_max_ms'])}",
            f"{_ms(phase['gc_pause_total_ms'])} / {_ms(phase['gc_pause_max_ms'])}",
        ]
        for phase in (figures[key] for key in PHASES if key in figures)
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]

    def row(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    out = [
        f"asyncio API against the synchronous one: {figures['groups']} groups, zero-latency "
        f"simulated agents, on {figures['database']}"
        + (", quiet GC (frozen once warm, gen 0 every 100,000)" if figures["quiet_gc"] else "")
        + "; the sync row's loop lag is an idle loop's in the same process",
        "",
        row(header),
        "  ".join("-" * width for width in widths),
        *(row(line) for line in lines),
        "",
        f"async / sync turns/s: {figures['ratio_async_to_sync']:.2f}x; the runtime's own "
        f"threads: {figures['runtime_threads']} (+ executor {figures['blocking_threads']}); "
        f"restarts {figures['restarts']}, runs not completed {figures['runs_not_completed']}",
        "",
        "targets:",
    ]
    out += [f"  {t.verdict}  {t.name:<58} {t.detail}" for t in targets(figures)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", metavar="URL", help="database URL (default: a new SQLite file)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_TURNS_PER_GROUP} turns per group, not {TURNS_PER_GROUP}",
    )
    parser.add_argument(
        "--quiet-gc",
        action="store_true",
        help=f"once warm, gc.freeze() and collect gen 0 every {QUIET_GC_THRESHOLD:,} allocations",
    )
    parser.add_argument(
        "--bounded",
        type=int,
        default=BOUNDED_IN_FLIGHT,
        metavar="N",
        help=f"max_turns_in_flight of the bounded phase (default {BOUNDED_IN_FLIGHT}; 0: none)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.bounded < 0:
        parser.error("--bounded must be 0 or more")
    turns = QUICK_TURNS_PER_GROUP if args.quick else TURNS_PER_GROUP
    with tempfile.TemporaryDirectory(prefix="sleeptime-bench-async-") as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'async.db'}"
        figures = measure(url, turns, quiet_gc=args.quiet_gc, bounded=args.bounded or None)
    print(render(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
