"""Callers for the benchmarks: a pool of threads that keeps every group active.

Caller thread k takes keys k, k + T, k + 2T, ... (T threads) and, round after round, makes
one call per key; so with more keys than threads every key is in use all along, and a key
listed T times is driven by T threads at once (contention on one group).

    >>> done = drive(group_ids, rounds=10, threads=64, call=lambda g: rt.step(g, hi).run_ids)
    >>> done.calls / done.seconds, done.percentile_ms(99)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cli.loadsim import percentile

K = TypeVar("K")
R = TypeVar("R")

MAX_ERRORS_KEPT = 5


@dataclass(slots=True)
class Drive(Generic[R]):
    """What the callers did: calls that returned, their results, latencies, errors."""

    started: float
    seconds: float
    results: list[R] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.results)

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, percent: float) -> float | None:
        """The latency below which `percent` % of the calls returned, in milliseconds."""
        if not self.latencies:
            return None
        return 1000 * percentile(sorted(self.latencies), percent)


def drive(keys: Sequence[K], rounds: int, threads: int, call: Callable[[K], R]) -> Drive[R]:
    """Call `call(key)` `rounds` times per key from `min(len(keys), threads)` threads.

    The clock starts when every thread is ready and stops when the last one is done. A
    call that raises is counted in `errors` (the first few are kept as text) and not in
    `results`.
    """
    count = max(1, min(len(keys), threads))
    shares = [list(keys[k::count]) for k in range(count)]
    barrier = threading.Barrier(count + 1)
    lock = threading.Lock()
    done: Drive[R] = Drive(started=0.0, seconds=0.0)

    def work(share: list[K]) -> None:
        results: list[R] = []
        latencies: list[float] = []
        errors: list[str] = []
        barrier.wait()
        for _ in range(rounds):
            for key in share:
                began = time.perf_counter()
                try:
                    result = call(key)
                except Exception as error:
                    errors.append(f"{type(error).__name__}: {error}")
                    continue
                latencies.append(time.perf_counter() - began)
                results.append(result)
        with lock:
            done.results += results
            done.latencies += latencies
            done.errors += len(errors)
            room = MAX_ERRORS_KEPT - len(done.first_errors)
            done.first_errors += errors[: max(0, room)]

    workers = [
        threading.Thread(target=work, args=(share,), name=f"bench-caller-{k}", daemon=True)
        for k, share in enumerate(shares)
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    done.started = time.perf_counter()
    for worker in workers:
        worker.join()
    done.seconds = time.perf_counter() - done.started
    return done
