"""The `simulate` and `loadtest` commands: their checks, their runtime, their summary.

`loadsim` drives the turns and measures them; this module turns the options into a
`loadsim.GroupShape`, starts a runtime over `--db` (or a new SQLite file in a temporary
directory), prints the summary and writes `--report` and `--plot`. Every option is checked
before anything is created, so a refused run leaves nothing behind.

Example:
    $ python run.py simulate --groups 100 --agents 2 --turns 20 --report sim.json
    $ python run.py loadtest --rate 200 --duration 10 --plot load.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actors import Runtime, configure_logging
from cli import fanout, loadsim
from cli.collector import tuned_collector
from cli.command import EXIT_ERROR, EXIT_FAILED, EXIT_OK, CommandError
from cli.options import llm_endpoint
from cli.tables import format_table, print_invariants
from persistence import redact

MAX_OFFERED_TURNS = 10_000_000
RAY_INSTALL_HINT = "pip install 'sleeptime-runtime[ray]'"


@contextmanager
def workload_runtime(
    args: argparse.Namespace, shape: loadsim.GroupShape
) -> Iterator[tuple[Runtime, str]]:
    """A runtime, and its URL, over `--db` or a new SQLite file in a new temporary directory.

    The directory is kept once the runtime has started (the summary prints where, to inspect
    it); a runtime that could not start takes it away again, so a refused run leaves nothing.
    Call it after every option is checked: it is the first thing that creates anything.
    """
    folder: Path | None = None
    url: str | None = args.db
    if url is None:
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"sleeptime-{args.command}-"))
        except OSError as error:
            raise CommandError(f"no temporary directory for the database: {error}") from error
        url = f"sqlite:///{folder / 'sleeptime.db'}"
    try:
        rt = Runtime.start(
            url,
            workers=args.workers,
            max_active_groups=args.max_active_groups,
            passivate_after=args.passivate_after,
            **shape.runtime_options(),
        )
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    with rt, tuned_collector():
        print(f"Database: {redact(url)}", flush=True)
        yield rt, url


def on_ray(args: argparse.Namespace) -> bool:
    """Whether the workload is fanned out over shard hosts on Ray (`--ray`, `--ray-address`)."""
    return getattr(args, "ray", None) is not None or getattr(args, "ray_address", None) is not None


def check_ray(args: argparse.Namespace) -> None:
    """Refuse `--ray` without a PostgreSQL `--db`, before anything starts."""
    if not on_ray(args):
        return
    scheme = (args.db or "").split(":", 1)[0]
    if not scheme.startswith("postgres"):
        given = f"--db {scheme}:..." if args.db else "no --db (a new SQLite file)"
        raise CommandError(
            f"--ray runs shard hosts that share one PostgreSQL database, and {given} is"
            " not one (a SQLite file has one process): give --db postgresql://..."
        )


@contextmanager
def ray_workload(
    args: argparse.Namespace, shape: loadsim.GroupShape
) -> Iterator[tuple[loadsim.Driven, loadsim.FanOut, list[str], str]]:
    """A client, the fan-out and the hosts of `--ray`, and the URL (see cli.ray_workloads)."""
    try:
        from cli import ray_workloads  # noqa: PLC0415  # Ray only when asked for
    except ImportError as error:
        raise CommandError(f"--ray needs Ray ({error}): {RAY_INSTALL_HINT}") from error
    options = {"workers": args.workers, **shape.runtime_options()}
    with ray_workloads.ray_hosts(args, options) as (client, cluster, hosts):
        print(f"Database: {redact(args.db)}", flush=True)
        yield client, cluster.run_on_hosts, hosts, args.db


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable --report/--plot paths, a plot format matplotlib cannot write and
    a missing matplotlib before any work (found after a long run, each was a traceback)."""
    for option, path in (("--report", args.report), ("--plot", args.plot)):
        if path is not None:
            _check_writable(option, path)
    if args.plot is not None:
        if not loadsim.plotting_available():
            raise CommandError(f"--plot needs matplotlib: {loadsim.PLOT_INSTALL_HINT}")
        formats = loadsim.plot_formats()
        if args.plot.suffix.lstrip(".").lower() not in formats:
            raise CommandError(
                f"--plot {args.plot}: end the name with one of "
                f"{', '.join('.' + f for f in sorted(formats))} (the image format)"
            )


def _check_writable(option: str, path: Path) -> None:
    """Refuse a path that is a directory, or that this process cannot create or write."""
    if path.is_dir():
        raise CommandError(f"{option} {path}: is a directory; give the path of a file")
    if not path.parent.is_dir():
        raise CommandError(f"{option} {path}: the directory {path.parent} does not exist")
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as error:
        raise CommandError(
            f"{option} {path}: cannot be written ({error.strerror or error})"
        ) from error
    if not existed:
        path.unlink(missing_ok=True)


def quiet_expected_warnings(args: argparse.Namespace) -> None:
    """Log only errors unless asked otherwise: injected crashes would bury the summary."""
    if args.log_level is None and "SLEEPTIME_LOG_LEVEL" not in os.environ:
        configure_logging(level="error", json=args.log_json)


def group_shape(args: argparse.Namespace) -> loadsim.GroupShape:
    """The simulated groups the workload options describe."""
    llm = llm_endpoint(args)
    if llm is not None:
        simulated = {"--latency-ms": args.latency_ms, "--jitter-ms": args.jitter_ms}
        simulated["--failure-rate"] = args.failure_rate
        given = [option for option, value in simulated.items() if value]
        if given:
            raise CommandError(
                f"{', '.join(given)} shape simulated agents; with --llm-url the model server"
                " decides latency and failures: leave them out"
            )
    return loadsim.GroupShape(
        agents=args.agents,
        frequency=args.frequency,
        latency_ms=args.latency_ms,
        distribution=args.latency_distribution,
        jitter_ms=args.jitter_ms,
        failure_rate=args.failure_rate,
        crash_rate=args.crash_rate,
        seed=args.seed,
        llm=llm,
    )


def parameters(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """Every option of the command, as the report keeps them."""
    given = {name: value for name, value in vars(args).items() if name != "handler"}
    given["db"] = redact(url)
    return {name: str(v) if isinstance(v, Path) else v for name, v in given.items()}


def simulate(args: argparse.Namespace) -> int:
    """The `simulate` command: G groups x A sleeptime agents x T turns, closed loop."""
    check_outputs(args)
    check_ray(args)
    shape = group_shape(args)
    quiet_expected_warnings(args)
    args.concurrency = concurrency = args.concurrency or min(args.groups, 32)  # as reported
    title = (
        f"simulate: {args.groups} groups x {args.agents} sleeptime agent(s) x {args.turns} "
        f"turns, frequency {_frequency_text(args.frequency)}, concurrency {concurrency}, "
        f"seed {args.seed}"
    )
    print(title, flush=True)
    if on_ray(args):
        with ray_workload(args, shape) as (client, fan_out, hosts, url):
            outcome = fanout.simulate_across(
                client,
                fan_out,
                hosts,
                shape,
                groups=args.groups,
                turns=args.turns,
                concurrency=concurrency,
                wait_timeout=args.wait_timeout,
                progress=not args.no_progress,
            )
        return conclude(args, url, outcome, title + f", over {len(hosts)} shard hosts")
    with workload_runtime(args, shape) as (rt, url):
        outcome = loadsim.simulate(
            rt,
            shape,
            groups=args.groups,
            turns=args.turns,
            concurrency=concurrency,
            wait_timeout=args.wait_timeout,
            progress=not args.no_progress,
        )
    return conclude(args, url, outcome, title)


def loadtest(args: argparse.Namespace) -> int:
    """The `loadtest` command: turns arrive at a rate for a duration, open loop."""
    offered = args.rate * args.duration
    if not 1 <= offered <= MAX_OFFERED_TURNS:
        raise CommandError(
            f"--rate {args.rate:g} for --duration {args.duration:g} s offers {offered:g} turns;"
            f" a load test offers from 1 to {MAX_OFFERED_TURNS:,} (the arrival times are"
            " drawn before the first turn)"
        )
    check_outputs(args)
    check_ray(args)
    shape = group_shape(args)
    quiet_expected_warnings(args)
    title = (
        f"loadtest: {args.rate:g} turns/s ({args.arrivals}) for {args.duration:g} s over "
        f"{args.groups} groups x {args.agents} sleeptime agent(s), frequency "
        f"{_frequency_text(args.frequency)}, seed {args.seed}"
    )
    if shape.llm is not None:
        title += f"; openai agents, {shape.llm.describe()}"
    print(title, flush=True)
    if on_ray(args):
        with ray_workload(args, shape) as (client, fan_out, hosts, url):
            outcome = fanout.loadtest_across(
                client,
                fan_out,
                hosts,
                shape,
                groups=args.groups,
                rate=args.rate,
                duration=args.duration,
                arrivals=args.arrivals,
                max_in_flight=args.max_in_flight,
                wait_timeout=args.wait_timeout,
                progress=not args.no_progress,
            )
        return conclude(args, url, outcome, title + f", over {len(hosts)} shard hosts")
    with workload_runtime(args, shape) as (rt, url):
        outcome = loadsim.loadtest(
            rt,
            shape,
            groups=args.groups,
            rate=args.rate,
            duration=args.duration,
            arrivals=args.arrivals,
            max_in_flight=args.max_in_flight,
            wait_timeout=args.wait_timeout,
            progress=not args.no_progress,
        )
    return conclude(args, url, outcome, title)


def conclude(args: argparse.Namespace, url: str, outcome: loadsim.Outcome, title: str) -> int:
    """Print the summary, write the report and the plot; 0 only if the outcome is ok."""
    report = loadsim.build_report(outcome, parameters(args, url))
    print()
    print_summary(report)
    written = True
    try:
        if args.report is not None:
            args.report.write_text(json.dumps(report, indent=2) + "\n")
            print(f"Report: {args.report}")
        if args.plot is not None:
            loadsim.plot(outcome, args.plot, title)
            print(f"Plot: {args.plot}")
    except OSError as error:  # (checked before the run; the disk may have filled since)
        print(f"error: could not write {error.filename or 'the output'}: {error}", file=sys.stderr)
        written = False
    if not outcome.ok:
        return EXIT_FAILED
    return EXIT_OK if written else EXIT_ERROR


def _frequency_text(frequency: int | None) -> str:
    return "none (every turn)" if frequency is None else str(frequency)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_summary(report: dict[str, Any]) -> None:
    """The figures, the latency percentiles and the invariants of a simulation's report."""
    runs: dict[str, int] = report["runs"]
    figures = [
        *((("shard hosts (Ray)", str(report["hosts"])),) if report.get("hosts") else ()),
        ("turns", str(report["turns"])),
        ("turns/s", f"{report['turns_per_second']:.1f}"),
    ]
    if "offered_rate" in report:
        figures += [
            ("offered rate (turns/s)", f"{report['offered_rate']:g}"),
            ("achieved rate (turns/s)", f"{report['achieved_rate']:.1f}"),
            ("arrivals", str(report["arrivals"])),
            ("late starts (all callers busy)", str(report["late_starts"])),
        ]
    figures += [
        ("time taking turns", f"{report['turns_elapsed_s']:.2f} s"),
        ("time until every run ended", f"{report['elapsed_s']:.2f} s"),
        *((f"runs {status}", str(count)) for status, count in runs.items()),
        ("turn errors", str(report["errors"]["count"])),
        (
            "peak RSS" + (" (a host)" if report.get("hosts") else ""),
            f"{report['peak_rss_mb']:.1f} MB",
        ),
        (
            "peak threads" + (" (a host)" if report.get("hosts") else ""),
            str(report["peak_threads"]),
        ),
        ("actor restarts", str(report["restarts"])),
        ("injected crashes", str(report["injected_crashes"])),
        ("escalated groups", str(report["escalations"])),
        ("passivations (actors made idle)", str(report["passivations"])),
        ("activations (actors woken)", str(report["activations"])),
    ]
    print(format_table(["figure", "value"], [list(row) for row in figures], right={1}))
    print()
    latency = dict(report["latency_ms"])
    if "start_delay_ms" in report:
        latency["start_delay"] = report["start_delay_ms"]
    labels = {
        "turn": "turn" + (" (from scheduled arrival)" if "offered_rate" in report else ""),
        "created_to_running": "run created -> running",
        "created_to_terminal": "run created -> terminal",
        "start_delay": "turn start delay",
    }
    rows = [
        [labels[name], *(_ms(figures_ms[q]) for q in ("p50", "p95", "p99", "max"))]
        for name, figures_ms in latency.items()
    ]
    headers = ["latency (ms)", "p50", "p95", "p99", "max"]
    print(format_table(headers, rows, right={1, 2, 3, 4}))
    for message in report["errors"]["first"]:
        print(f"error: {message}")
    print()
    print_invariants(report["invariants"], report["violations"])
