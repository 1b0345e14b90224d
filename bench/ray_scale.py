"""Shard hosts on Ray (SPEC 16) against one plain runtime, on the same database and
workload, in one run; prints a table. Needs the ray extra and PostgreSQL.

    python bench/ray_scale.py                          # a throwaway PostgreSQL server of its own
    python bench/ray_scale.py --db postgresql://user@host/db    # an existing, empty database
    python bench/ray_scale.py --hosts 3 --quick

- scale: `simulate`'s closed loop (100 groups, zero-latency simulated agents, sleeptime
  on every turn, 32 callers) in one plain runtime in this process, then fanned out over
  N shard hosts on a local Ray (one slice per host, `cli.fanout`): turns/s counted until
  every run ended, the ratio, and the CPU per turn: this process's for the plain
  runtime; for Ray, this process's plus every Ray process's (the hosts, the idle
  workers, raylet, GCS, the dashboard and log processes), read from /proc.
- llm: openai primary and sleeptime agents on the loopback fake model server (1 ms
  answers, `bench/llm.py`), 10 groups, one caller thread each, every turn a step: in a
  plain runtime in this process, then through a `RayRuntime` client to one shard host
  (a Ray call per turn, with its request id): the CPU per turn of each (the fake's own
  CPU left out). Target (issue 17): through Ray at most twice the CPU without it.

PostgreSQL's own CPU is left out of every figure (it is the same work either way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors import Runtime  # noqa: E402
from actors.ray_cluster import RayRuntime, local_ray, start_hosts  # noqa: E402
from bench.llm import fake_server, process_cpu_s  # noqa: E402
from cli import fanout, loadsim  # noqa: E402
from messages import MessageCreate, RunStatus  # noqa: E402
from tests.postgres import PostgresCluster, find_bin_dir  # noqa: E402

TARGET_LLM_CPU_RATIO = 2.0
LLM_GROUPS = 10
SAID = [MessageCreate(role="user", content="my favorite color is coral")]


def descendants(root: int) -> set[int]:
    """Every process below `root`, from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def cpu_below(exclude: set[int]) -> dict[int, float]:
    """CPU seconds so far of this process and every process below it but `exclude`."""
    pids = ({os.getpid()} | descendants(os.getpid())) - exclude
    return {pid: cpu for pid in pids if (cpu := process_cpu_s(pid)) is not None}


@contextmanager
def cpu_meter(exclude: set[int] | None = None) -> Iterator[Callable[[], float]]:
    """Yields a function giving the CPU seconds used since, by this process and those
    below it (Ray's, when Ray runs here) but `exclude`; processes started meanwhile
    count from zero."""
    before = cpu_below(exclude or set())

    def used() -> float:
        now = cpu_below(exclude or set())
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())

    yield used


# -- scale ---------------------------------------------------------------------------------

SHAPE = loadsim.GroupShape(agents=1, frequency=1, seed=7)


def scale_plain(url: str, groups: int, turns: int) -> dict[str, float]:
    with Runtime.start(url) as rt, cpu_meter() as used:
        outcome = loadsim.simulate(rt, SHAPE, groups=groups, turns=turns, concurrency=32)
        cpu = used()
    return figures(outcome, cpu)


def scale_ray(url: str, groups: int, turns: int, hosts: int) -> dict[str, float]:
    with start_hosts(url, hosts, namespace="bench-scale") as cluster:
        client = cluster.client()
        names = cluster.names()
        with cpu_meter() as used:
            outcome = fanout.simulate_across(
                client,
                cluster.run_on_hosts,
                names,
                SHAPE,
                groups=groups,
                turns=turns,
                concurrency=32,
            )
            cpu = used()
    return figures(outcome, cpu)


def figures(outcome: loadsim.Outcome, cpu: float) -> dict[str, float]:
    assert outcome.ok, (outcome.errors, outcome.invariants.violations)
    return {
        "turns": outcome.turns,
        "turns_per_s": outcome.turns / outcome.elapsed_s,
        "cpu_ms_per_turn": 1000 * cpu / outcome.turns,
    }


# -- llm -----------------------------------------------------------------------------------


def drive_llm(rt: Any, llm_url: str, turns: int) -> tuple[int, float, list[str]]:
    """Ten groups of openai agents, one caller each: (turns, seconds, run ids)."""
    agent = {"kind": "openai", "config": {"base_url": llm_url, "model": "fake-model"}}
    ids = [
        rt.create_group(primary=agent, sleeptime=[agent], frequency=1).id for _ in range(LLM_GROUPS)
    ]
    for group_id in ids:  # warm up: actors started, connections open
        rt.wait_for_runs(rt.step(group_id, SAID).run_ids, timeout=60)
    barrier = threading.Barrier(LLM_GROUPS + 1)

    def drive(group_id: str) -> list[str]:
        barrier.wait()
        return [r for _ in range(turns) for r in rt.step(group_id, SAID).run_ids]

    with ThreadPoolExecutor(LLM_GROUPS) as pool:
        futures = [pool.submit(drive, g) for g in ids]
        barrier.wait()
        started = time.perf_counter()
        run_ids = [r for future in futures for r in future.result()]
    runs = rt.wait_for_runs(run_ids, timeout=600)
    assert all(r.status is RunStatus.COMPLETED for r in runs)
    return LLM_GROUPS * turns, time.perf_counter() - started, run_ids


def llm_plain(url: str, llm_url: str, turns: int, fake_pid: int) -> dict[str, float]:
    with Runtime.start(url) as rt, cpu_meter({fake_pid}) as used:
        count, seconds, _ = drive_llm(rt, llm_url, turns)
        cpu = used()
    return {"turns": count, "turns_per_s": count / seconds, "cpu_ms_per_turn": 1000 * cpu / count}


def llm_ray(url: str, llm_url: str, turns: int, fake_pid: int, hosts: int) -> dict[str, float]:
    with start_hosts(url, hosts, namespace="bench-llm") as cluster:
        client: RayRuntime = cluster.client()
        with cpu_meter({fake_pid}) as used:
            count, seconds, _ = drive_llm(client, llm_url, turns)
            cpu = used()
    return {"turns": count, "turns_per_s": count / seconds, "cpu_ms_per_turn": 1000 * cpu / count}


# -- the run -------------------------------------------------------------------------------


def render(results: dict[str, Any], hosts: int, llm_hosts: int) -> str:
    rows = [
        ("scale: plain runtime (1 process)", results["scale_plain"]),
        (f"scale: Ray, {hosts} shard hosts", results["scale_ray"]),
        ("llm: plain runtime", results["llm_plain"]),
        (f"llm: through Ray ({llm_hosts} host, a Ray call per turn)", results["llm_ray"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{'case':<{width}}  {'turns':>6}  {'turns/s':>8}  {'CPU ms/turn':>11}",
        f"{'-' * width}  {'-' * 6}  {'-' * 8}  {'-' * 11}",
    ]
    for name, row in rows:
        lines.append(
            f"{name:<{width}}  {row['turns']:>6}  {row['turns_per_s']:>8.1f}"
            f"  {row['cpu_ms_per_turn']:>11.2f}"
        )
    scale = results["scale_ray"]["turns_per_s"] / results["scale_plain"]["turns_per_s"]
    scale_cpu = results["scale_ray"]["cpu_ms_per_turn"] / results["scale_plain"]["cpu_ms_per_turn"]
    llm = results["llm_ray"]["cpu_ms_per_turn"] / results["llm_plain"]["cpu_ms_per_turn"]
    verdict = "PASS" if llm <= TARGET_LLM_CPU_RATIO else "MISS"
    lines += [
        "",
        f"scale: Ray / plain turns/s            {scale:.2f}x",
        f"scale: Ray / plain CPU per turn       {scale_cpu:.2f}x (Ray's own processes included)",
        f"llm: Ray / plain CPU per turn         {llm:.2f}x  {verdict} (target <= "
        f"{TARGET_LLM_CPU_RATIO:g}x)",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--db", help="an empty PostgreSQL database (default: a throwaway server)")
    parser.add_argument("--hosts", type=int, default=2, help="shard hosts of the scale case")
    parser.add_argument("--llm-hosts", type=int, default=1, help="shard hosts of the llm case")
    parser.add_argument("--quick", action="store_true", help="fewer turns (about 1 minute)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    groups, turns, llm_turns = (50, 10, 40) if args.quick else (100, 30, 150)
    cluster: PostgresCluster | None = None
    if args.db is None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            sys.exit("no PostgreSQL server binaries found; give --db URL")
        cluster = PostgresCluster.create(bin_dir)
    try:
        url = args.db or cluster.url(cluster.create_database("bench_ray"))  # type: ignore[union-attr]
        results: dict[str, Any] = {"scale_plain": scale_plain(url, groups, turns)}
        with fake_server(1.0) as (llm_url, fake_pid):
            results["llm_plain"] = llm_plain(url, llm_url, llm_turns, fake_pid)
            with local_ray():
                results["scale_ray"] = scale_ray(url, groups, turns, args.hosts)
                results["llm_ray"] = llm_ray(url, llm_url, llm_turns, fake_pid, args.llm_hosts)
    finally:
        if cluster is not None:
            cluster.remove()
    print(render(results, args.hosts, args.llm_hosts))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
