"""The `sleeptime` command line: parses the arguments and hands each command to its module.

Every command works over the public runtime API (`actors.Runtime`) and never reaches into
the runtime's internals or the database directly. The commands live in `cli/`: the demo
(`cli.demo`), looking inside a database (`cli.inspection`: `runs`, `groups`, `check`,
`migrate`), retention (`cli.retention`: `prune`), and simulations and load tests
(`cli.workloads`; `cli.loadsim` measures them).

Every command that takes `--db` defaults to the runtime's own default, `DEFAULT_URL`
(sleeptime.db in the working directory): the demo adds its group there and `runs`,
`groups` and `check` read it. With no command it runs the demo, with the demo's options.

Example:
    $ python run.py                                  # the demo, a new group in sleeptime.db
    $ python run.py --frequency 3 --quiet-transcript # the demo, with its options
    $ python run.py groups
    $ python run.py runs
    $ python run.py runs --events run-5c1e...
    $ python run.py check
    $ python run.py prune --older-than 30d --keep-runs 100 --messages --keep-messages 200
    $ python run.py simulate --groups 100 --agents 2 --turns 20 --report sim.json
    $ python run.py loadtest --rate 200 --duration 10 --plot load.png
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from pydantic import ValidationError

from actors import DEFAULT_URL, configure_logging
from cli import loadsim
from cli.command import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    CommandError,
    command_name,
    error_line,
)
from cli.demo import demo
from cli.inspection import check, migrate, show_groups, show_runs
from cli.options import (
    CommandParser,
    add_llm_options,
    add_logging_options,
    add_workload_options,
    frequency_option,
    group_count,
    positive_float,
    positive_int,
)
from cli.retention import add_prune_options, prune
from cli.workloads import loadtest, simulate
from messages import RunStatus, SleeptimeError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command and option."""
    parser = CommandParser(
        prog=command_name(),
        description="sleeptime-runtime: a demo, and a look inside its databases.",
        epilog="Without a command it runs the demo (and takes the demo's options).",
    )
    add_logging_options(parser, None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")  # CommandParsers too
    # Defaults are suppressed after the command so they do not hide ones given before it.
    logging_after = argparse.SUPPRESS

    demo_parser = commands.add_parser(
        "demo", help="a short conversation that shows memory improving"
    )
    demo_parser.add_argument(
        "--db",
        metavar="URL",
        default=DEFAULT_URL,
        help="database URL; the demo adds a new group to it",
    )
    demo_parser.add_argument(
        "--frequency",
        metavar="N",
        type=frequency_option,
        default=2,
        help="fire sleeptime every N turns; 'none' for every turn, 0 for never",
    )
    demo_parser.add_argument(
        "--quiet-transcript", action="store_true", help="do not print the transcripts"
    )
    add_llm_options(demo_parser)
    add_logging_options(demo_parser, logging_after)
    demo_parser.set_defaults(handler=demo)

    runs_parser = commands.add_parser("runs", help="a table of sleeptime runs")
    runs_parser.add_argument("--db", metavar="URL", default=DEFAULT_URL, help="database URL")
    runs_parser.add_argument(
        "--group", metavar="ID", help="only this group's runs (its id or the short id shown)"
    )
    runs_parser.add_argument(
        "--agent", metavar="ID", help="only this agent's runs (its id or the short id shown)"
    )
    runs_parser.add_argument(
        "--status",
        action="append",
        metavar="STATUS",
        choices=[status.value for status in RunStatus],
        help="only runs with this status: created, running, completed, failed or cancelled"
        " (repeatable)",
    )
    runs_parser.add_argument(
        "--limit",
        metavar="N",
        type=positive_int,
        default=50,
        help="at most this many runs (a page)",
    )
    runs_parser.add_argument(
        "--after",
        metavar="RUN_ID",
        help="the page after this run (the last one the previous page showed)",
    )
    runs_parser.add_argument("--events", metavar="RUN_ID", help="show this run's event history")
    add_logging_options(runs_parser, logging_after)
    runs_parser.set_defaults(handler=show_runs)

    groups_parser = commands.add_parser("groups", help="a table of groups")
    groups_parser.add_argument("--db", metavar="URL", default=DEFAULT_URL, help="database URL")
    groups_parser.add_argument(
        "--status",
        action="append",
        metavar="STATUS",
        choices=["active", "failed"],
        help="only groups with this status: active or failed (repeatable)",
    )
    groups_parser.add_argument(
        "--primary-kind", metavar="KIND", help="only groups whose primary agent is of this kind"
    )
    groups_parser.add_argument(
        "--limit", metavar="N", type=positive_int, default=100, help="at most this many groups"
    )
    groups_parser.add_argument(
        "--after",
        metavar="GROUP_ID",
        help="the page after this group (the last one the previous page showed)",
    )
    add_logging_options(groups_parser, logging_after)
    groups_parser.set_defaults(handler=show_groups)

    migrate_parser = commands.add_parser(
        "migrate", help="upgrade a database's schema (a runtime does it on start by default)"
    )
    migrate_parser.add_argument("--db", metavar="URL", required=True, help="database URL")
    add_logging_options(migrate_parser, logging_after)
    migrate_parser.set_defaults(handler=migrate)

    simulate_parser = commands.add_parser(
        "simulate",
        help="G groups x A sleeptime agents x T turns; checks the invariants",
        description="Drive new groups of simulated agents, CONCURRENCY groups at a time, each"
        " for T turns; wait for every sleeptime run, check the invariants and print a summary."
        " Exit code 0 only if every invariant holds and every turn was taken. Logs only"
        " errors unless --log-level or $SLEEPTIME_LOG_LEVEL says otherwise.",
    )
    simulate_parser.add_argument(
        "--groups", metavar="G", type=group_count, default=20, help="groups"
    )
    simulate_parser.add_argument(
        "--turns", metavar="T", type=positive_int, default=20, help="turns per group"
    )
    simulate_parser.add_argument(
        "--concurrency",
        metavar="N",
        type=positive_int,
        default=None,
        help="groups driven at once, one caller thread each (default: min(groups, 32))",
    )
    add_workload_options(simulate_parser)
    add_logging_options(simulate_parser, logging_after)
    simulate_parser.set_defaults(handler=simulate)

    loadtest_parser = commands.add_parser(
        "loadtest",
        help="an open-loop arrival rate of turns for a duration; latency percentiles",
        description="Offer turns at --rate per second for --duration seconds, at times fixed in"
        " advance whatever the runtime does (open loop), to --groups groups round-robin. A"
        " turn's latency counts from its scheduled arrival, so queueing shows. Exit code 0"
        " only if no turn raised and every invariant holds.",
    )
    loadtest_parser.add_argument(
        "--rate", metavar="PER_S", type=positive_float, default=50.0, help="turns/s offered"
    )
    loadtest_parser.add_argument(
        "--duration",
        metavar="SECONDS",
        type=positive_float,
        default=10.0,
        help="how long turns arrive",
    )
    loadtest_parser.add_argument(
        "--groups", metavar="G", type=group_count, default=20, help="groups"
    )
    loadtest_parser.add_argument(
        "--arrivals",
        choices=loadsim.ARRIVALS,
        default="poisson",
        help="Poisson arrivals (exponential gaps from --seed) or evenly spaced",
    )
    loadtest_parser.add_argument(
        "--max-in-flight",
        metavar="N",
        type=positive_int,
        default=512,
        help="caller threads; an arrival finding all busy waits and counts as a late start",
    )
    add_workload_options(loadtest_parser)
    add_llm_options(loadtest_parser)
    add_logging_options(loadtest_parser, logging_after)
    loadtest_parser.set_defaults(handler=loadtest)

    check_parser = commands.add_parser(
        "check",
        help="only check the invariants of an existing database (exit code 1 if one fails)",
    )
    check_parser.add_argument("--db", metavar="URL", default=DEFAULT_URL, help="database URL")
    add_logging_options(check_parser, logging_after)
    check_parser.set_defaults(handler=check)

    prune_parser = commands.add_parser(
        "prune",
        help="remove old runs, processed messages, old block versions (or count them)",
        description="Remove what the database no longer needs, in batches of one transaction"
        " each: terminal runs completed before --before/--older-than (keeping the newest"
        " --keep-runs per agent) with their events and sleeptime histories, turn requests"
        " made before it, primary messages every sleeptime agent has processed (--messages),"
        " and block versions beyond the newest --keep-block-versions. The invariants"
        " (`check`) still hold afterwards. --dry-run only counts.",
    )
    prune_parser.add_argument("--db", metavar="URL", default=DEFAULT_URL, help="database URL")
    add_prune_options(prune_parser)
    add_logging_options(prune_parser, logging_after)
    prune_parser.set_defaults(handler=prune)
    return parser


class _LeadingOptions(argparse.ArgumentParser):
    """Only the options that may come before a command; a mistake raises, printing nothing."""

    def __init__(self) -> None:
        super().__init__(add_help=False, exit_on_error=False)
        add_logging_options(self, None)
        self.add_argument("-h", "--help", action="store_true")

    def error(self, message: str) -> NoReturn:
        raise argparse.ArgumentError(None, message)


def demo_by_default(arguments: list[str]) -> list[str]:
    """The arguments, with `demo` in front when they name no command.

    No command runs the demo, so the demo's options work without its name too:
    `run.py --quiet-transcript` is `run.py demo --quiet-transcript`. What comes first is read
    past the options allowed before a command (logging, help) to see if a command follows.

    >>> demo_by_default(["--log-level", "info", "groups"])
    ['--log-level', 'info', 'groups']
    >>> demo_by_default(["--log-json", "--frequency", "3"])
    ['demo', '--log-json', '--frequency', '3']
    """
    try:
        leading, rest = _LeadingOptions().parse_known_args(arguments)
    except argparse.ArgumentError:
        return arguments  # a bad logging option: the full parser says what is wrong
    if leading.help or (rest and not rest[0].startswith("-")):
        return arguments  # the top-level help, or a command (argparse checks its name)
    return ["demo", *arguments]


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code is 0 on success, 2 (with one line on stderr) on error."""
    arguments = demo_by_default(sys.argv[1:] if argv is None else list(argv))
    try:
        args = build_parser().parse_args(arguments)
    except SystemExit as exit_:
        # argparse has printed its usage and message already; return instead of exiting.
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    configure_logging(level=args.log_level, json=args.log_json)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (SleeptimeError, ValidationError, CommandError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (e.g. `| head`) left; point stdout at /dev/null so the final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
