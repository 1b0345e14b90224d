"""`prune`: remove what a database no longer needs (SPEC 18), or count it (`--dry-run`).

It starts a runtime over the database (read-only for a dry run), so on SQLite it runs
only while no service does; on PostgreSQL it joins the processes sharing the database
and prunes the groups of the shards it is given, reporting the others as skipped (a
service prunes the groups it serves itself, with `rt.prune`).

Example:
    >>> parse_age("30d"), parse_age("12h")
    (datetime.timedelta(days=30), datetime.timedelta(seconds=43200))
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from actors import PruneReport, Runtime
from cli.command import EXIT_OK, CommandError, command_name
from cli.tables import format_table
from messages import PRUNE_KINDS
from persistence import parse_url, redact, serving_processes, sqlite_file

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """`--older-than`: a number and a unit, s, m, h, d or w (`30d`, `12h`)."""
    found = _AGE.match(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 30d, 12h or 90m")
    try:
        age = timedelta(**{_UNITS[found.group(2)]: float(found.group(1))})
        _ = datetime.now(UTC) - age  # an age reaching back before year 1 is refused
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} reaches back before year 1: give a shorter age"
        ) from None
    return age


def parse_moment(text: str) -> datetime:
    """`--before`: an ISO date or date and time; UTC unless it names its offset."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO date or time such as 2025-01-31 or 2025-01-31T12:00:00Z"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def add_prune_options(parser: argparse.ArgumentParser) -> None:
    """The options of `prune`, named as `Runtime.prune`'s parameters."""
    age = parser.add_mutually_exclusive_group()
    age.add_argument(
        "--before",
        metavar="WHEN",
        type=parse_moment,
        help="runs completed (and turn requests made) before this ISO date or time (UTC)",
    )
    age.add_argument(
        "--older-than",
        metavar="AGE",
        type=parse_age,
        help="the same, as an age: 30d, 12h, 90m, 2w",
    )
    parser.add_argument(
        "--keep-runs", metavar="N", type=int, help="keep the newest N runs of each sleeptime agent"
    )
    parser.add_argument(
        "--messages",
        action="store_true",
        help="also remove primary messages every sleeptime agent has already processed",
    )
    parser.add_argument(
        "--keep-messages",
        metavar="N",
        type=int,
        help="with --messages: keep the newest N primary messages of each group",
    )
    parser.add_argument(
        "--keep-block-versions",
        metavar="N",
        type=int,
        help="keep the newest N versions of each memory block (the current one always stays)",
    )
    parser.add_argument(
        "--group",
        metavar="ID",
        action="append",
        help="only this group (repeatable; whole ids); default every group",
    )
    parser.add_argument(
        "--batch-size", metavar="N", type=int, default=500, help="rows per transaction"
    )
    parser.add_argument("--dry-run", action="store_true", help="only count what would be removed")


def prune(args: argparse.Namespace) -> int:
    """The `prune` command: remove (or count) what the options say, print what went."""
    file = sqlite_file(parse_url(args.db))
    if file is not None and not Path(file).exists():
        raise CommandError(f"no database at {file}: nothing to prune")
    serving = serving_processes(args.db)
    if serving:
        # It would join them as one more process: take its share of their shards (their
        # groups waiting meanwhile), prune only those, and hold their runs it cannot run.
        raise CommandError(
            f"{len(serving)} runtime process(es) serve this database now ({', '.join(serving)}):"
            " prune from inside them (rt.prune in each process prunes the groups it serves),"
            " or stop them first"
        )
    before = args.before
    if args.older_than is not None:
        before = datetime.now(UTC) - args.older_than
    rt = Runtime.start(args.db, read_only=args.dry_run)
    try:
        report = rt.prune(
            before=before,
            keep_runs=args.keep_runs,
            messages=args.messages,
            keep_messages=args.keep_messages,
            keep_block_versions=args.keep_block_versions,
            group_ids=args.group,
            batch_size=args.batch_size,
            dry_run=args.dry_run,
        )
    finally:
        rt.stop()
    print_report(report, redact(args.db), before)
    return EXIT_OK


def print_report(report: PruneReport, url: str, before: datetime | None) -> None:
    """What went (or would go), by kind, and the groups skipped."""
    verb = "Would remove" if report.dry_run else "Removed"
    when = "" if before is None else f", before {before.isoformat(timespec='seconds')}"
    print(f"{verb} from {report.groups} group(s) in {url}{when}:")
    rows = [[kind.replace("_", " "), str(report.removed.get(kind, 0))] for kind in PRUNE_KINDS]
    print(format_table(["kind", "rows"], rows, right={1}))
    if not report.dry_run:
        print(f"{len(report.by_group)} group(s) pruned in {report.batches} batch(es)")
    if report.skipped:
        print(
            f"{len(report.skipped)} group(s) skipped (served by another process): "
            + ", ".join(report.skipped[:10])
            + (" ..." if len(report.skipped) > 10 else "")
        )
    if report.dry_run and any(report.removed.values()):
        print(f"Run it again without --dry-run to remove them ({command_name()} prune ...).")
