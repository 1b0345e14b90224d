"""The garbage collector as a busy runtime process wants it: young collections less often.

A turn allocates a few hundred short-lived objects (messages, rows, futures); with
Python's default threshold (a young collection every 700 net allocations) the collector
runs several times per turn and, more costly, promotes objects still in flight to the
older generations, whose collections walk the runtime's whole heap. A threshold of
10,000 cuts the CPU per turn of `bench/run.py`'s runtime case by a tenth or more on this
project's machine (`runtime_100_gc` beside `runtime_100`). It is a process-wide setting,
so the runtime itself never changes it: `run.py simulate` and `loadtest` (whose process
is theirs) set it while they run, and a host may do the same.

Example:
    >>> with tuned_collector():
    ...     run_workload()
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

THRESHOLDS = (10_000, 50, 50)
"""`gc.set_threshold` while a workload runs: young, middle and old generations."""


@contextmanager
def tuned_collector(thresholds: tuple[int, int, int] = THRESHOLDS) -> Iterator[None]:
    """Collect with `thresholds` meanwhile; put the process's own back afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(*thresholds)
    try:
        yield
    finally:
        gc.set_threshold(*before)
