"""What retention costs a live runtime: turns/s while `prune` runs beside them, against the
same workload without it, in one run; and how fast prune removes rows.

100 groups of zero-latency simulated agents, frequency 1 (every turn fires a run), driven
flat out from one caller thread per group for a number of rounds, twice on one database:
once alone, once while another thread prunes in a loop (every group: runs but the newest
two per agent, primary messages covered but the newest four per group, block versions but
the newest two), in bounded batches, as a service would call `rt.prune` on a schedule. The
phases alternate over a few rounds so the machine's drift falls on both. Prints a table.

    python bench/prune.py                 # 3 rounds of each (about 1 minute)
    python bench/prune.py --rounds 5 --turns 20 --batch-size 100
    python bench/prune.py --db postgresql://user@127.0.0.1:5432/bench   # an empty database
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Runtime
from bench.drive import drive
from messages import MessageCreate

SIMULATED = {"kind": "simulated", "config": {"latency_ms": 0, "seed": 1}}
MESSAGE = [MessageCreate(role="user", content="my favorite color is coral")]
GROUPS = 100
RUNS_TIMEOUT_S = 300.0


def phase(rt: Runtime, ids: list[str], turns: int, prune_batch: int | None) -> dict[str, Any]:
    """Drive `turns` rounds over the groups; with `prune_batch`, prune in a loop meanwhile.
    Turns/s until every run ended, rows pruned and prune calls made."""
    stop = threading.Event()
    pruned = {"rows": 0, "calls": 0, "seconds": 0.0}

    def prune_loop() -> None:
        while not stop.is_set():
            began = time.perf_counter()
            report = rt.prune(
                keep_runs=2,
                messages=True,
                keep_messages=4,
                keep_block_versions=2,
                batch_size=prune_batch or 500,
            )
            pruned["seconds"] += time.perf_counter() - began
            pruned["rows"] += sum(report.removed.values())
            pruned["calls"] += 1

    pruner = threading.Thread(target=prune_loop, name="bench-prune")
    if prune_batch is not None:
        pruner.start()
    began = time.perf_counter()
    done = drive(ids, turns, len(ids), lambda g: rt.step(g, MESSAGE).run_ids)
    # Until every run ended: counted, not waited for by id (prune may have removed some).
    deadline = time.monotonic() + RUNS_TIMEOUT_S
    while rt.count_runs(statuses=["created", "running"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    seconds = time.perf_counter() - began
    stop.set()
    if prune_batch is not None:
        pruner.join()
    return {
        "turns_per_s": done.calls / seconds,
        "p99_ms": done.percentile_ms(99) or 0.0,
        "rows_pruned": pruned["rows"],
        "prune_calls": pruned["calls"],
        "rows_per_s": pruned["rows"] / pruned["seconds"] if pruned["seconds"] else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each phase")
    parser.add_argument("--turns", type=int, default=15, help="turns per group per phase")
    parser.add_argument("--batch-size", type=int, default=500, help="prune's rows per batch")
    parser.add_argument("--db", metavar="URL", help="database URL (default: a new SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = args.db or f"sqlite:///{Path(folder) / 'prune.db'}"
        with Runtime.start(url, workers=32) as rt:
            ids = [
                rt.create_group(primary=SIMULATED, sleeptime=[SIMULATED], frequency=1).id
                for _ in range(GROUPS)
            ]
            phase(rt, ids, 2, None)  # warm up
            alone: list[dict[str, Any]] = []
            beside: list[dict[str, Any]] = []
            for round_ in range(args.rounds):
                order = [None, args.batch_size] if round_ % 2 == 0 else [args.batch_size, None]
                for batch in order:
                    row = phase(rt, ids, args.turns, batch)
                    (alone if batch is None else beside).append(row)
                    print(
                        f"round {round_ + 1} {'alone' if batch is None else 'pruning':>8}: "
                        f"{row['turns_per_s']:7.1f} turns/s, p99 {row['p99_ms']:6.1f} ms, "
                        f"{row['rows_pruned']:,} rows pruned in {row['prune_calls']} call(s)",
                        flush=True,
                    )
            report = rt.check_invariants(ids)
    base = statistics.median(r["turns_per_s"] for r in alone)
    with_prune = statistics.median(r["turns_per_s"] for r in beside)
    paired = statistics.median(
        b["turns_per_s"] / a["turns_per_s"] for a, b in zip(alone, beside, strict=True)
    )
    print()
    print(f"{GROUPS} groups x {args.turns} turns per phase, zero-latency agents, frequency 1")
    print(f"{'phase':>9} | {'turns/s':>8} | {'p99 ms':>7} | {'rows pruned/s':>13}")
    print("-" * 47)
    print(f"{'alone':>9} | {base:8.1f} | {statistics.median(r['p99_ms'] for r in alone):7.1f} |")
    rows_per_s = statistics.median(r["rows_per_s"] for r in beside)
    p99 = statistics.median(r["p99_ms"] for r in beside)
    print(f"{'pruning':>9} | {with_prune:8.1f} | {p99:7.1f} | {rows_per_s:13,.0f}")
    print()
    ratio = with_prune / base
    print(f"turns/s while pruning / alone: {ratio:.2f}x (medians), {paired:.2f}x (paired)")
    print("invariants after pruning: " + ("hold" if report.ok else f"BROKEN {report.violations}"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
