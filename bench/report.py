"""The benchmark's report: the table of cases, the ratios, the scale lines and the targets.

Targets (from the issue): the runtime at 100 groups reaches 0.3x the SQLite limit and 10x
the naive baseline; at 10,000 groups peak RSS stays under 1.5 GiB with under 1,000 threads,
and the invariants hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.cases import CaseResult
from bench.llm import TARGET_CPU_MS_PER_TURN, TARGET_TURNS_PER_S

TARGET_LIMIT_RATIO = 0.3
TARGET_NAIVE_RATIO = 10.0
TARGET_LIMIT_RATIO_14 = 0.15  # issue 14's, on the way to issue 6's
TARGET_RUNTIME_CPU_MS = 1.0  # issue 14: a third of the ~3 ms a turn cost before it
TARGET_RSS_MB = 1.5 * 1024
TARGET_THREADS = 1000
TARGET_GROUPS = 10_000


@dataclass(frozen=True, slots=True)
class Target:
    """One target line: what was asked, whether it was met, and by how much."""

    name: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "----"}[self.passed]


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(rows: list[CaseResult]) -> str:
    """The cases as a plain-text table, columns aligned."""
    header = ["case", "groups", "turns", "turns/s", "runs done/s", "p50 ms", "p99 ms", "notes"]
    lines = [
        [
            row.case,
            f"{row.groups:,}",
            f"{row.turns:,}",
            _number(row.turns_per_s),
            _number(row.turns_per_s_all_runs_done),
            _number(row.p50_ms),
            _number(row.p99_ms),
            "; ".join(row.notes),
        ]
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    right = {1, 2, 3, 4, 5, 6}

    def render(cells: list[str]) -> str:
        parts = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def ratios(cases: dict[str, CaseResult]) -> dict[str, float]:
    """runtime(100 groups) / limit and / naive, from whichever cases ran."""
    found: dict[str, float] = {}
    for case in ("runtime_100", "runtime_100_gc"):
        runtime = cases.get(case)
        if runtime is None:
            continue
        for name, key in [
            (f"{case}/limit", "limit"),
            (f"{case}/limit_with_history", "limit_history"),
            (f"{case}/naive_100", "naive_100"),
        ]:
            other = cases.get(key)
            if other is not None and other.turns_per_s > 0:
                found[name] = runtime.turns_per_s / other.turns_per_s
    gc_tuned, plain = cases.get("runtime_100_gc"), cases.get("runtime_100")
    if gc_tuned is not None and plain is not None and plain.turns_per_s > 0:
        found["runtime_100_gc/runtime_100"] = gc_tuned.turns_per_s / plain.turns_per_s
    return found


def _ratio_target(name: str, ratio: float | None, wanted: float, base: float | None) -> Target:
    if ratio is None or base is None:
        return Target(name, None, "not measured")
    needed = wanted * base
    if ratio >= wanted:
        return Target(name, True, f"{ratio:.3g}x ({ratio / wanted:.2g}x the target)")
    return Target(
        name,
        False,
        f"{ratio:.3g}x: needs {needed:,.0f} turns/s, has {ratio * base:,.0f} "
        f"({wanted / ratio:.3g}x short)",
    )


def llm_targets(case: CaseResult | None) -> list[Target]:
    """Issue 7's lines: `openai` agents on a loopback fake, meant for PostgreSQL."""
    if case is None:
        return [Target("llm: >= 250 turns/s, <= 5 ms CPU/turn", None, "not measured")]
    rate = case.turns_per_s_all_runs_done or 0.0
    cpu = float(case.details.get("runtime_cpu_ms_per_turn", 0.0))
    on = f"on {case.details.get('database', '?')}"
    if case.details.get("database") != "postgresql":
        on += " (the target is for PostgreSQL: --db postgresql://...)"
    return [
        Target(
            "llm: >= 250 turns/s (every run ended)",
            rate >= TARGET_TURNS_PER_S,
            f"{rate:,.1f} turns/s {on}",
        ),
        Target(
            "llm: <= 5 ms runtime CPU per turn",
            cpu <= TARGET_CPU_MS_PER_TURN,
            f"{cpu:.2f} ms {on}",
        ),
    ]


def _cpu_target(case: CaseResult | None) -> Target:
    name = f"runtime CPU <= {TARGET_RUNTIME_CPU_MS:g} ms/turn (100 groups; issue 14)"
    cpu = None if case is None else case.details.get("cpu_ms_per_turn")
    if cpu is None:
        return Target(name, None, "not measured")
    return Target(
        name, cpu <= TARGET_RUNTIME_CPU_MS, f"{cpu:.2f} ms ({cpu / TARGET_RUNTIME_CPU_MS:.2f}x)"
    )


def targets(cases: dict[str, CaseResult], scale: dict[str, Any] | None) -> list[Target]:
    """The issue's target lines, PASS/MISS with the margin."""
    found = ratios(cases)
    limit, naive = cases.get("limit"), cases.get("naive_100")
    lines = [
        _ratio_target(
            "runtime >= 0.3x limit (100 groups)",
            found.get("runtime_100/limit"),
            TARGET_LIMIT_RATIO,
            None if limit is None else limit.turns_per_s,
        ),
        _ratio_target(
            "runtime >= 10x naive (100 groups)",
            found.get("runtime_100/naive_100"),
            TARGET_NAIVE_RATIO,
            None if naive is None else naive.turns_per_s,
        ),
        _ratio_target(
            "runtime >= 0.15x limit (100 groups; issue 14)",
            found.get("runtime_100/limit"),
            TARGET_LIMIT_RATIO_14,
            None if limit is None else limit.turns_per_s,
        ),
        _cpu_target(cases.get("runtime_100")),
    ]
    if "runtime_100_gc" in cases:  # what a host tuning its collector sees (cli.collector)
        tuned = _cpu_target(cases["runtime_100_gc"])
        name = tuned.name.replace("(100", "(gc tuned, 100")
        lines.append(Target(name, tuned.passed, tuned.detail))
    if scale is None:
        return [*lines, Target("10,000 groups", None, "not measured")]
    groups = scale.get("groups", 0)
    at = f"{groups:,} groups" + (
        "" if groups >= TARGET_GROUPS else f" (quick, not {TARGET_GROUPS:,})"
    )
    failure = scale.get("failed")
    rss, threads = scale.get("peak_rss_mb"), scale.get("peak_os_threads")
    if rss is None or threads is None:
        detail = failure or "not measured"
        return [
            *lines,
            Target(f"{at}: peak RSS < 1.5 GiB", False, detail),
            Target(f"{at}: < 1,000 threads", False, detail),
            Target(f"{at}: invariants hold", False, detail),
        ]
    suffix = f"; {failure}" if failure else ""
    rss_ok = rss < TARGET_RSS_MB and not failure
    threads_ok = threads < TARGET_THREADS and not failure
    invariants = scale.get("invariants_ok")
    lines += [
        Target(
            f"{at}: peak RSS < 1.5 GiB",
            rss_ok,
            f"{rss:,.0f} MB ({rss / TARGET_RSS_MB:.2f}x the 1,536 MB budget){suffix}",
        ),
        Target(
            f"{at}: < 1,000 threads",
            threads_ok,
            f"peak {threads:,} OS threads "
            f"({scale.get('peak_python_threads', 0):,} Python), "
            f"{threads / TARGET_THREADS:.1f}x the budget{suffix}",
        ),
        Target(
            f"{at}: invariants hold",
            bool(invariants),
            "ok" if invariants else (failure or f"violations: {scale.get('invariant_violations')}"),
        ),
    ]
    return lines


def scale_lines(scale: dict[str, Any] | None) -> list[str]:
    """The memory, thread and time lines of the scale step."""
    if scale is None:
        return ["scale step: not run"]
    groups = scale.get("groups", 0)
    lines = [f"scale step: {groups:,} groups x {scale.get('turns_per_group', '?')} turns"]
    if groups < TARGET_GROUPS:
        lines[0] += f"  (--quick: {groups:,} groups instead of {TARGET_GROUPS:,})"
    if "failed" in scale:
        lines.append(f"  failed: {scale['failed']}")
    shown = [
        ("peak RSS (VmHWM)", "peak_rss_mb", "MB"),
        ("RSS after creating the groups", "rss_after_create_mb", "MB"),
        ("peak threads (/proc Threads)", "peak_os_threads", ""),
        ("peak threads (threading)", "peak_python_threads", ""),
        ("create groups", "create_s", "s"),
        ("turns", "turns_s", "s"),
        ("turns/s", "turns_per_s", ""),
        ("turn p50 / p99", "turn_p50_ms", "ms"),
        ("until all runs done (from first turn)", "runs_done_s", "s"),
        ("check_invariants", "invariants_s", "s"),
        ("stop", "stop_s", "s"),
        ("child wall time", "wall_s", "s"),
    ]
    callers = scale.get("caller_threads")
    for label, key, unit in shown:
        value = scale.get(key)
        if value is None:
            continue
        text = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        if key == "turn_p50_ms":
            text = f"{value:,.1f} / {_number(scale.get('turn_p99_ms'))}"
        if key == "peak_os_threads" and callers:
            text += f" (incl. the benchmark's {callers} caller threads, its sampler and main)"
        lines.append(f"  {label:<40} {text} {unit}".rstrip())
    if "invariants_ok" in scale:
        lines.append(f"  {'invariants ok':<40} {scale['invariants_ok']}")
    errors = scale.get("turn_errors", 0) + scale.get("create_errors", 0)
    if errors:
        lines.append(f"  {'failed calls':<40} {errors} (e.g. {scale.get('first_errors', [])[:1]})")
    return lines


def targets_json(lines: list[Target]) -> list[dict[str, Any]]:
    return [{**asdict(line), "verdict": line.verdict} for line in lines]
