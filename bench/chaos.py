"""A larger chaos run: actors crash and agents fail at random, then the invariants are checked.

    python bench/chaos.py                      # 40 groups x 2 agents x 30 turns, SQLite file
    python bench/chaos.py --quick              # smaller
    python bench/chaos.py --db postgresql://user@127.0.0.1:5432/chaos --crash-rate 0.05

Exit code 0 only if no run is left open and every invariant holds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Chaos, RestartPolicy, Runtime
from messages import MessageCreate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", metavar="URL", help="database URL (default: a new SQLite file)")
    parser.add_argument("--groups", type=int, default=40)
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--crash-rate", type=float, default=0.02)
    parser.add_argument("--failure-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10 groups x 10 turns")
    args = parser.parse_args()
    groups, turns = (10, 10) if args.quick else (args.groups, args.turns)
    chaos = Chaos(crash_rate=args.crash_rate, failure_rate=args.failure_rate, seed=args.seed)
    policy = RestartPolicy(max_restarts=50, within_seconds=10, backoff_base=0.001, backoff_max=0.05)
    slow = {"kind": "simulated", "config": {"latency_ms": 2, "jitter_ms": 2, "seed": args.seed}}
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'chaos.db'}"
        started = time.perf_counter()
        with Runtime.start(url, chaos=chaos, restart_policy=policy) as rt:
            ids = [
                rt.create_group(
                    primary={"kind": "scripted"},
                    sleeptime=[{"kind": "memory"}, slow],
                    frequency=(None, 1, 2, 3)[n % 4],
                    max_attempts=10,
                ).id
                for n in range(groups)
            ]

            def drive(group_id: str) -> list[str]:
                message = [MessageCreate(role="user", content="my favorite color is teal")]
                return [r for _ in range(turns) for r in rt.step(group_id, message).run_ids]

            with ThreadPoolExecutor(min(groups, 32)) as pool:
                run_ids = [r for batch in pool.map(drive, ids) for r in batch]
            runs = rt.wait_for_runs(run_ids, timeout=600)
            elapsed = time.perf_counter() - started
            stats = rt.stats()
            report = rt.check_invariants(ids)
            still_open = len(rt.list_runs(statuses=["created", "running"]))
    statuses = Counter(r.status.value for r in runs)
    figures = {
        "turns": groups * turns,
        "runs": len(runs),
        "completed": statuses["completed"],
        "failed (injected + interrupted)": statuses["failed"],
        "injected crashes": stats["injected_crashes"],
        "restarts": stats["restarts"],
        "escalations": stats["escalations"],
        "non-terminal runs": still_open,
        "invariant violations": len(report.violations),
        "seconds": round(elapsed, 1),
    }
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    for violation in report.violations:
        print("violation:", violation)
    return 0 if report.ok and still_open == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
