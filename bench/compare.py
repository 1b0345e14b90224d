"""This checkout against an earlier revision: CPU per turn, turns/s and thread switches.

A change to the runtime's inside is judged against what it replaced, on the same machine in
the same hour (a machine of this kind runs up to 2.5x slower from one session to the next).
This checks the other revision out into a temporary git worktree and runs one workload,
`bench/run.py`'s runtime_100 (100 groups, a sleeptime agent each, frequency 1, zero-latency
simulated agents, 64 caller threads, on a new SQLite file), in each, alternately, in a fresh
process per measurement, through the public API only (so it runs on any revision since the
runtime took this shape). Per measurement: the process's CPU per turn until every run ended,
turns/s of the steps and until every run ended, and the thread switches per turn (voluntary
context switches: the wakes a hand-off to an idle thread costs). Prints the medians and the
ratios of this checkout to the other.

    python bench/compare.py --against 5f7156b            # 3 rounds (about 2 minutes)
    python bench/compare.py --against HEAD~1 --rounds 5 --turns 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
FIGURES = ("cpu_ms_per_turn", "turns_per_s", "turns_per_s_all_runs_done", "switches_per_turn")

# Runs in the measured checkout (its own `actors`, `messages`, first on the path): only what
# every revision of the public API has, so nothing here depends on this checkout's code.
WORKLOAD = """
import json, resource, sys, tempfile, threading, time
from actors import Runtime
from messages import MessageCreate

turns, threads = int(sys.argv[1]), int(sys.argv[2])
agent = {"kind": "simulated", "config": {"latency_ms": 0, "seed": 1}}
said = [MessageCreate(role="user", content="my favorite color is coral")]
with tempfile.TemporaryDirectory() as folder, Runtime.start(
    f"sqlite:///{folder}/compare.db", workers=32
) as rt:
    ids = [rt.create_group(primary=agent, sleeptime=[agent], frequency=1).id for _ in range(100)]

    def drive(rounds):
        queue = [g for _ in range(rounds) for g in ids]
        runs, lock = [], threading.Lock()

        def call():
            while True:
                with lock:
                    if not queue:
                        return
                    group_id = queue.pop()
                found = rt.step(group_id, said).run_ids
                with lock:
                    runs.extend(found)

        callers = [threading.Thread(target=call) for _ in range(threads)]
        began = time.perf_counter()
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        return runs, time.perf_counter() - began

    warm, _ = drive(1)
    rt.wait_for_runs(warm, timeout=120)
    cpu, switches = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    began = time.perf_counter()
    runs, seconds = drive(turns)
    rt.wait_for_runs(runs, timeout=600)
    done = 100 * turns
    import actors
    print(json.dumps({
        "code": actors.__file__,
        "cpu_ms_per_turn": (time.process_time() - cpu) * 1000 / done,
        "turns_per_s": done / seconds,
        "turns_per_s_all_runs_done": done / (time.perf_counter() - began),
        "switches_per_turn": (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches) / done,
    }))
"""


def measure(checkout: Path, turns: int, threads: int) -> dict[str, float]:
    """One measurement of the workload in `checkout`, in a new process."""
    environment = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, "-c", WORKLOAD, str(turns), str(threads)],
        cwd=checkout,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the workload failed in {checkout}: {done.stderr.strip()[-2000:]}")
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    code = Path(found.pop("code")).resolve()
    if not code.is_relative_to(checkout.resolve()):  # (an installed copy came first)
        raise RuntimeError(f"measured {code}, not the code in {checkout}")
    return {figure: float(found[figure]) for figure in FIGURES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, metavar="REV", help="a git revision")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each")
    parser.add_argument("--turns", type=int, default=50, help="turns per group per measurement")
    parser.add_argument("--threads", type=int, default=64, help="caller threads")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.against],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    rows: dict[str, list[dict[str, float]]] = {"this": [], revision: []}
    with tempfile.TemporaryDirectory() as folder:
        other = Path(folder) / "other"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(other), revision],
            cwd=HERE,
            check=True,
        )
        try:
            for round_ in range(args.rounds):
                order = [("this", HERE), (revision, other)]
                for name, checkout in order if round_ % 2 == 0 else reversed(order):
                    figures = measure(checkout, args.turns, args.threads)
                    rows[name].append(figures)
                    print(
                        f"round {round_ + 1} {name:>9}: {figures['cpu_ms_per_turn']:.2f} ms CPU"
                        f"/turn, {figures['turns_per_s']:.0f} turns/s, "
                        f"{figures['turns_per_s_all_runs_done']:.0f} with every run done, "
                        f"{figures['switches_per_turn']:.1f} switches/turn",
                        flush=True,
                    )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)], cwd=HERE, check=False
            )
    summary: dict[str, Any] = {"against": revision, "rounds": args.rounds}
    header = f"{'figure':>26} | {'this':>9} | {revision:>9} | {'ratio':>6}"
    print(f"\nmedians of {args.rounds} rounds, 100 groups x {args.turns} turns:")
    print(header)
    print("-" * len(header))
    for figure in FIGURES:
        mine = statistics.median(row[figure] for row in rows["this"])
        theirs = statistics.median(row[figure] for row in rows[revision])
        summary[figure] = {"this": mine, revision: theirs, "ratio": mine / theirs}
        print(f"{figure:>26} | {mine:9.2f} | {theirs:9.2f} | {mine / theirs:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
