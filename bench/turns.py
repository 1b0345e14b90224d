"""Durable turns per second of `step`, on one group and on many groups in parallel.

Every turn fires sleeptime (frequency 1) on zero-latency simulated agents over a SQLite
file; a turn counts when `step` returned (its input, output, counter, cursor and run are
committed), and "all runs done" is when the last run of the measurement is terminal.

    python bench/turns.py            # 1 group and 100 groups, on a SQLite file
    python bench/turns.py --quick    # a shorter run
    python bench/turns.py --db postgresql://user@127.0.0.1:5432/bench   # on PostgreSQL
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Runtime
from cli.loadsim import percentile
from messages import MessageCreate, RunStatus

SIMULATED = {"kind": "simulated", "config": {"latency_ms": 0, "seed": 1}}


def measure(groups: int, turns_per_group: int, url: str) -> dict[str, float]:
    """Drive `groups` groups from one caller thread each; return the figures."""
    with Runtime.start(url) as rt:
        ids = [
            rt.create_group(primary=SIMULATED, sleeptime=[SIMULATED], frequency=1).id
            for _ in range(groups)
        ]
        message = [MessageCreate(role="user", content="my favorite color is coral")]
        for group_id in ids:  # warm up: start the actors, fill the caches
            rt.wait_for_runs(rt.step(group_id, message).run_ids, timeout=60)
        barrier = threading.Barrier(groups + 1)
        latencies: list[float] = []

        def drive(group_id: str) -> list[str]:
            run_ids: list[str] = []
            barrier.wait()
            for _ in range(turns_per_group):
                began = time.perf_counter()
                run_ids += rt.step(group_id, message).run_ids
                latencies.append(time.perf_counter() - began)
            return run_ids

        with ThreadPoolExecutor(groups) as pool:
            futures = [pool.submit(drive, group_id) for group_id in ids]
            barrier.wait()
            started = time.perf_counter()
            run_ids = [r for f in futures for r in f.result()]
            stepped = time.perf_counter() - started
        runs = rt.wait_for_runs(run_ids, timeout=600)
        finished = time.perf_counter() - started
        assert all(r.status is RunStatus.COMPLETED for r in runs)
        stats = rt.stats()
    latencies.sort()
    turns = groups * turns_per_group
    return {
        "groups": groups,
        "turns": turns,
        "turns_per_s": turns / stepped,
        "turns_per_s_all_runs_done": turns / finished,
        "turn_p50_ms": 1000 * percentile(latencies, 50),
        "turn_p99_ms": 1000 * percentile(latencies, 99),
        "writes_per_transaction": stats["writes"] / max(1, stats["transactions"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--db", metavar="URL", help="database URL (default: a new SQLite file)")
    args = parser.parse_args()
    single, many = (300, 10) if args.quick else (2000, 40)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            measure(groups, turns, args.db or f"sqlite:///{Path(tmp) / f'bench-{groups}.db'}")
            for groups, turns in ((1, single), (100, many))
        ]
    header = ["groups", "turns", "turns/s", "turns/s (runs done)", "p50 ms", "p99 ms", "writes/txn"]
    print(" | ".join(f"{h:>19}" for h in header))
    for row in rows:
        values = [
            row["groups"],
            row["turns"],
            row["turns_per_s"],
            row["turns_per_s_all_runs_done"],
            row["turn_p50_ms"],
            row["turn_p99_ms"],
            row["writes_per_transaction"],
        ]
        print(" | ".join(f"{v:>19.1f}" if isinstance(v, float) else f"{v:>19}" for v in values))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
