"""`runs`, `groups`, `check` and `migrate`: looking inside an existing database.

Inspecting never creates a database: a SQLite file that is not there is an error that says
how to make one, and the runtime is started read-only. The filters take the short ids the
tables show (`short_id`) as well as whole ids.

Example:
    >>> resolve_id("group-ce60", ["group-ce60df3f-6986", "group-01ab"], LookupError)
    'group-ce60df3f-6986'
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from actors import InvariantReport, Runtime
from cli.command import EXIT_FAILED, EXIT_OK, CommandError, command_name
from cli.tables import (
    format_duration,
    format_table,
    format_time,
    print_invariants,
    run_duration,
    short_id,
    truncate,
)
from messages import AgentNotFound, GroupNotFound, Run
from persistence import parse_url, redact, sqlite_file


def open_existing(url: str) -> Runtime:
    """Start a runtime over a database that must already exist (inspecting makes none)."""
    file = sqlite_file(parse_url(url))
    path = None if file is None else Path(file)
    if path is not None and not path.exists():
        raise CommandError(
            f"no database at {path}: run '{command_name()} demo' first, or pass --db URL"
        )
    return Runtime.start(url, read_only=True)


def resolve_id(wanted: str, known: Sequence[str], missing: Callable[[str], Exception]) -> str:
    """The one id in `known` equal to `wanted` or starting with it (as the short ids shown)."""
    if wanted in known:
        return wanted
    matches = [object_id for object_id in known if object_id.startswith(wanted)]
    if not matches:
        raise missing(wanted)
    if len(matches) > 1:
        raise CommandError(f"{wanted!r} matches {len(matches)} ids: give more of the id")
    return matches[0]


def show_runs(args: argparse.Namespace) -> int:
    """The `runs` command: a table of runs, or one run's event history with --events."""
    rt = open_existing(args.db)
    try:
        if args.events is not None:
            print_events(rt, args.events)
            return EXIT_OK
        groups = rt.list_groups()
        group_id = agent_id = None
        if args.group is not None:
            group_id = resolve_id(args.group, [g.id for g in groups], GroupNotFound)
        if args.agent is not None:
            agents = [a for g in groups for a in (g.primary_agent_id, *g.sleeptime_agent_ids)]
            agent_id = resolve_id(args.agent, agents, AgentNotFound)
        runs = rt.list_runs(
            agent_id=agent_id,
            group_id=group_id,
            statuses=args.status,
            limit=args.limit + 1,  # one more: whether there is a next page at all
            newest_first=True,
            after=args.after,
        )
    finally:
        rt.stop(drain_timeout=0)
    more = len(runs) > args.limit
    runs = runs[: args.limit]
    if not runs:
        print("No more runs match." if args.after else "No runs match.")
        return EXIT_OK
    headers = ["run", "group", "agent", "status", "stop reason", "attempt", "turn", "window"]
    headers += ["created (UTC)", "duration", "error"]
    rows = [
        [
            run.id,
            short_id(run.group_id),
            short_id(run.agent_id),
            run.status.value,
            run.stop_reason.value if run.stop_reason else "-",
            str(run.attempt),
            str(run.turn),
            _window(run),
            format_time(run.created_at),
            run_duration(run),
            truncate(run.error),
        ]
        for run in runs
    ]
    print(format_table(headers, rows, right={5, 6, 9}))
    if more:
        print(f"{len(runs)} run(s), newest first; older ones: {next_page(args, runs[-1].id)}")
    else:
        print(f"{len(runs)} run(s), newest first")
    return EXIT_OK


def next_page(args: argparse.Namespace, last_id: str) -> str:
    """The command line that shows the next page: this one, `--after` the last row shown."""
    words = [command_name(), args.command, "--db", redact(args.db)]
    for option in ("group", "agent"):
        if getattr(args, option, None) is not None:
            words += [f"--{option}", getattr(args, option)]
    for status in getattr(args, "status", None) or ():
        words += ["--status", status]
    if getattr(args, "primary_kind", None) is not None:
        words += ["--primary-kind", args.primary_kind]
    return " ".join([*words, "--limit", str(args.limit), "--after", last_id])


def print_events(rt: Runtime, run_id: str) -> None:
    """One run's status changes, oldest first, with the time since it was created."""
    run = rt.get_run(run_id)
    events = rt.run_events(run_id)
    print(f"run {run.id}")
    print(f"  group {run.group_id}, agent {run.agent_id}")
    print(f"  turn {run.turn}, window {_window(run)} (primary messages), now {run.status.value}")
    if run.error:
        print(f"  error: {run.error}")
    rows = [
        [
            event.status.value,
            event.at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            "+" + format_duration(event.at - run.created_at),
            str(event.attempt),
            event.reason or "-",
        ]
        for event in events
    ]
    print(format_table(["status", "at (UTC)", "since created", "attempt", "reason"], rows, {2, 3}))


def _window(run: Run) -> str:
    return f"{run.window_first_seq}-{run.window_last_seq}"


def show_groups(args: argparse.Namespace) -> int:
    """The `groups` command: a table of the groups, oldest first, a page at a time, and
    where their counters and cursors are."""
    rt = open_existing(args.db)
    try:
        groups = rt.list_groups(
            statuses=args.status,
            primary_kind=args.primary_kind,
            limit=args.limit + 1,  # one more: whether there is a next page at all
            after=args.after,
        )
    finally:
        rt.stop(drain_timeout=0)
    more = len(groups) > args.limit
    groups = groups[: args.limit]
    if not groups:
        filtered = args.after or args.status or args.primary_kind
        print("No more groups match." if filtered else "No groups yet.")
        return EXIT_OK
    headers = ["group", "frequency", "counter", "turns", "cursor", "sleeptime agents", "status"]
    rows = [
        [
            group.id,
            "none" if group.frequency is None else str(group.frequency),
            str(group.counter),
            str(group.turns),
            short_id(group.cursor),
            str(len(group.sleeptime_agent_ids)),
            group.status + (f": {truncate(group.failure_reason)}" if group.failure_reason else ""),
        ]
        for group in groups
    ]
    print(format_table(headers, rows, right={1, 2, 3, 5}))
    if more:
        print(f"{len(groups)} group(s); more: {next_page(args, groups[-1].id)}")
    else:
        print(f"{len(groups)} group(s)")
    return EXIT_OK


def migrate(args: argparse.Namespace) -> int:
    """The `migrate` command: upgrade a database's schema to this version's."""
    before, after = Runtime.migrate(args.db)
    if before == after:
        print(f"The database is already at schema revision {after}.")
    else:
        print(f"Migrated the database from revision {before or '(empty)'} to {after}.")
    return EXIT_OK


def check(args: argparse.Namespace) -> int:
    """The `check` command: the invariants of an existing database; 1 if one is broken."""
    rt = open_existing(args.db)
    try:
        report: InvariantReport = rt.check_invariants()
    finally:
        rt.stop(drain_timeout=0)
    print(f"Checked {report.groups} group(s) and {report.runs} run(s) in {redact(args.db)}")
    print_invariants(report.checks, report.violations)
    return EXIT_OK if report.ok else EXIT_FAILED
