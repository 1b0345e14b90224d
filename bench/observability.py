"""What metrics and tracing cost: turns/s with both on against both off, in one run.

100 groups of zero-latency simulated agents (every turn fires a run), driven flat out from
one caller thread per group, as `bench/run.py`'s `runtime_100` case. "off" is a runtime
as it starts by default (no metrics, no tracer provider); "on" has `metrics=True` and
traces through an OpenTelemetry SDK `TracerProvider` with a `BatchSpanProcessor`, every
turn sampled, into an exporter that drops the spans (sending them is the collector's
business, in its own process); "sampled" is "on" with the SDK's parent-based ratio sampler
keeping `--sample` of the turns (10%), as a busy service traces. Each measurement runs in
a fresh child process (one process measuring one after the other carries its heap and
caches along, and drifts by more than the effect measured). The modes take turns, in
one order and then the other, round after round, on fresh SQLite files, so the machine's
drift and noise fall on all alike. The cost is read two ways: from the medians of each
mode's turns/s, and as the median of the rounds' own ratios (each against the "off"
measured in the same round). The target: metrics and tracing cost at most 5% of turns/s.
With `--collector tuned` every mode runs with the garbage collector as `run.py simulate`
sets it (`cli/collector.py`): the spans' objects cost as much in collections as in their
making, and a host that tunes its collector pays less for them.

    python bench/observability.py                # 10 rounds of each mode (about 6 minutes)
    python bench/observability.py --rounds 5 --turns 10 --sample 0.01
    python bench/observability.py --split        # also metrics alone and tracing alone
    python bench/observability.py --collector tuned   # every mode with the collector tuned
    python bench/observability.py --db postgresql://user@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from bench.cases import measure_runtime
from cli.collector import tuned_collector

TARGET = 0.05
"""The most "on" may cost: 5% of the turns/s of "off"."""
GROUPS = 100
WORKERS = 32


class _Dropped(SpanExporter):
    """Takes every batch of spans and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def _traced(sample: float = 1.0) -> tuple[TracerProvider, _Dropped]:
    """A tracer provider keeping a `sample` fraction of the traces (the SDK's default
    sampler, parent-based, with that ratio at the root), exporting into nowhere."""
    exporter = _Dropped()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(sample)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


def measure(
    mode: str, url: str, turns: int, sample: float = 1.0, collector: str = "default"
) -> dict[str, Any]:
    """One measurement in `mode`, in this process: turns/s (steps, and until every run
    ended), CPU per turn, spans sent. Modes: off; on (metrics, and traces of every turn);
    sampled (metrics, and traces of a `sample` fraction of the turns); metrics; tracing.
    `collector`: "default" (Python's thresholds) or "tuned" (`cli.collector`'s)."""
    options: dict[str, Any] = {"tracing": False}
    provider, exporter = _traced(sample if mode == "sampled" else 1.0)
    if mode in ("on", "sampled", "metrics"):
        options["metrics"] = True
    if mode in ("on", "sampled", "tracing"):
        options["tracing"] = provider
    try:
        with tuned_collector() if collector == "tuned" else nullcontext():
            result = measure_runtime(mode, url, GROUPS, turns, GROUPS, WORKERS, options)
    finally:
        provider.shutdown()  # flushes what the batch processor still held
    return {
        "mode": mode,
        "turns": result.turns,
        "turns_per_s": result.turns_per_s,
        "turns_per_s_all_runs_done": result.turns_per_s_all_runs_done or 0.0,
        "cpu_ms_per_turn": float(result.details["cpu_ms_per_turn"]),
        "gc_ms_per_turn": float(result.details["gc_ms_per_turn"]),
        "spans": exporter.spans,
    }


def measure_in_child(
    mode: str, url: str, turns: int, sample: float, collector: str = "default"
) -> dict[str, Any]:
    """`measure` in a fresh Python process, so no measurement inherits another's heap."""
    command = [sys.executable, __file__, "--child", mode, "--db", url]
    command += ["--turns", str(turns), "--sample", str(sample), "--collector", collector]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} measurement failed: {done.stderr.strip()[-2000:]}")
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def _median(rows: list[dict[str, Any]], figure: str) -> float:
    return statistics.median(float(row[figure]) for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="measurements of each mode")
    parser.add_argument("--turns", type=int, default=20, help="turns per group per measurement")
    parser.add_argument("--split", action="store_true", help="also metrics alone, tracing alone")
    parser.add_argument(
        "--sample",
        type=float,
        default=0.1,
        metavar="RATIO",
        help="the fraction of turns the 'sampled' mode traces (a ratio sampler's)",
    )
    parser.add_argument("--db", metavar="URL", help="database URL (default: new SQLite files)")
    parser.add_argument(
        "--collector",
        choices=("default", "tuned"),
        default="default",
        help="the garbage collector's thresholds in every mode: Python's, or cli.collector's",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, for the parent: its figures as one JSON line
        print(json.dumps(measure(args.child, args.db, args.turns, args.sample, args.collector)))
        return 0
    modes = ["off", "on", "sampled", *(["metrics", "tracing"] if args.split else [])]
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    rows: list[dict[str, Any]] = []
    print(
        f"{GROUPS} groups x {args.turns} turns, zero-latency agents, every turn fires; "
        f"'on' traces every turn, 'sampled' {100 * args.sample:g}% of them; each "
        f"measurement in a new process; the collector {args.collector}"
    )
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            order = modes if round_ % 2 == 0 else list(reversed(modes))
            for mode in order:
                url = args.db or f"sqlite:///{Path(folder) / f'{mode}-{round_}.db'}"
                measured = measure_in_child(mode, url, args.turns, args.sample, args.collector)
                row = {"round": round_ + 1, **measured}
                results[mode].append(row)
                rows.append(row)
                print(
                    f"round {row['round']:>2} {mode:>8}: {row['turns_per_s']:7.1f} turns/s, "
                    f"{row['turns_per_s_all_runs_done']:7.1f} with every run done, "
                    f"{row['cpu_ms_per_turn']:.2f} ms CPU/turn "
                    f"({row['gc_ms_per_turn']:.2f} in gc), {row['spans']:,} spans",
                    flush=True,
                )
    off = results["off"]
    header = f"{'mode':>8} | {'turns/s':>8} | {'runs done':>9} | {'CPU/turn':>8} | {'cost':>6}"
    print()
    print(f"medians of {args.rounds} rounds, {GROUPS} groups x {args.turns} turns each:")
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {}
    for mode in modes:
        turns_per_s = _median(results[mode], "turns_per_s")
        done_per_s = _median(results[mode], "turns_per_s_all_runs_done")
        cpu = _median(results[mode], "cpu_ms_per_turn")
        cost = 1 - turns_per_s / _median(off, "turns_per_s")
        summary[mode] = {
            "turns_per_s": turns_per_s,
            "turns_per_s_all_runs_done": done_per_s,
            "cpu_ms_per_turn": cpu,
            "cost": cost,
        }
        print(
            f"{mode:>8} | {turns_per_s:8.1f} | {done_per_s:9.1f} | {cpu:6.2f}ms | "
            f"{100 * cost:5.1f}%"
        )
    paired = {
        mode: 1
        - statistics.median(
            on["turns_per_s"] / base["turns_per_s"]
            for on, base in zip(results[mode], off, strict=True)
        )
        for mode in modes
        if mode != "off"
    }
    print()
    print("median of the rounds' ratios to the off measured beside them:")
    for mode, cost in paired.items():
        summary[mode]["paired_cost"] = cost
        print(f"{mode:>8}: costs {100 * cost:5.1f}% of turns/s")
    print()
    verdicts = {}
    for mode, traced in (("on", "every turn"), ("sampled", f"{100 * args.sample:g}% of turns")):
        cost = max(summary[mode]["cost"], paired[mode])
        verdicts[mode] = "PASS" if cost <= TARGET else "MISS"
        print(
            f"target: metrics and tracing ({traced}) on cost at most {100 * TARGET:.0f}% of "
            f"turns/s: {100 * summary[mode]['cost']:.1f}% by the medians, "
            f"{100 * paired[mode]:.1f}% by the rounds' ratios ({verdicts[mode]})"
        )
    if args.json:
        figures = {"collector": args.collector, "rounds": rows, "medians": summary}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if "PASS" in verdicts.values() else 1


if __name__ == "__main__":
    raise SystemExit(main())
