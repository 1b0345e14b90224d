"""The runtime driving LLM agents: `openai` primary and sleeptime agents on a loopback fake.

Ten groups in parallel, one caller thread each, sleeptime on every turn (frequency 1); both
agents are of the `openai` kind and talk to an OpenAI-compatible fake (`tests/fake_openai.py`)
that answers in about 1 ms: the primary agent gets a text answer, the sleeptime agent
rewrites the `human` block then finishes (two model calls per run). The fake runs in a
child process, so this process's CPU time is the runtime's own: turns, runs, memory
edits, the model requests and the database client.

    python bench/llm.py                                   # on a new SQLite file
    python bench/llm.py --db postgresql://user@127.0.0.1:5432/bench
    python bench/llm.py --turns 400 --groups 10 --json llm.json

Target (issue 7): on PostgreSQL, at least 250 turns/s (counted until every sleeptime run
ended) and at most 5 ms of the runtime's CPU per turn.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Runtime
from bench.cases import CaseResult
from cli.loadsim import percentile
from messages import MessageCreate, Run, RunStatus

ROOT = Path(__file__).resolve().parent.parent
TARGET_TURNS_PER_S = 250.0
TARGET_CPU_MS_PER_TURN = 5.0
GROUPS = 10
DELAY_MS = 1.0


@contextmanager
def fake_server(delay_ms: float) -> Iterator[tuple[str, int]]:
    """The fake model server in a child process: its base URL and pid."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", "--delay-ms", str(delay_ms)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake model server did not start (it printed {url!r})")
        yield url, child.pid
    finally:
        child.terminate()
        child.wait(timeout=10)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) another process used so far, from /proc (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile_ms(values: list[float], percent: float) -> float | None:
    return 1000 * percentile(sorted(values), percent) if values else None


def _span(run: Run, since_start: bool = False) -> float | None:
    start = run.started_at if since_start else run.created_at
    if run.completed_at is None or start is None:
        return None
    return (run.completed_at - start).total_seconds()


def measure(db_url: str, groups: int, turns: int, delay_ms: float, workers: int) -> dict[str, Any]:
    """Drive `groups` groups for `turns` turns each; the figures of the measured part."""
    with fake_server(delay_ms) as (llm_url, fake_pid), Runtime.start(db_url, workers=workers) as rt:
        agent = {"kind": "openai", "config": {"base_url": llm_url, "model": "fake-model"}}
        ids = [
            rt.create_group(primary=agent, sleeptime=[agent], frequency=1).id for _ in range(groups)
        ]
        said = [MessageCreate(role="user", content="my favorite color is coral")]
        for group_id in ids:  # warm up: actors started, connections open, caches full
            rt.wait_for_runs(rt.step(group_id, said).run_ids, timeout=60)
        barrier = threading.Barrier(groups + 1)
        latencies: list[list[float]] = [[] for _ in ids]

        def drive(index: int) -> list[str]:
            run_ids: list[str] = []
            barrier.wait()
            for _ in range(turns):
                began = time.perf_counter()
                run_ids += rt.step(ids[index], said).run_ids
                latencies[index].append(time.perf_counter() - began)
            return run_ids

        with ThreadPoolExecutor(groups) as pool:
            futures = [pool.submit(drive, index) for index in range(groups)]
            barrier.wait()
            cpu_before, fake_before = time.process_time(), process_cpu_s(fake_pid)
            started = time.perf_counter()
            run_ids = [run_id for future in futures for run_id in future.result()]
            stepped = time.perf_counter() - started
        runs = rt.wait_for_runs(run_ids, timeout=600)
        finished = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        fake_after = process_cpu_s(fake_pid)
        statuses = {status.value: 0 for status in RunStatus}
        for run in runs:
            statuses[run.status.value] += 1
    total = groups * turns
    spans = [s for s in map(_span, runs) if s is not None]
    active = [s for s in (_span(run, since_start=True) for run in runs) if s is not None]
    turn_latencies = [latency for per_group in latencies for latency in per_group]
    fake_cpu = None if fake_before is None or fake_after is None else (fake_after - fake_before)
    return {
        "database": make_url(db_url).get_backend_name(),
        "groups": groups,
        "turns": total,
        "model_delay_ms": delay_ms,
        "seconds_stepping": stepped,
        "turns_per_s": total / stepped,
        "turns_per_s_all_runs_done": total / finished,
        "runtime_cpu_ms_per_turn": 1000 * cpu / total,
        "fake_server_cpu_ms_per_turn": None if fake_cpu is None else 1000 * fake_cpu / total,
        "turn_p50_ms": percentile_ms(turn_latencies, 50),
        "turn_p99_ms": percentile_ms(turn_latencies, 99),
        "run_created_to_terminal_p50_ms": percentile_ms(spans, 50),
        "run_created_to_terminal_p99_ms": percentile_ms(spans, 99),
        "run_running_to_terminal_p50_ms": percentile_ms(active, 50),
        "run_running_to_terminal_p99_ms": percentile_ms(active, 99),
        "runs": statuses,
    }


def case(db_url: str, groups: int, turns: int, delay_ms: float, workers: int) -> CaseResult:
    """The measurement as a row of `bench/run.py`'s report (case `llm`)."""
    figures = measure(db_url, groups, turns, delay_ms, workers)
    total = figures["turns"]
    return CaseResult(
        case=f"llm ({figures['database']})",
        groups=groups,
        turns=total,
        seconds=figures["seconds_stepping"],
        threads=groups,
        turns_per_s_all_runs_done=figures["turns_per_s_all_runs_done"],
        p50_ms=figures["turn_p50_ms"],
        p99_ms=figures["turn_p99_ms"],
        errors=sum(n for status, n in figures["runs"].items() if status != "completed"),
        notes=[f"runtime CPU {figures['runtime_cpu_ms_per_turn']:.2f} ms/turn"],
        details=figures,
    )


def render(figures: dict[str, Any]) -> str:
    """The figures as a table, then the targets with PASS/MISS."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:,.2f}"

    rows = [
        ("database", figures["database"]),
        ("groups x turns", f"{figures['groups']} x {figures['turns'] // figures['groups']}"),
        ("model answer delay (ms)", number(figures["model_delay_ms"])),
        ("turns/s (steps returned)", number(figures["turns_per_s"])),
        ("turns/s (every run ended)", number(figures["turns_per_s_all_runs_done"])),
        ("runtime CPU per turn (ms)", number(figures["runtime_cpu_ms_per_turn"])),
        ("fake server CPU per turn (ms)", number(figures["fake_server_cpu_ms_per_turn"])),
        (
            "turn latency p50 / p99 (ms)",
            f"{number(figures['turn_p50_ms'])} / {number(figures['turn_p99_ms'])}",
        ),
        (
            "run created -> terminal p50 / p99 (ms)",
            f"{number(figures['run_created_to_terminal_p50_ms'])} / "
            f"{number(figures['run_created_to_terminal_p99_ms'])}",
        ),
        (
            "run running -> terminal p50 / p99 (ms)",
            f"{number(figures['run_running_to_terminal_p50_ms'])} / "
            f"{number(figures['run_running_to_terminal_p99_ms'])}",
        ),
        ("runs", ", ".join(f"{k} {v}" for k, v in figures["runs"].items() if v)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    rate, cpu = figures["turns_per_s_all_runs_done"], figures["runtime_cpu_ms_per_turn"]
    lines += [
        "",
        "targets (issue 7, meant for PostgreSQL):",
        f"  {'PASS' if rate >= TARGET_TURNS_PER_S else 'MISS'}  "
        f">= {TARGET_TURNS_PER_S:g} turns/s (every run ended): {rate:,.1f}",
        f"  {'PASS' if cpu <= TARGET_CPU_MS_PER_TURN else 'MISS'}  "
        f"<= {TARGET_CPU_MS_PER_TURN:g} ms runtime CPU per turn: {cpu:.2f}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", metavar="URL", help="database URL (default: a new SQLite file)")
    parser.add_argument(
        "--groups", type=int, default=GROUPS, help=f"groups in parallel (default: {GROUPS})"
    )
    parser.add_argument("--turns", type=int, default=300, help="turns per group (default: 300)")
    parser.add_argument(
        "--delay-ms", type=float, default=DELAY_MS, help="the fake's answer delay (ms)"
    )
    parser.add_argument("--workers", type=int, default=32, help="the runtime's step threads")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.groups < 1 or args.turns < 1 or args.workers < 1:
        parser.error("--groups, --turns and --workers must be 1 or more")
    if not 0 <= args.delay_ms <= 60_000:
        parser.error("--delay-ms must be from 0 to 60000")
    with tempfile.TemporaryDirectory(prefix="sleeptime-bench-llm-") as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'llm.db'}"
        figures = measure(url, args.groups, args.turns, args.delay_ms, args.workers)
    print(render(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
