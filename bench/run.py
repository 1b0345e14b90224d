"""The runtime against a naive Letta-style baseline and the SQLite limit, in one run.

Measures, in this order: the runtime's durable turns/s at 100 and 1,000 groups; the naive
baseline (Letta's orchestration: one SQLAlchemy session per read-modify-write) at 100
groups; the limit (the same rows with plain sqlite3, batched, one thread); both with many
callers on one group (lost updates); in a child process, memory and threads at 10,000
groups; `openai` agents against a loopback fake model server (`bench/llm.py`); and the
asyncio API, 1,000 coroutines on one loop, against the synchronous one (`bench/async_turns.py`).
Prints a table, the ratios and the targets, and writes everything as JSON.

    python bench/run.py                    # the full run (several minutes)
    python bench/run.py --quick            # fewer turns, 2,000 groups for the memory step
    python bench/run.py --db postgresql://user@127.0.0.1:5432/bench   # the runtime on PostgreSQL
    python bench/run.py --cases runtime_100,limit                     # some cases only

The naive baseline and the limit always run on their own SQLite files (WAL,
synchronous=FULL, as the runtime); the runtime runs on a new SQLite file per case unless
`--db` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import async_turns, llm, report
from bench.cases import (
    CaseResult,
    measure_limit,
    measure_naive,
    measure_naive_contended,
    measure_runtime,
    measure_runtime_contended,
    median,
)
from bench.scale import child_main, measure_in_child
from cli.collector import tuned_collector

CASES = (
    "runtime_100",
    "runtime_100_gc",
    "runtime_1000",
    "runtime_1000_uncapped",
    "naive_100",
    "limit",
    "limit_history",
    "runtime_contended",
    "naive_contended",
    "scale",
    "llm",
    "async",
)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True, slots=True)
class Plan:
    """How much each case does; `--quick` is the short one.

    `repeats`: the runtime and the naive baseline at 100 groups run that many times on
    fresh files and report the median (the ratios hang on them).
    """

    turns_per_group_100: int
    turns_per_group_1000: int
    naive_turns_per_group: int
    contended_turns_per_thread: int
    scale_groups: int
    scale_turns: int
    scale_timeout_s: float
    repeats: int
    llm_turns_per_group: int = 300
    async_turns_per_group: int = async_turns.TURNS_PER_GROUP
    threads: int = 64
    workers: int = 32
    naive_background_workers: int = 32
    contended_threads: int = 16
    limit_batch: int = 500
    limit_repeats: int = 3  # a write of a few thousand turns is short, so noisy

    @property
    def limit_turns(self) -> int:
        """As many turns as the runtime's 100-group case stores, so the tables match."""
        return 100 * (self.turns_per_group_100 + 1)


FULL = Plan(
    turns_per_group_100=50,
    turns_per_group_1000=10,
    naive_turns_per_group=20,
    contended_turns_per_thread=25,
    scale_groups=10_000,
    scale_turns=3,
    scale_timeout_s=600,
    repeats=3,
)
QUICK = Plan(
    turns_per_group_100=10,
    turns_per_group_1000=3,
    naive_turns_per_group=5,
    contended_turns_per_thread=10,
    scale_groups=2_000,
    scale_turns=3,
    scale_timeout_s=300,
    repeats=1,
    llm_turns_per_group=50,
    async_turns_per_group=async_turns.QUICK_TURNS_PER_GROUP,
)


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (fsync costs depend on it)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if str(path).startswith(fields[1]) and len(fields[1]) >= len(best):
                    best, kind = fields[1], fields[2]
    except OSError:
        pass
    return kind


def _git(*command: str) -> str:
    try:
        done = subprocess.run(
            ["git", *command], cwd=ROOT, capture_output=True, text=True, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip()


def _environment(work: Path) -> dict[str, Any]:
    changed = [line[3:] for line in _git("status", "--porcelain").splitlines()]
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_changed_files": changed,
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "sqlite": sqlite3.sqlite_version,
        "pykka": version("pykka"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "work_dir_filesystem": _filesystem(work),
    }


def _runtime_url(db: str | None, work: Path, name: str) -> str:
    return db or f"sqlite:///{work / f'{name}.db'}"


def run_cases(
    plan: Plan, wanted: set[str], db: str | None, work: Path
) -> tuple[dict[str, CaseResult], dict[str, Any] | None]:
    """Run the wanted cases in order, saying on stderr which one is running."""
    cases: dict[str, CaseResult] = {}
    scale: dict[str, Any] | None = None

    def announce(name: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)

    def runtime_100(case: str, name: str) -> CaseResult:
        return median(
            [
                measure_runtime(
                    case,
                    _runtime_url(db, work, f"{name}-{repeat}"),
                    100,
                    plan.turns_per_group_100,
                    plan.threads,
                    plan.workers,
                )
                for repeat in range(plan.repeats)
            ]
        )

    if "runtime_100" in wanted:
        announce(f"runtime, 100 groups, x{plan.repeats}")
        cases["runtime_100"] = runtime_100("runtime", "runtime-100")
    if "runtime_100_gc" in wanted:
        announce(f"runtime, 100 groups, the collector tuned (cli.collector), x{plan.repeats}")
        with tuned_collector():
            cases["runtime_100_gc"] = runtime_100("runtime, gc tuned", "runtime-100-gc")
    if "runtime_1000" in wanted:
        announce("runtime, 1,000 groups")
        cases["runtime_1000"] = measure_runtime(
            "runtime",
            _runtime_url(db, work, "runtime-1000"),
            1000,
            plan.turns_per_group_1000,
            plan.threads,
            plan.workers,
        )
    if "runtime_1000_uncapped" in wanted:
        announce("runtime, 1,000 groups, max_active_groups above 1,000")
        cases["runtime_1000_uncapped"] = measure_runtime(
            "runtime, no passivation",
            _runtime_url(db, work, "runtime-1000-uncapped"),
            1000,
            plan.turns_per_group_1000,
            plan.threads,
            plan.workers,
            options={"max_active_groups": 2000},
        )
    if "naive_100" in wanted:
        announce(f"naive baseline, 100 groups, x{plan.repeats}")
        cases["naive_100"] = median(
            [
                measure_naive(
                    work / f"naive-{repeat}.db",
                    100,
                    plan.naive_turns_per_group,
                    plan.threads,
                    plan.naive_background_workers,
                )
                for repeat in range(plan.repeats)
            ]
        )
    if "limit" in wanted:
        announce("limit")
        cases["limit"] = measure_limit(
            work / "limit.db",
            100,
            plan.limit_turns,
            plan.limit_batch,
            history=False,
            repeats=plan.limit_repeats,
        )
    if "limit_history" in wanted:
        announce("limit with the sleeptime history rows")
        cases["limit_history"] = measure_limit(
            work / "limit-history.db",
            100,
            plan.limit_turns,
            plan.limit_batch,
            history=True,
            repeats=plan.limit_repeats,
        )
    if "runtime_contended" in wanted:
        announce("runtime, many callers on one group")
        cases["runtime_contended"] = measure_runtime_contended(
            _runtime_url(db, work, "runtime-contended"),
            plan.contended_threads,
            plan.contended_turns_per_thread,
            plan.workers,
        )
    if "naive_contended" in wanted:
        announce("naive baseline, many callers on one group")
        cases["naive_contended"] = measure_naive_contended(
            work / "naive-contended.db",
            plan.contended_threads,
            plan.contended_turns_per_thread,
            plan.naive_background_workers,
        )
    if "scale" in wanted:
        announce(f"scale: {plan.scale_groups:,} groups in a child process")
        scale = measure_in_child(
            Path(__file__).resolve(),
            _runtime_url(db, work, "scale"),
            groups=plan.scale_groups,
            turns=plan.scale_turns,
            threads=plan.threads,
            workers=plan.workers,
            timeout=plan.scale_timeout_s,
        )
    if "llm" in wanted:
        announce(f"openai agents on a loopback fake model server, {llm.GROUPS} groups")
        cases["llm"] = llm.case(
            _runtime_url(db, work, "llm"),
            llm.GROUPS,
            plan.llm_turns_per_group,
            llm.DELAY_MS,
            plan.workers,
        )
    if "async" in wanted:
        announce("asyncio API: 1,000 coroutines on one loop, against 100 threads")
        figures = async_turns.measure(
            _runtime_url(db, work, "async"), plan.async_turns_per_group, plan.workers
        )
        cases.update(async_turns.rows(figures))
    return cases, scale


def case_targets(cases: dict[str, CaseResult]) -> list[report.Target]:
    """The target lines of the cases that report their own: `llm` and `async`."""
    lines = report.llm_targets(cases.get("llm")) if "llm" in cases else []
    if "async" in cases:
        lines += async_turns.targets(cases["async"].details)
    return lines


def render(
    cases: dict[str, CaseResult], scale: dict[str, Any] | None, quick: bool, db: str | None
) -> str:
    """The whole printed report."""
    lines = [
        "sleeptime-runtime benchmark" + (" (--quick)" if quick else ""),
        "zero-latency simulated agents (case llm: openai agents on a fake model server "
        f"answering in {llm.DELAY_MS:g} ms), 1 sleeptime agent per group, frequency 1; runtime "
        + ("on the --db database (one database for every case)" if db else "on SQLite")
        + "; naive and limit on SQLite (WAL, synchronous=FULL)",
        "",
        report.table(list(cases.values())),
        "",
    ]
    for name, value in report.ratios(cases).items():
        lines.append(f"{name:<34} {value:.3f}x")
    lines += ["", *report.scale_lines(scale), "", "targets:"]
    for target in [*report.targets(cases, scale), *case_targets(cases)]:
        lines.append(f"  {target.verdict}  {target.name:<42} {target.detail}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns, 2,000 groups at scale")
    parser.add_argument("--db", metavar="URL", help="the runtime's database (default: SQLite)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the figures here")
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}"
    )
    parser.add_argument("--scale-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--groups", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--turns", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--scale-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        if args.db is None or args.scale_result is None:
            parser.error("--scale-child needs --db and --scale-result")
        return child_main(
            args.db, args.groups, args.turns, args.threads, args.workers, args.scale_result
        )
    wanted = {name.strip() for name in args.cases.split(",") if name.strip()}
    unknown = wanted - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    plan = QUICK if args.quick else FULL
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sleeptime-bench-") as tmp:
        work = Path(tmp)
        environment = _environment(work)
        cases, scale = run_cases(plan, wanted, args.db, work)
    print(render(cases, scale, args.quick, args.db))
    lines = [*report.targets(cases, scale), *case_targets(cases)]
    document = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "runtime_db": "sqlite, a new file per case"
        if args.db is None
        else make_url(args.db).render_as_string(hide_password=True),
        "parameters": {
            **asdict(plan),
            "limit_turns": plan.limit_turns,
            "sleeptime_agents_per_group": 1,
            "frequency": 1,
            "agent_latency_ms": 0,
            "llm_case_model_delay_ms": llm.DELAY_MS,
            "sqlite": "journal_mode=WAL, synchronous=FULL (naive, limit, and the runtime "
            "unless --db)",
        },
        "environment": environment,
        "cases": {name: case.to_json() for name, case in cases.items()},
        "ratios": report.ratios(cases),
        "scale": scale,
        "targets": report.targets_json(lines),
        "total_s": time.perf_counter() - began,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nwritten to {args.json} ({document['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
