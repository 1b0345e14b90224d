"""The benchmark's pure pieces write what they claim: the limit writer, the naive baseline.

The full benchmark (`python bench/run.py`) takes minutes; these take well under a second,
so a change that breaks a baseline's rows shows up in the test suite, not in a figure.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors.tracing import RuntimeTracing
from bench import async_turns, compare, llm, observer_calls
from bench.cases import CaseResult
from bench.drive import drive
from bench.limit import count_rows, write_turns
from bench.naive import NaiveSleeptime
from bench.report import llm_targets, table, targets


def test_limit_writes_the_rows_of_every_turn(tmp_path: Path) -> None:
    result = write_turns(tmp_path / "limit.db", groups=3, turns=10, batch=4)

    assert result.transactions == 3  # 4 + 4 + 2 turns
    assert result.rows == {
        "groups": 3,
        "messages": 20,
        "runs": 10,
        "run_events": 30,
        "group_turns": 10,
        "completed_runs": 10,
    }
    assert result.turns_per_s > 0


def test_limit_with_history_adds_two_sleeptime_messages_per_turn(tmp_path: Path) -> None:
    result = write_turns(tmp_path / "limit.db", groups=2, turns=6, history=True)

    assert result.rows["messages"] == 6 * 4
    assert result.rows["run_events"] == 6 * 3


def test_limit_uses_the_runtime_sqlite_settings(tmp_path: Path) -> None:
    path = tmp_path / "limit.db"
    write_turns(path, groups=1, turns=1)

    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert count_rows(connection)["runs"] == 1


def test_naive_stores_messages_counter_cursor_and_runs(tmp_path: Path) -> None:
    baseline = NaiveSleeptime.open(tmp_path / "naive.db", threads=2, background_workers=2)
    try:
        groups = [baseline.create_group(frequency=1, sleeptime_agents=1) for _ in range(2)]
        done = drive(groups, 3, 2, baseline.step)
        assert baseline.wait_for_runs(timeout=10) == 0
        counts = baseline.counts()
    finally:
        baseline.close()

    assert done.errors == 0
    assert all(len(run_ids) == 1 for run_ids in done.results)
    assert (counts.groups, counts.messages, counts.runs) == (2, 12, 6)
    assert counts.completed_runs == 6
    assert counts.lost_updates(done.calls) == 0  # one caller per group: nothing races
    assert (counts.fires, counts.repeated_cursors) == (6, 0)


def test_naive_fires_on_the_frequency(tmp_path: Path) -> None:
    baseline = NaiveSleeptime.open(tmp_path / "naive.db", threads=1, background_workers=1)
    try:
        group = baseline.create_group(frequency=2, sleeptime_agents=2)
        fired = [baseline.step(group) for _ in range(4)]
        baseline.wait_for_runs(timeout=10)
        counts = baseline.counts()
    finally:
        baseline.close()

    assert [len(run_ids) for run_ids in fired] == [2, 0, 2, 0]  # turns 1 and 3
    assert (counts.runs, counts.completed_runs, counts.stored_turns) == (4, 4, 4)


def test_drive_keeps_every_key_busy_and_counts_errors() -> None:
    seen: list[int] = []

    def call(key: int) -> int:
        if key == 3:
            raise ValueError("three")
        seen.append(key)
        return key

    done = drive([1, 2, 3, 4], rounds=2, threads=3, call=call)

    assert sorted(seen) == [1, 1, 2, 2, 4, 4]
    assert done.errors == 2 and done.first_errors == ["ValueError: three"] * 2
    assert done.calls == 6 and done.percentile_ms(99) is not None


def test_report_marks_targets_met_and_missed() -> None:
    cases = {
        "runtime_100": CaseResult("runtime", 100, 1000, 1.0),
        "limit": CaseResult("limit", 100, 2000, 1.0),
        "naive_100": CaseResult("naive", 100, 500, 1.0),
    }
    scale: dict[str, Any] = {"groups": 10_000, "peak_rss_mb": 500.0, "peak_os_threads": 1200}
    scale["invariants_ok"] = True
    cases["runtime_100"].details["cpu_ms_per_turn"] = 1.5

    verdicts = [t.verdict for t in targets(cases, scale)]

    # limit 0.3x, naive 10x, limit 0.15x, CPU per turn, then the three scale lines
    assert verdicts == ["PASS", "MISS", "PASS", "MISS", "PASS", "MISS", "PASS"]
    del cases["runtime_100"].details["cpu_ms_per_turn"]
    assert [t.verdict for t in targets(cases, scale)][3] == "----"  # not measured
    assert "runtime" in table(list(cases.values()))


def test_the_llm_case_drives_openai_agents_on_the_fake_and_reports_the_targets(
    tmp_path: Path,
) -> None:
    """`bench/llm.py` end to end, small: real runtime, fake model server in a child process."""
    result = llm.case(f"sqlite:///{tmp_path / 'llm.db'}", groups=2, turns=3, delay_ms=0, workers=4)

    assert (result.turns, result.errors) == (6, 0)
    assert result.details["runs"]["completed"] == 6  # one sleeptime run per turn
    assert result.details["runtime_cpu_ms_per_turn"] > 0
    assert result.turns_per_s_all_runs_done is not None
    lines = llm_targets(result)
    assert [line.name for line in lines] == [
        "llm: >= 250 turns/s (every run ended)",
        "llm: <= 5 ms runtime CPU per turn",
    ]
    assert all("the target is for PostgreSQL" in line.detail for line in lines)


def test_async_turns_reports_its_rows_and_targets() -> None:
    phase = {
        "callers": 100,
        "turns": 3000,
        "seconds": 5.0,
        "cpu_ms_per_turn": 1.7,
        "p50_ms": 150.0,
        "p99_ms": 300.0,
        "peak_threads": 236,
        "loop_lag_p50_ms": 1.0,
        "loop_lag_p99_ms": 8.0,
        "loop_lag_max_ms": 20.0,
        "gc_pause_total_ms": 100.0,
        "gc_pause_max_ms": 15.0,
        "errors": 0,
    }
    figures = {
        "database": "sqlite",
        "quiet_gc": False,
        "groups": 100,
        "sync": {**phase, "api": "sync, 100 threads", "turns_per_s": 600.0},
        "async": {
            **phase,
            "api": "async, 1,000 coroutines",
            "callers": 1000,
            "peak_threads": 241,
            "turns_per_s": 660.0,
        },
        "ratio_async_to_sync": 1.1,
        "runtime_threads": 236,
        "blocking_threads": 4,
        "runs_not_completed": 0,
        "restarts": 0,
    }
    figures["bounded"] = 16
    figures["async_bounded"] = {
        **phase,
        "api": "async, 1,000 coroutines, max_turns_in_flight=16",
        "callers": 1000,
        "loop_lag_p99_ms": 12.0,
        "turns_per_s": 540.0,
    }
    lag, ratio, bounded_lag, bounded_ratio, threads = async_turns.targets(figures)
    assert (lag.passed, ratio.passed, threads.passed) == (True, True, False)  # 241 > 236 + 4
    assert (bounded_lag.passed, bounded_ratio.passed) == (False, False)
    assert "max_turns_in_flight=16" in bounded_lag.name
    rows = async_turns.rows(figures)
    assert list(rows) == ["async_sync", "async", "async_bounded"]
    assert rows["async"].turns_per_s == 600.0  # 3,000 in 5 s
    shown = async_turns.render(figures)
    assert "async / sync turns/s: 1.10x" in shown and "MISS  async: threads" in shown
    assert "max_turns_in_flight=16" in shown


def test_observer_calls_drive_a_turn_and_its_run_as_the_runtime_does() -> None:
    """bench/observer_calls.py makes the calls of a turn firing one run: with every turn
    traced, each turn yields its span and its run's, linked; the figures are CPU times."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = RuntimeTracing(provider)
    observer_calls._drive(tracing, observer_calls._runs(3))
    tracing.close()
    spans = exporter.get_finished_spans()
    assert sorted(s.name for s in spans) == ["sleeptime.run"] * 3 + ["sleeptime.turn"] * 3
    turns = {s.context.span_id for s in spans if s.name == "sleeptime.turn"}
    assert {s.links[0].context.span_id for s in spans if s.name == "sleeptime.run"} == turns
    for mode in observer_calls.MODES:  # each mode runs its observer end to end
        here, elsewhere = observer_calls.measure(mode, 20)
        assert math.isfinite(here) and elsewhere >= 0.0  # (timings: no bound asserted)


def test_compare_measures_the_workload_in_the_checkout_it_is_given() -> None:
    """`bench/compare.py` runs its workload in a new process on the code of the checkout
    it names (not an installed copy), through the public API, and reads its figures."""
    here = Path(compare.__file__).resolve().parent.parent
    figures = compare.measure(here, turns=1, threads=4)
    assert set(figures) == set(compare.FIGURES)
    assert figures["cpu_ms_per_turn"] > 0 and figures["turns_per_s"] > 0
    assert figures["switches_per_turn"] >= 0
