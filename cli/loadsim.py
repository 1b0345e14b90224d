"""Simulations and load tests of sleeptime groups: drive turns, measure them, report, plot.

Two ways to drive a runtime, both through its public API only (`run.py` is their command
line, `sleeptime simulate` and `sleeptime loadtest`):

- `simulate`: closed loop. G groups of simulated agents, each driven for T turns by one of
  `concurrency` caller threads, as fast as the runtime takes them.
- `loadtest`: open loop. Turns arrive at scheduled times (Poisson or evenly spaced) whatever
  the runtime does, and a turn's latency counts from its scheduled arrival, so a runtime that
  falls behind shows it in the latency instead of hiding it (no coordinated omission).

Both then wait for every sleeptime run, check the invariants of the groups they made, and
return an `Outcome`; `build_report` turns it into the JSON report and `plot` into a figure.

Example:
    >>> shape = GroupShape(agents=2, latency_ms=20, distribution="lognormal", jitter_ms=5)
    >>> with Runtime.start("sqlite:///sim.db", **shape.runtime_options()) as rt:
    ...     outcome = simulate(rt, shape, groups=10, turns=20, concurrency=10)
    >>> build_report(outcome, parameters={})["turns_per_second"]
"""

from __future__ import annotations

import bisect
import importlib.metadata
import math
import platform
import random
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from actors import Chaos, InvariantReport, RestartPolicy
from messages import (
    Group,
    GroupFailed,
    MessageCreate,
    PrimaryAgentError,
    Run,
    RunStatus,
    RunsTimeout,
    TurnResult,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Distribution = Literal["constant", "uniform", "exponential", "lognormal"]
DISTRIBUTIONS: tuple[Distribution, ...] = ("constant", "uniform", "exponential", "lognormal")
Arrivals = Literal["poisson", "uniform"]
ARRIVALS: tuple[Arrivals, ...] = ("poisson", "uniform")
PLOT_INSTALL_HINT = "pip install 'sleeptime-runtime[plot]'"
FIRST_ERRORS = 5
"""How many error messages a report keeps (the count covers them all)."""

_OPEN = (RunStatus.CREATED, RunStatus.RUNNING)
_PENDING_EVERY_S = 0.5  # counting open runs is a query: not more often than this
_SAMPLE_EVERY_S = 0.05  # threads come and go fast; sampling them is cheap
_RATE_WINDOW_S = 2.0  # the progress bar's turns/s is over this much recent time
_AGENT_SEED_BITS = 32
START_MARGIN_S = 0.5
"""How far ahead of now the slices of a fanned-out workload are told to start, together."""

R = TypeVar("R")


class Driven(Protocol):
    """What a workload calls: a `Runtime`, or a client with its API (`RayRuntime`)."""

    def create_group(
        self,
        primary: Any,
        sleeptime: Any,
        frequency: int | None = None,
        blocks: Any = None,
        preamble: str | None = None,
        transcript_max_messages: int | None = None,
        run_timeout: float = ...,
        max_attempts: int = ...,
    ) -> Group: ...

    def step(
        self,
        group_id: str,
        messages: Sequence[MessageCreate],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult: ...

    def wait_for_runs(self, run_ids: Sequence[str], timeout: float | None = None) -> list[Run]: ...

    def list_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Run]: ...

    def count_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
    ) -> int: ...

    def check_invariants(self, group_ids: Sequence[str] | None = None) -> InvariantReport: ...

    def stats(self) -> dict[str, int]: ...


FanOut = Callable[[Callable[..., Any], Mapping[str, Sequence[Any]]], dict[str, Any]]
"""Runs `fn(runtime, *arguments)` on each host named (name -> arguments), at once; the
results by host name (`RayCluster.run_on_hosts`)."""


# -- the groups ----------------------------------------------------------------------------


def agent_seed(seed: int, agent_index: int) -> int:
    """A seed for the `agent_index`-th agent of a simulation, distinct from every other's.

    >>> agent_seed(0, 5), agent_seed(1, 5)
    (5, 4294967301)
    """
    if not 0 <= agent_index < 2**_AGENT_SEED_BITS:
        raise ValueError(f"agent index {agent_index} is out of range")
    return (seed << _AGENT_SEED_BITS) + agent_index


@dataclass(frozen=True)
class LLMEndpoint:
    """An OpenAI-compatible chat-completions server for the agents, instead of simulated ones.

    Example:
        >>> LLMEndpoint("http://127.0.0.1:11434/v1", "llama3.2").spec()["kind"]
        'openai'
    """

    url: str
    model: str
    api_key_env: str | None = None

    def spec(self) -> dict[str, Any]:
        """The spec of an agent of the `openai` kind on this server."""
        config: dict[str, Any] = {"base_url": self.url, "model": self.model}
        if self.api_key_env is not None:
            config["api_key_env"] = self.api_key_env
        return {"kind": "openai", "config": config}

    def describe(self) -> str:
        return f"model {self.model} at {self.url}"


@dataclass(frozen=True)
class GroupShape:
    """What every simulated group looks like: its agents' latency and failures, and faults.

    The primary and the `agents` sleeptime agents are all of the built-in `simulated` kind
    with the same latency model; only sleeptime agents fail (at `failure_rate`), so every turn
    is taken and failures show up as failed runs. With `llm` they are all `openai` agents on
    that server instead, and the server decides latency and failures. `crash_rate` crashes
    the runtime's actors (fault injection), with a restart policy and `max_attempts`
    generous enough that the crashes cost time, not runs.
    """

    agents: int = 1
    frequency: int | None = 1
    latency_ms: float = 0.0
    distribution: Distribution = "constant"
    jitter_ms: float = 0.0
    failure_rate: float = 0.0
    crash_rate: float = 0.0
    seed: int = 0
    llm: LLMEndpoint | None = None

    def agent(self, group_index: int, position: int, failure_rate: float) -> dict[str, Any]:
        """The spec of one agent; `position` 0 is the primary, 1.. the sleeptime agents."""
        if self.llm is not None:
            return self.llm.spec()
        index = group_index * (self.agents + 1) + position
        config = {
            "latency_ms": self.latency_ms,
            "distribution": self.distribution,
            "jitter_ms": self.jitter_ms,
            "failure_rate": failure_rate,
            "seed": agent_seed(self.seed, index),
        }
        return {"kind": "simulated", "config": config}

    def create_group(self, rt: Driven, group_index: int) -> str:
        """Create the `group_index`-th group of the simulation; return its id."""
        group = rt.create_group(
            primary=self.agent(group_index, 0, failure_rate=0.0),
            sleeptime=[
                self.agent(group_index, n, self.failure_rate) for n in range(1, self.agents + 1)
            ],
            frequency=self.frequency,
            max_attempts=self.max_attempts,
        )
        return group.id

    @property
    def max_attempts(self) -> int:
        """Attempts per run: injected crashes re-queue runs, and must not use them all up."""
        return 10 if self.crash_rate > 0 else 3

    def runtime_options(self) -> dict[str, Any]:
        """The `Runtime.start` keyword arguments for this shape's fault injection."""
        if self.crash_rate <= 0:
            return {}
        return {
            # Agent failures come from the simulated kind; chaos only crashes actors.
            "chaos": Chaos(crash_rate=self.crash_rate, failure_rate=0.0, seed=self.seed),
            "restart_policy": RestartPolicy(
                max_restarts=100, within_seconds=10, backoff_base=0.001, backoff_max=0.05
            ),
        }


def create_groups(rt: Driven, shape: GroupShape, count: int, threads: int) -> list[str]:
    """Create `count` groups on up to `threads` threads; their ids, in index order."""
    with ThreadPoolExecutor(max(1, min(threads, count)), thread_name_prefix="sim-create") as pool:
        return list(pool.map(lambda index: shape.create_group(rt, index), range(count)))


def user_turn(number: int) -> list[MessageCreate]:
    """The input of one simulated turn."""
    return [MessageCreate(role="user", content=f"simulated turn {number}")]


# -- what the driving threads observe ------------------------------------------------------


class Recorder:
    """What the threads taking turns observed, gathered under one lock.

    Times are seconds on `time.perf_counter`, and relative to `started` where they say `_at`.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self.latencies: list[float] = []
        self.done_at: list[float] = []
        self.run_ids: list[str] = []
        self.errors: list[str] = []
        self.error_count = 0
        self.pending: list[tuple[float, int]] = [(0.0, 0)]
        self.peak_threads = threading.active_count()
        self.start_delays: list[float] = []
        self.late_starts = 0
        self.in_flight = 0

    def now(self) -> float:
        """Seconds since the recorder started."""
        return time.perf_counter() - self.started

    def turn_done(self, latency: float, result: TurnResult) -> None:
        """A turn was recorded (also one whose primary agent failed: its runs exist)."""
        with self._lock:
            self.latencies.append(latency)
            self.done_at.append(self.now())  # taken under the lock, so the list stays sorted
            self.run_ids.extend(result.run_ids)

    def turn_failed(self, error: Exception) -> None:
        """A turn raised; the first few messages are kept."""
        with self._lock:
            self.error_count += 1
            if len(self.errors) < FIRST_ERRORS:
                self.errors.append(f"{type(error).__name__}: {' '.join(str(error).split())}")

    def note_threads(self) -> None:
        """Sample the number of live threads."""
        count = threading.active_count()
        with self._lock:
            self.peak_threads = max(self.peak_threads, count)

    def note_pending(self, pending: int) -> None:
        """Sample the number of runs created and not yet terminal."""
        at = self.now()
        with self._lock:
            self.pending.append((at, pending))

    def arrival_submitted(self, callers: int) -> None:
        """An open-loop arrival was handed to the `callers` threads; late if all were busy."""
        with self._lock:
            if self.in_flight >= callers:
                self.late_starts += 1  # it queues for a caller thread
            self.in_flight += 1

    def arrival_started(self, scheduled: float) -> None:
        """A caller thread took an arrival scheduled at `scheduled` (perf_counter time)."""
        delay = time.perf_counter() - scheduled
        with self._lock:
            self.start_delays.append(delay)

    def arrival_ended(self) -> None:
        with self._lock:
            self.in_flight -= 1

    @property
    def turns(self) -> int:
        with self._lock:
            return len(self.done_at)

    def recent_rate(self) -> float:
        """Turns per second over the last `_RATE_WINDOW_S` seconds (or since the start)."""
        now = self.now()
        with self._lock:
            recent = len(self.done_at) - bisect.bisect_left(self.done_at, now - _RATE_WINDOW_S)
        return recent / max(min(now, _RATE_WINDOW_S), 1e-9)


def take_turn(rt: Driven, group_id: str, number: int, began: float, seen: Recorder) -> None:
    """Take one turn and record it (or its error), its latency counted from `began`.

    `GroupFailed` is re-raised: the group's later turns would only fail the same way.
    """
    try:
        result = rt.step(group_id, user_turn(number))
    except PrimaryAgentError as error:
        # The turn was recorded anyway (SPEC 7), and its runs must be waited for.
        if isinstance(error.result, TurnResult):
            seen.turn_done(time.perf_counter() - began, error.result)
        seen.turn_failed(error)
        return
    except GroupFailed as error:
        seen.turn_failed(error)
        raise
    except Exception as error:
        # A load generator reports what went wrong and goes on; it never dies of one turn.
        seen.turn_failed(error)
        return
    seen.turn_done(time.perf_counter() - began, result)


# -- progress ------------------------------------------------------------------------------


class ProgressBar:
    """A live progress bar on standard error (rich); nothing when disabled or not a terminal.

    Off a terminal (a CI log, a file) a live bar would only leave its last frame behind.
    """

    def __init__(self, enabled: bool) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        console = Console(stderr=True)
        if enabled and console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}"),
                console=console,
            )

    @contextmanager
    def showing(self, label: str, total: int) -> Iterator[ProgressBar]:
        """Show the bar while the block runs."""
        if self._progress is None:
            yield self
            return
        self._task = self._progress.add_task(label, total=total, detail="")
        with self._progress:
            yield self

    def show(self, done: int, detail: str, label: str | None = None) -> None:
        """Move the bar to `done` and replace its detail text (and label)."""
        if self._progress is None or self._task is None:
            return
        changes: dict[str, Any] = {"completed": done, "detail": detail}
        if label is not None:
            changes["description"] = label
        self._progress.update(self._task, **changes)


class Sampler:
    """Samples threads, open runs and progress in the background while turns are driven."""

    def __init__(
        self, rt: Driven, seen: Recorder, bar: ProgressBar, detail: Callable[[], str]
    ) -> None:
        self._rt = rt
        self._seen = seen
        self._bar = bar
        self._detail = detail
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sim-sampler", daemon=True)
        self.pending = 0
        self.label: str | None = None

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        counted = -math.inf
        while not self._stop.wait(_SAMPLE_EVERY_S):
            self._seen.note_threads()
            if self._seen.now() - counted >= _PENDING_EVERY_S:
                counted = self._seen.now()
                self.count_pending()
                self._bar.show(self._seen.turns, self._detail(), self.label)

    def count_pending(self) -> None:
        """Count the runs not yet terminal (all the database's: a fresh one holds only ours)."""
        try:
            self.pending = self._rt.count_runs(statuses=list(_OPEN))
        except Exception:
            return  # a sample is not worth failing the simulation for; the next one may do
        self._seen.note_pending(self.pending)


# -- the outcome ---------------------------------------------------------------------------


@dataclass
class LoadFigures:
    """What only an open-loop load test measures."""

    offered_rate: float
    duration_s: float
    arrivals_at: list[float]
    start_delays: list[float]
    late_starts: int


@dataclass
class Outcome:
    """Everything a simulation or load test measured, before it is reported."""

    command: str
    groups: list[str]
    turns: int
    turns_elapsed_s: float
    elapsed_s: float
    latencies: list[float]
    done_at: list[float]
    pending: list[tuple[float, int]]
    runs: list[Run]
    runs_left_open: int
    invariants: InvariantReport
    stats: dict[str, int]
    peak_threads: int
    errors: list[str]
    error_count: int
    load: LoadFigures | None = None
    hosts: int = 0
    """Shard hosts the workload was fanned out over (0: this process alone)."""
    peak_rss: float | None = None
    """The peak RSS in MB of the process(es) that ran the turns (None: this one, now)."""

    @property
    def ok(self) -> bool:
        """Some turns were taken, every invariant holds and no turn raised."""
        return self.turns > 0 and self.invariants.ok and self.error_count == 0

    @property
    def turns_per_second(self) -> float:
        return self.turns / self.turns_elapsed_s if self.turns_elapsed_s > 0 else 0.0

    @property
    def achieved_rate(self) -> float:
        """Turns per second over the offered duration, or until the last turn ended if later."""
        span = max(self.turns_elapsed_s, self.load.duration_s if self.load else 0.0)
        return self.turns / span if span > 0 else 0.0


def settle(
    rt: Driven, seen: Recorder, groups: Sequence[str], timeout: float
) -> tuple[list[Run], int]:
    """Wait for every run the turns created; the runs and how many were still open."""
    try:
        return rt.wait_for_runs(seen.run_ids, timeout=timeout), 0
    except RunsTimeout as error:
        wanted = set(seen.run_ids)
        runs = [r for g in groups for r in rt.list_runs(group_id=g) if r.id in wanted]
        return runs, len(set(error.open_run_ids))


def finish(
    command: str,
    rt: Driven,
    groups: list[str],
    seen: Recorder,
    sampler: Sampler,
    wait_timeout: float,
    load: LoadFigures | None = None,
    hosts: int = 0,
    peak_rss: float | None = None,
) -> Outcome:
    """Wait for the runs, check the invariants of `groups`, and gather the outcome."""
    turns_elapsed = seen.done_at[-1] if seen.done_at else seen.now()
    sampler.label = "runs "  # the bar stays full: what is left is waiting for the runs
    runs, left_open = settle(rt, seen, groups, wait_timeout)
    elapsed = seen.now()
    sampler.count_pending()
    return Outcome(
        command=command,
        groups=groups,
        turns=len(seen.done_at),
        turns_elapsed_s=turns_elapsed,
        elapsed_s=elapsed,
        latencies=seen.latencies,
        done_at=seen.done_at,
        pending=seen.pending,
        runs=runs,
        runs_left_open=left_open,
        invariants=rt.check_invariants(groups),
        stats=rt.stats(),
        peak_threads=seen.peak_threads,
        errors=seen.errors,
        error_count=seen.error_count,
        load=load,
        hosts=hosts,
        peak_rss=peak_rss,
    )


# -- simulate: closed loop -----------------------------------------------------------------


def drive_groups(
    rt: Driven,
    group_ids: Sequence[str],
    turns: int,
    concurrency: int,
    seen: Recorder,
) -> None:
    """Take `turns` turns on each group, `concurrency` groups at a time, one caller thread
    per group doing its turns one after the other (the runtime serializes a group's turns
    anyway); each is recorded in `seen`."""
    interrupted = threading.Event()

    def drive(group_id: str) -> None:
        for number in range(1, turns + 1):
            if interrupted.is_set():
                return
            try:
                take_turn(rt, group_id, number, time.perf_counter(), seen)
            except GroupFailed:
                return  # escalated: its later turns would fail the same way

    with ThreadPoolExecutor(concurrency, thread_name_prefix="sim-turns") as pool:
        try:
            for _ in pool.map(drive, group_ids):
                pass
        except BaseException:
            interrupted.set()  # Ctrl-C: each caller ends after the turn it is taking
            raise


def simulate(
    rt: Driven,
    shape: GroupShape,
    groups: int,
    turns: int,
    concurrency: int,
    wait_timeout: float = 600.0,
    progress: bool = False,
) -> Outcome:
    """Drive `groups` new groups for `turns` turns each, `concurrency` groups at a time.

    Each caller thread takes a group and does its turns one after the other; then every
    run is waited for and checked.
    """
    group_ids = create_groups(rt, shape, groups, concurrency)
    seen = Recorder()
    bar = ProgressBar(progress)

    def detail() -> str:
        return f"{seen.recent_rate():.0f} turns/s, {sampler.pending} runs pending"

    with bar.showing("turns", groups * turns), Sampler(rt, seen, bar, detail) as sampler:
        drive_groups(rt, group_ids, turns, concurrency, seen)
        return finish("simulate", rt, group_ids, seen, sampler, wait_timeout)


# -- loadtest: open loop -------------------------------------------------------------------


def arrival_times(rate: float, duration: float, arrivals: Arrivals, seed: int) -> list[float]:
    """When turns arrive, in seconds from the start, for `rate` turns/s over `duration` s.

    Poisson arrivals have exponential gaps drawn from `seed`; uniform ones are evenly spaced.

    >>> arrival_times(4, 1, "uniform", 0)
    [0.0, 0.25, 0.5, 0.75]
    """
    if rate <= 0 or duration <= 0:
        return []
    if arrivals == "uniform":
        return [k / rate for k in range(math.ceil(rate * duration)) if k / rate < duration]
    rng = random.Random(seed)
    times: list[float] = []
    at = rng.expovariate(rate)
    while at < duration:
        times.append(at)
        at += rng.expovariate(rate)
    return times


Arrival = tuple[int, float, str]
"""One turn of a load test: its number, when it arrives (seconds from the start), its group."""


def offer_arrivals(
    rt: Driven, arrivals: Sequence[Arrival], max_in_flight: int, seen: Recorder
) -> None:
    """Submit each arrival at its time, whatever the runtime does (open loop), to up to
    `max_in_flight` caller threads; a turn's latency counts from its scheduled arrival."""

    def arrive(number: int, scheduled: float, group_id: str) -> None:
        seen.arrival_started(scheduled)
        try:
            take_turn(rt, group_id, number + 1, scheduled, seen)
        except GroupFailed:
            pass  # recorded as an error; this group's later arrivals fail the same way
        finally:
            seen.arrival_ended()

    with ThreadPoolExecutor(max_in_flight, thread_name_prefix="load-turns") as pool:
        try:
            for number, at, group_id in arrivals:
                scheduled = seen.started + at
                wait = scheduled - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                seen.arrival_submitted(max_in_flight)
                pool.submit(arrive, number, scheduled, group_id)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: drop what waits
            raise


def loadtest(
    rt: Driven,
    shape: GroupShape,
    groups: int,
    rate: float,
    duration: float,
    arrivals: Arrivals = "poisson",
    max_in_flight: int = 512,
    wait_timeout: float = 600.0,
    progress: bool = False,
) -> Outcome:
    """Offer turns at `rate` per second for `duration` seconds to `groups` new groups.

    Arrivals are fixed in advance and submitted at their time whatever the runtime does;
    the groups take them round-robin. A turn that finds all `max_in_flight` callers busy
    waits for one (a late start); its latency still counts from its scheduled arrival.
    """
    group_ids = create_groups(rt, shape, groups, min(groups, 32))
    schedule = arrival_times(rate, duration, arrivals, shape.seed)
    seen = Recorder()
    bar = ProgressBar(progress)

    def detail() -> str:
        return (
            f"{seen.recent_rate():.0f} turns/s, {sampler.pending} runs pending, "
            f"{seen.in_flight} in flight, {seen.late_starts} late"
        )

    offered = [(n, at, group_ids[n % groups]) for n, at in enumerate(schedule)]
    with bar.showing("turns", len(schedule)), Sampler(rt, seen, bar, detail) as sampler:
        offer_arrivals(rt, offered, max_in_flight, seen)
        load = LoadFigures(
            offered_rate=rate,
            duration_s=duration,
            arrivals_at=schedule,
            start_delays=seen.start_delays,
            late_starts=seen.late_starts,
        )
        return finish("loadtest", rt, group_ids, seen, sampler, wait_timeout, load)


# -- figures -------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, interpolated between neighbours.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    """
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max, in milliseconds (None when there is nothing to measure)."""
    ordered = sorted(seconds)
    if not ordered:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    return {
        **{f"p{q}": round(1000 * percentile(ordered, q), 3) for q in (50, 95, 99)},
        "max": round(1000 * ordered[-1], 3),
    }


def _between(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def run_spans(runs: Sequence[Run]) -> tuple[list[float], list[float]]:
    """Seconds from created to running, and from created to terminal, of the runs."""
    to_running = [_between(r.created_at, r.started_at) for r in runs]
    to_terminal = [_between(r.created_at, r.completed_at) for r in runs if r.status.terminal]
    return [s for s in to_running if s is not None], [s for s in to_terminal if s is not None]


def per_second(times: Sequence[float], span: float) -> list[int]:
    """How many of `times` (seconds) fall in each whole second of [0, span).

    >>> per_second([0.1, 0.5, 1.2, 2.9], 3.0)
    [2, 1, 1]
    """
    buckets = [0] * max(1, math.ceil(span))
    for at in times:
        buckets[min(int(at), len(buckets) - 1)] += 1
    return buckets


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MB.

    On Linux from /proc (VmHWM): `ru_maxrss` of a child process starts at its parent's
    peak, so a child measured from a big parent would report the parent's memory.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def versions() -> dict[str, str | None]:
    """The versions of Python and of the packages that decide the figures."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("sleeptime-runtime", "sqlalchemy", "pykka", "pydantic"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def build_report(outcome: Outcome, parameters: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of an outcome: figures, invariants, parameters and versions."""
    statuses = Counter(run.status for run in outcome.runs)
    to_running, to_terminal = run_spans(outcome.runs)
    report: dict[str, Any] = {
        "command": outcome.command,
        "ok": outcome.ok,
        "groups": len(outcome.groups),
        "turns": outcome.turns,
        "turns_per_second": round(outcome.turns_per_second, 2),
        "turns_elapsed_s": round(outcome.turns_elapsed_s, 3),
        "elapsed_s": round(outcome.elapsed_s, 3),
        "runs": {status.value: statuses[status] for status in RunStatus},
        "runs_left_open": outcome.runs_left_open,
        "invariants": dict(outcome.invariants.checks),
        "violations": list(outcome.invariants.violations),
        "latency_ms": {
            "turn": summary_ms(outcome.latencies),
            "created_to_running": summary_ms(to_running),
            "created_to_terminal": summary_ms(to_terminal),
        },
        "errors": {"count": outcome.error_count, "first": list(outcome.errors)},
        "peak_rss_mb": peak_rss_mb() if outcome.peak_rss is None else outcome.peak_rss,
        "peak_threads": outcome.peak_threads,
        "restarts": outcome.stats.get("restarts", 0),
        "injected_crashes": outcome.stats.get("injected_crashes", 0),
        "escalations": outcome.stats.get("escalations", 0),
        "passivations": outcome.stats.get("passivations", 0),
        "activations": outcome.stats.get("activations", 0),
        "parameters": parameters,
        "versions": versions(),
    }
    if outcome.hosts:
        report["hosts"] = outcome.hosts
    if outcome.load is not None:
        load = outcome.load
        report.update(
            offered_rate=load.offered_rate,
            achieved_rate=round(outcome.achieved_rate, 2),
            arrivals=len(load.arrivals_at),
            late_starts=load.late_starts,
            start_delay_ms=summary_ms(load.start_delays),
        )
    return report


# -- the plot ------------------------------------------------------------------------------


def plotting_available() -> bool:
    """Whether matplotlib (the `plot` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401, PLC0415  # an optional extra: only when plotting
    except ImportError:
        return False
    return True


def plot_formats() -> set[str]:
    """The file extensions `plot` can write (matplotlib's Agg canvas formats)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    return set(FigureCanvasAgg(Figure()).get_supported_filetypes())


def plot(outcome: Outcome, path: Path, title: str) -> None:
    """Draw throughput and open runs over time, and the three latency histograms, to `path`.

    Uses matplotlib's Agg canvas directly, so no GUI backend or global pyplot state is
    involved; raises ImportError when matplotlib is missing (see `PLOT_INSTALL_HINT`).
    """
    # Imported here: matplotlib is an optional extra, and slow to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(13, 10), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    axes = figure.subplot_mosaic(
        [
            ["throughput", "throughput", "throughput"],
            ["pending", "pending", "pending"],
            ["turn", "to_running", "to_terminal"],
        ]
    )
    span = max(outcome.elapsed_s, outcome.load.duration_s if outcome.load else 0.0)
    done = per_second(outcome.done_at, span)
    throughput = axes["throughput"]
    throughput.bar(range(len(done)), done, width=1.0, align="edge", label="turns done")
    if outcome.load is not None:
        offered = per_second(outcome.load.arrivals_at, span)
        throughput.step(range(len(offered)), offered, where="post", color="C3", label="offered")
    throughput.set(title="Throughput", xlabel="second", ylabel="turns/s")
    throughput.legend(loc="upper right")

    pending = axes["pending"]
    pending.step([t for t, _ in outcome.pending], [n for _, n in outcome.pending], where="post")
    pending.set(title="Runs pending (created, not yet terminal)", xlabel="second", ylabel="runs")

    to_running, to_terminal = run_spans(outcome.runs)
    turn_title = "Turn latency" + (" (from scheduled arrival)" if outcome.load else "")
    for name, label, seconds in (
        ("turn", turn_title, outcome.latencies),
        ("to_running", "Run: created -> running", to_running),
        ("to_terminal", "Run: created -> terminal", to_terminal),
    ):
        _histogram(axes[name], label, [1000 * s for s in seconds])
    figure.savefig(path, dpi=100)


def _histogram(ax: Axes, title: str, values_ms: list[float]) -> None:
    ax.set(title=title, xlabel="ms", ylabel="count")
    if not values_ms:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        return
    ax.hist(values_ms, bins=max(10, min(60, len(values_ms) // 10)))
    ordered = sorted(values_ms)
    for q, style in ((50, "--"), (99, ":")):
        ax.axvline(percentile(ordered, q), color="C3", linestyle=style, label=f"p{q}")
    ax.legend(loc="upper right")
