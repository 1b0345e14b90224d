"""Memory and threads at many groups, measured in a child process so a failure is contained.

The child creates the groups (1 sleeptime agent each, frequency 1, zero latency) from the
caller pool, runs `turns` turns per group, waits for every run, checks the invariants, and
writes what it saw to a JSON file after each phase; a sampler thread reads the thread count
(`threading.active_count()` and /proc/self/status `Threads`) and RSS every 0.1 s. The
parent runs it with a timeout and turns any failure into "failed: <reason>".

    >>> scale = measure_in_child(run_py, "sqlite:///scale.db", groups=10_000, turns=3,
    ...                          threads=64, workers=32, timeout=600)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from actors import Runtime
from bench.cases import MESSAGE, SIMULATED
from bench.drive import drive
from cli.loadsim import peak_rss_mb

SAMPLE_EVERY_S = 0.1


def _proc_status() -> dict[str, int]:
    """Threads, VmRSS and VmHWM (kB) of this process, from /proc/self/status."""
    wanted = {"Threads", "VmRSS", "VmHWM"}
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in wanted:
                    found[name] = int(value.split()[0])
    except OSError:
        pass
    return found


class Sampler:
    """Samples the thread counts and RSS of this process every 0.1 s; keeps the peaks."""

    def __init__(self) -> None:
        self.peak_python_threads = threading.active_count()
        self.peak_os_threads = _proc_status().get("Threads", 0)
        self.peak_sampled_rss_mb = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.sample()

    def sample(self) -> None:
        status = _proc_status()
        self.samples += 1
        self.peak_python_threads = max(self.peak_python_threads, threading.active_count())
        self.peak_os_threads = max(self.peak_os_threads, status.get("Threads", 0))
        self.peak_sampled_rss_mb = max(self.peak_sampled_rss_mb, status.get("VmRSS", 0) / 1024)

    def figures(self) -> dict[str, Any]:
        self.sample()
        return {
            "peak_rss_mb": peak_rss_mb(),
            "peak_sampled_rss_mb": self.peak_sampled_rss_mb,
            "peak_python_threads": self.peak_python_threads,
            "peak_os_threads": self.peak_os_threads,
            "samples": self.samples,
        }


def run_scale(
    url: str, groups: int, turns: int, threads: int, workers: int, out: Path
) -> dict[str, Any]:
    """Create `groups` groups, run `turns` turns each, wait for the runs (in the child)."""
    sampler = Sampler()
    sampler.start()
    figures: dict[str, Any] = {
        "groups": groups,
        "turns_per_group": turns,
        "caller_threads": threads,
        "workers": workers,
        "phase": "start",
    }

    def save(phase: str) -> None:
        figures.update(sampler.figures(), phase=phase)
        out.write_text(json.dumps(figures, indent=2))

    began = time.perf_counter()
    rt = Runtime.start(url, workers=workers)
    try:
        created = drive(
            range(groups),
            1,
            threads,
            lambda _: rt.create_group(primary=SIMULATED, sleeptime=[SIMULATED], frequency=1).id,
        )
        ids = created.results
        figures.update(create_s=created.seconds, create_errors=created.errors)
        figures["rss_after_create_mb"] = _proc_status().get("VmRSS", 0) / 1024
        save("created")
        stepped = drive(ids, turns, threads, lambda g: rt.step(g, MESSAGE).run_ids)
        figures.update(
            turns=stepped.calls,
            turn_errors=stepped.errors,
            first_errors=created.first_errors + stepped.first_errors,
            turns_s=stepped.seconds,
            turns_per_s=stepped.per_second,
            turn_p50_ms=stepped.percentile_ms(50),
            turn_p99_ms=stepped.percentile_ms(99),
        )
        save("stepped")
        runs = rt.wait_for_runs([r for t in stepped.results for r in t], timeout=600)
        figures.update(
            runs=len(runs),
            runs_done_s=time.perf_counter() - stepped.started,
            total_s=time.perf_counter() - began,
            stats=rt.stats(),
        )
        save("runs done")
        checked = time.perf_counter()
        report = rt.check_invariants(ids)
        figures.update(
            invariants_ok=report.ok,
            invariant_violations=report.violations[:5],
            invariants_s=time.perf_counter() - checked,
        )
        save("checked")
    finally:
        stopping = time.perf_counter()
        rt.stop()
        figures["stop_s"] = time.perf_counter() - stopping
    sampler.stop()
    save("stopped")
    return figures


def child_main(url: str, groups: int, turns: int, threads: int, workers: int, out: Path) -> int:
    """The hidden `--scale-child` mode of bench/run.py."""
    run_scale(url, groups, turns, threads, workers, out)
    return 0


def measure_in_child(
    script: Path,
    url: str,
    *,
    groups: int,
    turns: int,
    threads: int,
    workers: int,
    timeout: float,
) -> dict[str, Any]:
    """Run the scale measurement in a child process; a failure comes back as `failed`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scale.json"
        command = [
            sys.executable,
            str(script),
            "--scale-child",
            "--db",
            url,
            "--groups",
            str(groups),
            "--turns",
            str(turns),
            "--threads",
            str(threads),
            "--workers",
            str(workers),
            "--scale-result",
            str(out),
        ]
        began = time.perf_counter()
        failed: str | None = None
        try:
            done = subprocess.run(
                command, check=False, capture_output=True, text=True, timeout=timeout
            )
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                failed = f"exit code {done.returncode}: {tail[:300]}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout:.0f} s"
        figures: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    figures["wall_s"] = time.perf_counter() - began
    if failed is not None:
        figures["failed"] = f"{failed} (during phase after '{figures.get('phase', 'start')}')"
    return figures
