"""Many processes on one PostgreSQL (SPEC 15): the cost of fencing, two processes against
one, and the time a takeover takes after a kill -9. Prints a table.

    python bench/shards.py                       # a throwaway PostgreSQL server of its own
    python bench/shards.py --db postgresql://user@host/db   # an existing, empty database
    python bench/shards.py --quick

- fencing: one runtime, 100 groups, zero-latency simulated agents, frequency 1; turns/s
  with every write fenced (as always) against the same runtime with its committer's fence
  taken out, alternated, medians: the ratio is what fencing costs (target: >= 0.9x).
- scale: one child process driving its 100 groups, then two child processes each driving
  their own 100 groups at once, on one database: total turns/s, and the ratio (target on
  a 2-core machine, where PostgreSQL shares the cores: >= 1.3x). Each process creates its
  groups once every process has joined and the shards are shared out (else a group made
  early moves to the other process mid-run and its turns fail NotOwner); failed turns are
  printed, never counted. Three alternations, medians.
- takeover: a child process holding every shard with runs in flight is killed with
  SIGKILL while another process runs; the time until the survivor holds every shard, and
  until every open run of the dead process is terminal or running again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors import Runtime  # noqa: E402
from bench.drive import drive  # noqa: E402
from messages import MessageCreate, RunStatus  # noqa: E402
from tests.postgres import PostgresCluster, find_bin_dir  # noqa: E402

SIM = {"kind": "simulated", "config": {"latency_ms": 0, "seed": 1}}
HI = [MessageCreate(role="user", content="my favorite color is coral")]
THREADS = 32

DRIVER = """
import json, sys, time
sys.path.insert(0, sys.argv[4])
from actors import Runtime
from bench.drive import drive
from bench.shards import HI, SIM, THREADS
rt = Runtime.start(sys.argv[1], lease_s=float(sys.argv[3]))
print("started", flush=True)
members = int(sys.stdin.readline())
# Every process has joined: wait until the shards are shared out, so that no group created
# here is handed to another process in the middle of the measurement.
book = rt._store.book
settle = time.monotonic() + 60
fair = range(book.shards // members, -(-book.shards // members) + 1)
while len(book.held()) not in fair and time.monotonic() < settle:
    time.sleep(0.05)
groups = [rt.create_group(primary=SIM, sleeptime=[SIM], frequency=1).id for _ in range(100)]
for g in groups:
    rt.step(g, HI)
print("ready", flush=True)
sys.stdin.readline()
rounds = int(sys.argv[2])
cpu_began = time.process_time()
done = drive(groups, rounds=rounds, threads=THREADS, call=lambda g: rt.step(g, HI).run_ids)
rt.wait_for_runs([r for ids in done.results for r in ids], timeout=600)
seconds = time.monotonic() - done.started
cpu = time.process_time() - cpu_began
print(json.dumps({"turns": done.calls, "seconds": seconds, "errors": done.errors,
                  "first_errors": done.first_errors, "cpu_s": cpu}), flush=True)
rt.stop()
"""


def fencing(url: str, rounds: int, repeats: int) -> dict[str, float]:
    with Runtime.start(url) as rt:
        groups = [rt.create_group(primary=SIM, sleeptime=[SIM], frequency=1).id for _ in range(100)]
        fence = rt._store.committer._fence
        rates: dict[str, list[float]] = {"fenced": [], "unfenced": []}
        for _ in range(repeats):
            for mode in ("fenced", "unfenced"):
                rt._store.committer._fence = fence if mode == "fenced" else None
                done = drive(groups, rounds, THREADS, lambda g: rt.step(g, HI).run_ids)
                rt.wait_for_runs([r for ids in done.results for r in ids], timeout=600)
                rates[mode].append(done.calls / (time.monotonic() - done.started))
        rt._store.committer._fence = fence
    fenced, unfenced = statistics.median(rates["fenced"]), statistics.median(rates["unfenced"])
    return {"fenced": fenced, "unfenced": unfenced, "ratio": fenced / unfenced}


def drivers(url: str, count: int, rounds: int, lease_s: float) -> float:
    """Total turns/s of `count` child processes, each driving 100 groups of its own."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, url, str(rounds), str(lease_s), str(ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "SLEEPTIME_LOG_LEVEL": "error"},
        )
        for _ in range(count)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "started"
    for child in children:  # every process is a member: each waits for its share
        assert child.stdin is not None
        child.stdin.write(f"{count}\n")
        child.stdin.flush()
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    for child in children:  # all at once
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    reports = []
    for child in children:
        assert child.stdout is not None
        reports.append(json.loads(child.stdout.readline()))
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(120)
    errors = sum(r["errors"] for r in reports)
    if errors:  # a turn refused (a group moved, say) is not a turn: say so, loudly
        print(f"{errors} failed turns, e.g. {reports[0]['first_errors'][:1]}", file=sys.stderr)
    turns: int = sum(r["turns"] for r in reports)
    seconds: float = max(r["seconds"] for r in reports)
    return turns / seconds


TAKEOVER_CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
from actors import Runtime
from messages import MessageCreate
slow = {"kind": "simulated", "config": {"latency_ms": 500, "seed": 1}}
rt = Runtime.start(sys.argv[1], lease_s=float(sys.argv[2]))
hi = [MessageCreate(role="user", content="hi")]
groups = [rt.create_group(primary={"kind": "scripted"}, sleeptime=[slow], frequency=1).id
          for _ in range(20)]
for g in groups:
    for _ in range(3):
        rt.step(g, hi)
print(",".join(groups), flush=True)
sys.stdin.readline()
"""


def takeover(url: str, lease_s: float) -> dict[str, float]:
    child = subprocess.Popen(
        [sys.executable, "-c", TAKEOVER_CHILD, url, str(lease_s), str(ROOT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "SLEEPTIME_LOG_LEVEL": "error"},
    )
    assert child.stdout is not None
    groups = child.stdout.readline().strip().split(",")
    survivor = Runtime.start(url, lease_s=lease_s)
    try:
        shards = survivor._store.book.shards
        killed = time.monotonic()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        owned = recovered = None
        while recovered is None and time.monotonic() - killed < 120:
            if owned is None and len(survivor._store.book.held()) == shards:
                owned = time.monotonic() - killed
            if owned is not None:
                stale = [
                    r
                    for g in groups
                    for r in survivor.list_runs(group_id=g, statuses=[RunStatus.RUNNING])
                    if r.attempt == 1
                ]
                if not stale:
                    recovered = time.monotonic() - killed
            time.sleep(0.05)
        return {"lease_s": lease_s, "owned_s": owned or -1.0, "recovered_s": recovered or -1.0}
    finally:
        survivor.stop(drain_timeout=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="an empty PostgreSQL database (default: a throwaway server)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    # Every figure is a median over repeats that alternate the two sides (one run of a few
    # seconds on two shared cores moves by 20 %).
    rounds, repeats = (10, 1) if args.quick else (30, 5)
    cluster: PostgresCluster | None = None
    if args.db is None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            sys.exit("no PostgreSQL server binaries found; give --db URL")
        cluster = PostgresCluster.create(bin_dir)
    try:

        def fresh(name: str) -> str:
            if cluster is None:
                return str(args.db)
            return cluster.url(cluster.create_database(name))

        results: dict[str, Any] = {}
        results["fencing"] = fencing(fresh("fencing"), rounds, repeats)
        ones, twos = [], []
        for k in range(max(1, repeats - 2)):
            ones.append(drivers(fresh(f"one{k}"), 1, rounds, 10.0))
            twos.append(drivers(fresh(f"two{k}"), 2, rounds, 10.0))
        one, two = statistics.median(ones), statistics.median(twos)
        results["scale"] = {"one": one, "two": two, "ratio": two / one, "each": [ones, twos]}
        results["takeover"] = takeover(fresh("takeover"), lease_s=2.0)
    finally:
        if cluster is not None:
            cluster.remove()
    f, s, t = results["fencing"], results["scale"], results["takeover"]
    print()
    print("measure                               value      target")
    print("------------------------------------  ---------  -------------")
    print(f"turns/s fenced                        {f['fenced']:9.1f}")
    print(f"turns/s fence taken out               {f['unfenced']:9.1f}")
    print(f"fenced / unfenced                     {f['ratio']:9.2f}x  >= 0.9x")
    print(f"turns/s, one process                  {s['one']:9.1f}")
    print(f"turns/s, two processes                {s['two']:9.1f}")
    print(f"two / one                             {s['ratio']:9.2f}x  >= 1.3x")
    print(f"takeover: all shards owned (lease {t['lease_s']:g} s)  {t['owned_s']:6.2f} s")
    print(f"takeover: every open run moving again {t['recovered_s']:7.2f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
