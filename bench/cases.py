"""The measured cases: the runtime, the naive Letta-style baseline, and the SQLite limit.

Every case drives groups with 1 sleeptime agent each, frequency 1 (every turn fires) and
zero-latency agents, warms up with one turn per group, then times the turns; a turn counts
when its call returned, that is once its messages, counter, cursor and run are committed.
"""

from __future__ import annotations

import gc
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors import Runtime
from bench.drive import Drive, drive
from bench.limit import write_turns
from bench.naive import NaiveSleeptime
from messages import MessageCreate, RunStatus

SIMULATED = {"kind": "simulated", "config": {"latency_ms": 0, "seed": 1}}
MESSAGE = [MessageCreate(role="user", content="my favorite color is coral")]
RUNS_TIMEOUT_S = 600.0


@dataclass(slots=True)
class CaseResult:
    """One row of the report: a case's throughput, latency and what it checked."""

    case: str
    groups: int
    turns: int
    seconds: float
    threads: int | None = None
    turns_per_s_all_runs_done: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "groups": self.groups,
            "turns": self.turns,
            "threads": self.threads,
            "seconds": self.seconds,
            "turns_per_s": self.turns_per_s,
            "turns_per_s_all_runs_done": self.turns_per_s_all_runs_done,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": self.errors,
            "notes": self.notes,
            **self.details,
        }


@dataclass(slots=True)
class CollectorTime:
    """What the garbage collector took meanwhile: wall seconds (it holds the GIL, so
    this is CPU the runtime's threads did not get) and collections, by generation."""

    seconds: float = 0.0
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])


@contextmanager
def collector_time() -> Iterator[CollectorTime]:
    """Time every collection made meanwhile, on any thread (through `gc.callbacks`)."""
    spent = CollectorTime()
    began = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            spent.seconds += time.perf_counter() - began[0]
            spent.collections[info["generation"]] += 1

    gc.callbacks.append(timed)
    try:
        yield spent
    finally:
        gc.callbacks.remove(timed)


def thread_switches() -> int:
    """The times this process's threads (all of them, ended ones included) blocked and
    gave their core up: a hand-off to an idle thread wakes it, and on a busy machine a
    woken thread then waits for the GIL too. Each costs tens of microseconds of CPU on a
    machine of this kind (`getrusage`'s voluntary context switches; 0 where there are
    none)."""
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    except (AttributeError, OSError):
        return 0


def median(results: list[CaseResult]) -> CaseResult:
    """The repeat with the median turns/s, noting the others (one run is noisy)."""
    ordered = sorted(results, key=lambda result: result.turns_per_s)
    chosen = ordered[len(ordered) // 2]
    if len(ordered) > 1:
        chosen.notes.append(f"median of {len(ordered)}")
        chosen.details["turns_per_s_each_repeat"] = [r.turns_per_s for r in ordered]
    return chosen


def _latencies(result: CaseResult, done: Drive[Any]) -> None:
    result.p50_ms = done.percentile_ms(50)
    result.p99_ms = done.percentile_ms(99)
    result.errors = done.errors
    if done.errors:
        result.notes.append(f"{done.errors} failed calls")
        result.details["first_errors"] = done.first_errors


def measure_runtime(
    case: str,
    url: str,
    groups: int,
    turns_per_group: int,
    threads: int,
    workers: int,
    options: dict[str, Any] | None = None,
) -> CaseResult:
    """Durable turns/s of `rt.step` over `groups` groups from a pool of caller threads.

    `options` go to `Runtime.start` as they are (e.g. `max_active_groups`).
    """
    with Runtime.start(url, workers=workers, **(options or {})) as rt:
        began = time.perf_counter()
        ids = [
            rt.create_group(primary=SIMULATED, sleeptime=[SIMULATED], frequency=1).id
            for _ in range(groups)
        ]
        created_s = time.perf_counter() - began

        def step(group_id: str) -> list[str]:
            return rt.step(group_id, MESSAGE).run_ids

        warm = drive(ids, 1, threads, step)
        rt.wait_for_runs([r for ids_ in warm.results for r in ids_], timeout=RUNS_TIMEOUT_S)
        cpu_began, switches_began = time.process_time(), thread_switches()
        with collector_time() as collected:
            done = drive(ids, turns_per_group, threads, step)
            run_ids = [r for ids_ in done.results for r in ids_]
            runs = rt.wait_for_runs(run_ids, timeout=RUNS_TIMEOUT_S)
        all_done_s = time.perf_counter() - done.started
        # The whole process's CPU (callers included) until every run of the turns ended.
        cpu_ms_per_turn = (time.process_time() - cpu_began) * 1000 / max(1, done.calls)
        switches_per_turn = (thread_switches() - switches_began) / max(1, done.calls)
        began = time.perf_counter()
        report = rt.check_invariants(ids)
        invariants_s = time.perf_counter() - began
        stats = rt.stats()
    completed = sum(r.status is RunStatus.COMPLETED for r in runs)
    result = CaseResult(
        case=case,
        groups=groups,
        turns=done.calls,
        seconds=done.seconds,
        threads=min(groups, threads),
        turns_per_s_all_runs_done=done.calls / all_done_s,
    )
    _latencies(result, done)
    writes_per_txn = stats["writes"] / max(1, stats["transactions"])
    gc_ms_per_turn = collected.seconds * 1000 / max(1, done.calls)
    result.notes.append(f"{cpu_ms_per_turn:.2f} ms CPU/turn ({gc_ms_per_turn:.2f} in gc)")
    result.notes.append(f"{switches_per_turn:.1f} thread switches/turn")
    result.notes.append(f"{writes_per_txn:.1f} writes/txn")
    if stats.get("passivations"):
        result.notes.append(f"{stats['passivations']:,} passivations")
    if completed != len(runs):
        result.notes.append(f"only {completed}/{len(runs)} runs completed")
    result.notes.append("invariants ok" if report.ok else "INVARIANTS BROKEN")
    result.details.update(
        {
            "workers": workers,
            "runtime_options": options or {},
            "create_groups_s": created_s,
            "warm_up_turns": warm.calls,
            "runs": len(runs),
            "completed_runs": completed,
            "invariants_ok": report.ok,
            "invariants_s": invariants_s,
            "invariant_violations": report.violations[:5],
            "stats": stats,
            "writes_per_transaction": writes_per_txn,
            "cpu_ms_per_turn": cpu_ms_per_turn,
            "thread_switches_per_turn": switches_per_turn,
            "gc_ms_per_turn": gc_ms_per_turn,
            "gc_collections": collected.collections,
        }
    )
    return result


def measure_runtime_contended(
    url: str, threads: int, turns_per_thread: int, workers: int
) -> CaseResult:
    """`threads` callers on ONE group: the group actor must count every turn once."""
    with Runtime.start(url, workers=workers) as rt:
        group_id = rt.create_group(primary=SIMULATED, sleeptime=[SIMULATED], frequency=1).id
        done = drive([group_id] * threads, turns_per_thread, threads, lambda g: rt.step(g, MESSAGE))
        rt.wait_for_runs([r for t in done.results for r in t.run_ids], timeout=RUNS_TIMEOUT_S)
        stored = rt.get_group(group_id).turns
        report = rt.check_invariants([group_id])
    result = CaseResult(
        case="runtime, 1 group, contended",
        groups=1,
        turns=done.calls,
        seconds=done.seconds,
        threads=threads,
    )
    _latencies(result, done)
    lost = done.calls - stored
    result.notes += [
        f"{threads} threads on 1 group",
        f"lost counter updates: {lost}",
        "invariants ok" if report.ok else "INVARIANTS BROKEN",
    ]
    result.details.update(
        {"lost_counter_updates": lost, "stored_turns": stored, "invariants_ok": report.ok}
    )
    return result


def measure_naive(
    path: Path, groups: int, turns_per_group: int, threads: int, background_workers: int
) -> CaseResult:
    """Turns/s of the Letta-style baseline (one session per read-modify-write)."""
    baseline = NaiveSleeptime.open(path, threads=threads, background_workers=background_workers)
    try:
        ids = [baseline.create_group(frequency=1, sleeptime_agents=1) for _ in range(groups)]
        warm = drive(ids, 1, threads, baseline.step)
        baseline.wait_for_runs(timeout=RUNS_TIMEOUT_S)
        done = drive(ids, turns_per_group, threads, baseline.step)
        still_running = baseline.wait_for_runs(timeout=RUNS_TIMEOUT_S)
        all_done_s = time.perf_counter() - done.started
        counts = baseline.counts()
    finally:
        baseline.close()
    result = CaseResult(
        case="naive (Letta-style)",
        groups=groups,
        turns=done.calls,
        seconds=done.seconds,
        threads=min(groups, threads),
        turns_per_s_all_runs_done=done.calls / all_done_s,
    )
    _latencies(result, done)
    made = warm.calls + done.calls
    lost = counts.lost_updates(made)
    result.notes.append(f"lost counter updates: {lost}")
    if counts.completed_runs != counts.runs or still_running:
        result.notes.append(f"{counts.runs - counts.completed_runs} runs not completed")
    if baseline.background_errors:
        result.notes.append(f"{baseline.background_errors} failed run updates")
    result.details.update(
        {
            "background_workers": background_workers,
            "turns_made_incl_warm_up": made,
            "stored_turns": counts.stored_turns,
            "lost_counter_updates": lost,
            "repeated_cursor_reads": counts.repeated_cursors,
            "runs": counts.runs,
            "completed_runs": counts.completed_runs,
            "failed_run_updates": baseline.background_errors,
            "messages": counts.messages,
        }
    )
    return result


def measure_naive_contended(
    path: Path, threads: int, turns_per_thread: int, background_workers: int
) -> CaseResult:
    """`threads` callers on ONE group of the baseline: its read-modify-writes race."""
    baseline = NaiveSleeptime.open(path, threads=threads, background_workers=background_workers)
    try:
        group_id = baseline.create_group(frequency=1, sleeptime_agents=1)
        done = drive([group_id] * threads, turns_per_thread, threads, baseline.step)
        baseline.wait_for_runs(timeout=RUNS_TIMEOUT_S)
        counts = baseline.counts()
    finally:
        baseline.close()
    result = CaseResult(
        case="naive, 1 group, contended",
        groups=1,
        turns=done.calls,
        seconds=done.seconds,
        threads=threads,
    )
    _latencies(result, done)
    lost = counts.lost_updates(done.calls)
    result.notes += [
        f"{threads} threads on 1 group",
        f"lost counter updates: {lost}",
        f"cursor read twice: {counts.repeated_cursors}",
    ]
    result.details.update(
        {
            "stored_turns": counts.stored_turns,
            "lost_counter_updates": lost,
            "repeated_cursor_reads": counts.repeated_cursors,
        }
    )
    return result


def measure_limit(
    path: Path, groups: int, turns: int, batch: int, history: bool, repeats: int = 3
) -> CaseResult:
    """Turns/s of the same rows written with plain sqlite3 in batched transactions.

    Each repeat writes a new file; the median repeat is reported (a short write is noisy).
    """
    runs = sorted(
        (
            write_turns(
                path.with_name(f"{path.stem}-{repeat}{path.suffix}"),
                groups=groups,
                turns=turns,
                batch=batch,
                history=history,
            )
            for repeat in range(repeats)
        ),
        key=lambda written: written.turns_per_s,
    )
    written = runs[len(runs) // 2]
    result = CaseResult(
        case="limit (sqlite3, batched)" if not history else "limit + sleeptime history",
        groups=groups,
        turns=written.turns,
        seconds=written.seconds,
        threads=1,
    )
    result.notes.append(f"{batch} turns/txn; median of {repeats}")
    if history:
        result.notes.append("+2 history messages/turn, as the runtime")
    result.details.update(
        {
            "batch": batch,
            "transactions": written.transactions,
            "rows": written.rows,
            "turns_per_s_each_repeat": [w.turns_per_s for w in runs],
        }
    )
    return result
