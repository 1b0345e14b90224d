"""Simulations and load tests fanned out over shard hosts: one call per host per phase.

The workload is cut in slices, one per host, and each slice runs on its host
(`FanOut`, e.g. `RayCluster.run_on_hosts`) against the groups that host created, so
its turns need no remote hop: `create_slice` makes a host's groups, then, all hosts
starting together at a time fixed in advance, `simulate_slice` drives them (closed
loop) or `loadtest_slice` offers them their arrivals (open loop). Each slice returns
what its callers saw (`SliceRecord`); the records are merged into one `Recorder`, and
the runs are waited for and the invariants checked through the client, as for a single
process: the same `Outcome`, report and plot.

Nothing here imports Ray: `FanOut` is any function that runs `fn(runtime, *arguments)`
where a slice belongs.

Example:
    >>> outcome = simulate_across(client, cluster.run_on_hosts, cluster.names(), shape,
    ...                           groups=100, turns=20, concurrency=32)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cli.loadsim import (
    START_MARGIN_S,
    Arrival,
    Arrivals,
    Driven,
    FanOut,
    GroupShape,
    LoadFigures,
    Outcome,
    ProgressBar,
    Recorder,
    Sampler,
    arrival_times,
    drive_groups,
    finish,
    offer_arrivals,
    peak_rss_mb,
)

CREATE_THREADS = 8
"""Threads a host creates its share of the groups on."""


@dataclass
class SliceRecord:
    """What one host's callers observed, with times relative to the common start."""

    latencies: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    peak_threads: int = 0
    peak_rss_mb: float = 0.0
    start_delays: list[float] = field(default_factory=list)
    late_starts: int = 0

    @classmethod
    def of(cls, seen: Recorder) -> SliceRecord:
        return cls(
            latencies=seen.latencies,
            done_at=seen.done_at,
            run_ids=seen.run_ids,
            errors=seen.errors,
            error_count=seen.error_count,
            peak_threads=seen.peak_threads,
            peak_rss_mb=peak_rss_mb(),
            start_delays=seen.start_delays,
            late_starts=seen.late_starts,
        )


def recorder_from(start_at: float) -> Recorder:
    """A Recorder whose clock starts at the wall-clock time `start_at` (`time.time()`)."""
    seen = Recorder()
    seen.started = time.perf_counter() + (start_at - time.time())
    return seen


def wait_until_start(seen: Recorder) -> None:
    """Sleep until the Recorder's start (every slice begins then)."""
    ahead = seen.started - time.perf_counter()
    if ahead > 0:
        time.sleep(ahead)


def merge(records: Sequence[SliceRecord], into: Recorder) -> float:
    """Add the slices' records to `into` (done times sorted); the highest peak RSS (MB)."""
    for record in records:
        into.latencies += record.latencies
        into.done_at += record.done_at
        into.run_ids += record.run_ids
        into.errors += record.errors
        into.error_count += record.error_count
        into.peak_threads = max(into.peak_threads, record.peak_threads)
        into.start_delays += record.start_delays
        into.late_starts += record.late_starts
    into.done_at.sort()
    del into.errors[5:]
    return max((record.peak_rss_mb for record in records), default=0.0)


# -- the slices: run on the hosts ----------------------------------------------------------


def create_slice(rt: Driven, shape: GroupShape, indices: Sequence[int]) -> list[str]:
    """Create the groups of `indices` (the simulation's group numbers) here; their ids."""
    threads = max(1, min(CREATE_THREADS, len(indices)))
    with ThreadPoolExecutor(threads, thread_name_prefix="sim-create") as pool:
        return list(pool.map(lambda index: shape.create_group(rt, index), indices))


def _sampled(seen: Recorder) -> threading.Event:
    """Sample the threads of this process while the slice runs; set the event to stop."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            seen.note_threads()

    threading.Thread(target=sample, name="sim-sampler", daemon=True).start()
    return stop


def simulate_slice(
    rt: Driven, group_ids: Sequence[str], turns: int, concurrency: int, start_at: float
) -> SliceRecord:
    """Drive this host's groups from `start_at` (closed loop, as `loadsim.simulate`)."""
    seen = recorder_from(start_at)
    wait_until_start(seen)
    stop = _sampled(seen)
    try:
        drive_groups(rt, group_ids, turns, concurrency, seen)
    finally:
        stop.set()
    return SliceRecord.of(seen)


def loadtest_slice(
    rt: Driven, arrivals: Sequence[Arrival], max_in_flight: int, start_at: float
) -> SliceRecord:
    """Offer this host's arrivals from `start_at` (open loop, as `loadsim.loadtest`)."""
    seen = recorder_from(start_at)
    stop = _sampled(seen)
    try:
        offer_arrivals(rt, arrivals, max_in_flight, seen)
    finally:
        stop.set()
    return SliceRecord.of(seen)


# -- the driver: cut, fan out, merge, check -------------------------------------------------


def create_across(
    fan_out: FanOut, hosts: Sequence[str], shape: GroupShape, groups: int
) -> tuple[list[str], dict[str, list[str]]]:
    """Create `groups` groups, host k making numbers k, k + N, ...: every group id in
    number order, and each host's own."""
    numbers = {host: list(range(k, groups, len(hosts))) for k, host in enumerate(hosts)}
    made: dict[str, list[str]] = fan_out(
        create_slice, {host: (shape, indices) for host, indices in numbers.items() if indices}
    )
    ordered = [""] * groups
    for host, ids in made.items():
        for index, group_id in zip(numbers[host], ids, strict=True):
            ordered[index] = group_id
    return ordered, made


def _per_host(total: int, hosts: int) -> int:
    return max(1, math.ceil(total / hosts))


def simulate_across(
    rt: Driven,
    fan_out: FanOut,
    hosts: Sequence[str],
    shape: GroupShape,
    groups: int,
    turns: int,
    concurrency: int,
    wait_timeout: float = 600.0,
    progress: bool = False,
) -> Outcome:
    """`loadsim.simulate` over `hosts`: each drives the groups it made, with its share of
    `concurrency`; the runs are waited for and checked through `rt`."""
    group_ids, made = create_across(fan_out, hosts, shape, groups)
    start_at = time.time() + START_MARGIN_S
    seen = recorder_from(start_at)
    bar = ProgressBar(progress)
    share = _per_host(concurrency, len(hosts))

    def detail() -> str:
        return f"{len(hosts)} hosts, {sampler.pending} runs pending"

    with bar.showing("turns", groups * turns), Sampler(rt, seen, bar, detail) as sampler:
        slices = {host: (ids, turns, min(share, len(ids)), start_at) for host, ids in made.items()}
        records: dict[str, SliceRecord] = fan_out(simulate_slice, slices)
        peak = merge(list(records.values()), seen)
        return finish(
            "simulate", rt, group_ids, seen, sampler, wait_timeout, hosts=len(hosts), peak_rss=peak
        )


def loadtest_across(
    rt: Driven,
    fan_out: FanOut,
    hosts: Sequence[str],
    shape: GroupShape,
    groups: int,
    rate: float,
    duration: float,
    arrivals: Arrivals = "poisson",
    max_in_flight: int = 512,
    wait_timeout: float = 600.0,
    progress: bool = False,
) -> Outcome:
    """`loadtest.loadtest` over `hosts`: the same arrivals (same seed), each offered by
    the host whose group it goes to; each host has its share of `max_in_flight` callers."""
    group_ids, made = create_across(fan_out, hosts, shape, groups)
    schedule = arrival_times(rate, duration, arrivals, shape.seed)
    host_of = {group_id: host for host, ids in made.items() for group_id in ids}
    offered: dict[str, list[Arrival]] = {host: [] for host in made}
    for number, at in enumerate(schedule):
        group_id = group_ids[number % groups]
        offered[host_of[group_id]].append((number, at, group_id))
    start_at = time.time() + START_MARGIN_S
    seen = recorder_from(start_at)
    bar = ProgressBar(progress)
    share = _per_host(max_in_flight, len(hosts))

    def detail() -> str:
        return f"{len(hosts)} hosts, {sampler.pending} runs pending"

    with bar.showing("turns", len(schedule)), Sampler(rt, seen, bar, detail) as sampler:
        slices = {host: (offered[host], share, start_at) for host in made}
        records: dict[str, SliceRecord] = fan_out(loadtest_slice, slices)
        peak = merge(list(records.values()), seen)
        load = LoadFigures(
            offered_rate=rate,
            duration_s=duration,
            arrivals_at=schedule,
            start_delays=seen.start_delays,
            late_starts=seen.late_starts,
        )
        return finish(
            "loadtest",
            rt,
            group_ids,
            seen,
            sampler,
            wait_timeout,
            load,
            hosts=len(hosts),
            peak_rss=peak,
        )
