"""The `sleeptime` command line: a demo, and tables of what a database holds.

It is a thin layer over the public runtime API (`actors.Runtime`); it never reaches into
the runtime's internals or the database directly. It also drives simulations and load tests
(`simulate`, `loadtest`: the measuring is in `loadsim.py`) and checks a database's invariants
(`check`).

Every command that takes `--db` defaults to the runtime's own default, `DEFAULT_URL`
(sleeptime.db in the working directory): the demo adds its group there and `runs`,
`groups` and `check` read it.

Example:
    $ python run.py                                  # the demo, a new group in sleeptime.db
    $ python run.py groups
    $ python run.py runs
    $ python run.py runs --events run-5c1e...
    $ python run.py check
    $ python run.py simulate --groups 100 --agents 2 --turns 20 --report sim.json
    $ python run.py loadtest --rate 200 --duration 10 --plot load.png
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO, TypeVar

from pydantic import ValidationError

import loadsim
from actors import InvariantReport, Runtime, configure_logging
from actors.runtime import DEFAULT_URL  # Runtime.start's own default: one default everywhere
from messages import (
    AgentNotFound,
    Group,
    GroupNotFound,
    MessageCreate,
    Run,
    RunStatus,
    SleeptimeError,
)

DEMO_WAIT_SECONDS = 30.0
LLM_WAIT_SECONDS = 600.0  # a sleeptime run of a real model takes several model calls
EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
MAX_OFFERED_TURNS = 10_000_000
N = TypeVar("N", int, float)

# The demo's user turns. With frequency 2 the sleeptime agent reads turns 1, 2-3 and 4-5
# after turns 1, 3 and 5, so the answers go "don't know" (3), "orange" (5, out of date:
# turn 4 is not read yet), "coral" (6). tests/test_cli.py checks that this really happens.
DEMO_TURNS = (
    "Hi! My name is Ada and I live in Lisbon.",
    "My favorite color is orange.",
    "What is my favorite color?",
    "Actually, my favorite color is coral.",
    "What is my favorite color?",
    "Do you remember my favorite color?",
)
_LOG_LEVELS = ("debug", "info", "warning", "error")
_SQLITE_FILE = re.compile(r"^sqlite(?:\+\w+)?:///(?P<path>[^?]+)")


class CommandError(Exception):
    """A mistake in the command's arguments, found by the command itself."""


# -- pure formatting ------------------------------------------------------------------------


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()
) -> str:
    """Lay out rows under headers in aligned columns; columns in `right` align right.

    >>> print(format_table(["id", "n"], [["a", "1"], ["bcd", "22"]], right={1}))
    id    n
    ---  --
    a     1
    bcd  22
    """
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table has {len(headers)} columns")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        laid = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(laid).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def short_id(object_id: str | None) -> str:
    """The kind prefix and first 8 characters of an id; still a usable prefix for filters.

    >>> short_id("group-ce60df3f-6986-40c7-96fc-0b676aed11ff")
    'group-ce60df3f'
    """
    if object_id is None:
        return "-"
    prefix, dash, rest = object_id.partition("-")
    return f"{prefix}-{rest[:8]}" if dash and len(rest) > 8 else object_id


def format_duration(span: timedelta | None) -> str:
    """A duration for people: `8 ms`, `1.25 s`, `3m05s`; `-` when unknown."""
    if span is None:
        return "-"
    seconds = span.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def format_time(moment: datetime | None) -> str:
    """A timestamp to the second, as stored (UTC); `-` when unset."""
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def truncate(text: str | None, width: int = 40) -> str:
    """One line of at most `width` characters; `-` for nothing."""
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def fire_reason(frequency: int | None, counter: int, fired: bool, turn: int) -> str:
    """Why a turn fired or not, in a few words, from the counter the turn stored (SPEC 4).

    >>> fire_reason(2, 1, False, 2)
    'counter 1 of 2; fires next on turn 3'
    """
    if frequency is None:
        return "no frequency: every turn"
    if frequency == 0:
        return "frequency 0: sleeptime is paused"
    if fired:
        return f"counter {counter} of {frequency}"
    return f"counter {counter} of {frequency}; fires next on turn {turn + frequency - counter}"


def firing_turns(frequency: int | None, turns: int) -> list[int]:
    """The turns, of `turns`, on which a new group with this frequency fires (SPEC 4)."""
    if frequency is None:
        return list(range(1, turns + 1))
    if frequency == 0:
        return []
    return list(range(1, turns + 1, frequency))


def block_diff(before: str, after: str) -> list[str]:
    """The lines that changed: removed ones marked `-`, new ones `+`, in block order.

    >>> block_diff("name: Ada\\ncolor: orange", "name: Ada\\ncolor: coral")
    ['- color: orange', '+ color: coral']
    """
    marked = difflib.ndiff(before.splitlines(), after.splitlines())
    # Kept lines ("  ") are the bulk of a block and "? " hints point at single characters.
    return [line for line in marked if line.startswith(("- ", "+ "))]


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for any other database (or in-memory SQLite)."""
    found = _SQLITE_FILE.match(url)
    if found is None or found["path"] == ":memory:":
        return None
    return Path(found["path"])


def error_line(error: Exception) -> str:
    """One line saying what went wrong; pydantic's errors are folded to `field: problem`."""
    if isinstance(error, ValidationError):
        problems = [
            f"{'.'.join(str(part) for part in problem['loc']) or 'input'}: {problem['msg']}"
            for problem in error.errors()
        ]
        return "invalid input: " + "; ".join(problems)
    return " ".join(str(error).split()) or type(error).__name__


# -- the demo ------------------------------------------------------------------------------


class Demo:
    """Plays `DEMO_TURNS` on a new group and prints what each agent did, for newcomers."""

    def __init__(
        self,
        rt: Runtime,
        out: TextIO,
        show_transcripts: bool,
        llm: loadsim.LLMEndpoint | None = None,
    ) -> None:
        self.rt = rt
        self.out = out
        self.show_transcripts = show_transcripts
        self.llm = llm
        self.wait_seconds = DEMO_WAIT_SECONDS if llm is None else LLM_WAIT_SECONDS
        self.preamble_shown = False
        self.turns_read = 0  # the last turn handed to the sleeptime agent
        self.answers: list[tuple[int, str, str]] = []  # (turn, question, reply)

    def say(self, text: str = "") -> None:
        """Print one line of the demo."""
        print(text, file=self.out)

    def play(self, frequency: int | None, db_label: str, inspect_url: str) -> int:
        """Run the whole demo; the exit code is 0 when every sleeptime run completed."""
        primary: dict[str, Any] = {"kind": "scripted"}
        sleeper_spec: dict[str, Any] = {"kind": "memory"}
        if self.llm is not None:
            primary = sleeper_spec = self.llm.spec()
        group = self.rt.create_group(
            primary={**primary, "name": "primary"},
            sleeptime=[{**sleeper_spec, "name": "memory agent"}],
            frequency=frequency,
        )
        sleeper = group.sleeptime_agent_ids[0]
        self.introduce(frequency, db_label)
        for said in DEMO_TURNS:
            self.turn(group, sleeper, said)
        return self.summarize(group, sleeper, inspect_url)

    def introduce(self, frequency: int | None, db_label: str) -> None:
        """Say what is about to happen and when sleeptime will fire."""
        fires = firing_turns(frequency, len(DEMO_TURNS))
        lag = " So memory runs a little behind the conversation: watch the color questions."
        if frequency is None:
            when = "With no frequency set it fires after every turn." + lag
        elif not fires:
            when = "With frequency 0 sleeptime is paused: it never fires, so memory stays empty."
        else:
            listed = ", ".join(map(str, fires))
            when = f"With frequency {frequency} it fires after turns {listed}." + lag
        self.say("sleeptime-runtime demo")
        intro = (
            "The primary agent answers from its memory, the 'human' block (shown as 'memory'"
            " at each turn), but never writes it. The sleeptime agent does: after a turn, in"
            f" the background, it reads what was said since its last run and records facts. {when}"
        )
        if self.llm is not None:
            intro += (
                f" Both agents are LLMs here ({self.llm.describe()}): the primary agent sees"
                " the memory blocks in its prompt, the sleeptime agent edits them with its"
                " memory tools."
            )
        for line in textwrap.wrap(intro, width=96):
            self.say(line)
        self.say(f"Database: {db_label} (the demo adds a new group; nothing is deleted)")

    def turn(self, group: Group, sleeper: str, said: str) -> None:
        """Take one user turn, show the reply, and, if sleeptime fired, wait for its run."""
        memory_before = self.human(sleeper)
        result = self.rt.step(group.id, [MessageCreate(role="user", content=said)])
        counter = self.rt.get_group(group.id).counter
        reply = " ".join(m.text() for m in result.messages if m.role == "assistant")
        if said.rstrip().endswith("?"):
            self.answers.append((result.turn, said, reply))
        self.say()
        self.say(f"Turn {result.turn}")
        self.say(f"  user:      {said}")
        self.say(f"  memory:    {_one_line(memory_before)}")
        self.say(f"  assistant: {reply}")
        why = fire_reason(group.frequency, counter, result.fired, result.turn)
        if not result.fired:
            self.say(f"  sleeptime: waits ({why})")
            return
        if not result.run_ids:
            self.say(f"  sleeptime: fires ({why}), but nothing new was said: no run")
            return
        first, self.turns_read = self.turns_read + 1, result.turn
        turns = f"turn {first}" if first == result.turn else f"turns {first}-{result.turn}"
        listen = ", from this transcript:" if self.show_transcripts else ""
        self.say(f"  sleeptime: fires ({why}): the memory agent reads {turns}{listen}")
        for run in self.rt.wait_for_runs(result.run_ids, timeout=self.wait_seconds):
            self.show_run(run, memory_before)

    def show_run(self, run: Run, memory_before: str) -> None:
        """Show a finished run: the transcript it was given, its status, its edits."""
        if self.show_transcripts:
            transcript = next(
                (m.text() for m in self.rt.list_messages(run.agent_id) if m.run_id == run.id),
                "(not stored)",
            )
            for line in self.abridge(transcript):
                self.say(f"    | {line}" if line else "    |")
        took = format_duration(_run_time(run))
        outcome = f"{run.status.value} ({run.stop_reason or 'no stop reason'}) in {took}"
        if run.error:
            outcome += f": {truncate(run.error, 60)}"
        self.say(f"  run:       {outcome}")
        memory_after = self.human(run.agent_id)
        if memory_after == memory_before:
            self.say("  edits:     none")
            return
        changes = block_diff(memory_before, memory_after)
        self.say(f"  edits:     {changes[0]}")
        for line in changes[1:]:
            self.say(f"             {line}")

    def abridge(self, transcript: str) -> list[str]:
        """The transcript's lines; the preamble only the first time, then one line for it."""
        lines = transcript.splitlines()
        if not self.preamble_shown:
            self.preamble_shown = True
            return lines
        if "</system-reminder>" not in lines:
            return lines
        end = lines.index("</system-reminder>")
        rest = lines[end + 1 :]
        # The blank line after the preamble goes too: the marker line stands in for both.
        if rest and not rest[0]:
            rest = rest[1:]
        return ["<system-reminder> (the same preamble as above) </system-reminder>", *rest]

    def summarize(self, group: Group, sleeper: str, inspect_url: str) -> int:
        """Recap the answers, runs and final memory; 1 if a run did not complete."""
        runs = self.rt.list_runs(group_id=group.id)
        self.say()
        turns = self.rt.get_group(group.id).turns
        self.say(f"Summary: {turns} turns; the questions were answered:")
        for turn, question, reply in self.answers:
            self.say(f"  turn {turn}: {question} -> {reply}")
        self.say(f"{len(runs)} sleeptime run(s)" + (":" if runs else "."))
        for run in runs:
            stop = run.stop_reason.value if run.stop_reason else "no stop reason"
            self.say(f"  after turn {run.turn}: {run.id} {run.status.value} ({stop})")
        self.say("The human block now reads:")
        for line in self.human(sleeper).splitlines() or ["(empty)"]:
            self.say(f"  {line}")
        self.say("Look inside the database with:")
        command = _command_name()
        db = "" if inspect_url == DEFAULT_URL else f" --db {redact_url(inspect_url)}"
        self.say(f"  {command} groups{db}")
        self.say(f"  {command} runs{db}")
        if runs:
            self.say(f"  {command} runs{db} --events {runs[0].id}")
        self.say(f"  {command} check{db}")
        incomplete = [run for run in runs if run.status is not RunStatus.COMPLETED]
        if incomplete:
            self.say(f"{len(incomplete)} run(s) did not complete: see the runs above.")
            return EXIT_FAILED
        return EXIT_OK

    def human(self, agent_id: str) -> str:
        """The `human` block's text as this agent sees it ("" when there is none)."""
        block = self.rt.get_blocks(agent_id).get("human")
        return "" if block is None else block.value


def _one_line(block: str) -> str:
    return " | ".join(block.splitlines()) or "(empty)"


def _window(run: Run) -> str:
    return f"{run.window_first_seq}-{run.window_last_seq}"


def _run_time(run: Run) -> timedelta | None:
    if run.started_at is None or run.completed_at is None:
        return None
    return run.completed_at - run.started_at


def _command_name() -> str:
    """How the user started us: `sleeptime` when installed, else `python run.py`."""
    return "sleeptime" if Path(sys.argv[0]).name == "sleeptime" else "python run.py"


def demo(args: argparse.Namespace) -> int:
    """The `demo` command: a new group in the default database, or in --db; nothing deleted."""
    url: str = args.db
    llm = llm_endpoint(args)  # checked before the database is opened (or created)
    path = sqlite_path(url)
    db_label = str(path.resolve()) if path is not None else redact_url(url)
    with Runtime.start(url) as rt:
        demo = Demo(rt, sys.stdout, not args.quiet_transcript, llm)
        return demo.play(args.frequency, db_label, url)


def llm_endpoint(args: argparse.Namespace) -> loadsim.LLMEndpoint | None:
    """The model server `--llm-url` and `--model` name, or None for the built-in agents."""
    url: str | None = getattr(args, "llm_url", None)
    model: str | None = getattr(args, "model", None)
    if url is None and model is None:
        return None
    if url is None or model is None:
        raise CommandError("--llm-url and --model go together: give both, or neither")
    return loadsim.LLMEndpoint(url, model, getattr(args, "api_key_env", None))


# -- inspection ----------------------------------------------------------------------------


def open_existing(url: str) -> Runtime:
    """Start a runtime over a database that must already exist (inspecting makes none)."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise CommandError(
            f"no database at {path}: run '{_command_name()} demo' first, or pass --db URL"
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
            limit=args.limit,
            newest_first=True,
        )
    finally:
        rt.stop(drain_timeout=0)
    if not runs:
        print("No runs match.")
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
            format_duration(_run_time(run)),
            truncate(run.error),
        ]
        for run in runs
    ]
    print(format_table(headers, rows, right={5, 6, 9}))
    if len(runs) == args.limit:
        print(f"{len(runs)} run(s), newest first; older ones may be left out: raise --limit")
    else:
        print(f"{len(runs)} run(s), newest first")
    return EXIT_OK


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


def show_groups(args: argparse.Namespace) -> int:
    """The `groups` command: a table of every group and where its counter and cursor are."""
    rt = open_existing(args.db)
    try:
        groups = rt.list_groups()
    finally:
        rt.stop(drain_timeout=0)
    if not groups:
        print("No groups yet.")
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


# -- simulate, loadtest, check -------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL with its password hidden, fit to print and to keep in a report.

    >>> redact_url("postgresql://ada:secret@db:5432/sim")
    'postgresql://ada:***@db:5432/sim'
    """
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


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
        rt = Runtime.start(url, workers=args.workers, **shape.runtime_options())
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    with rt:
        print(f"Database: {redact_url(url)}", flush=True)
        yield rt, url


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable --report/--plot paths and a missing matplotlib before any work."""
    for option, path in (("--report", args.report), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():
            raise CommandError(f"{option} {path}: the directory {path.parent} does not exist")
    if args.plot is not None and not loadsim.plotting_available():
        raise CommandError(f"--plot needs matplotlib: {loadsim.PLOT_INSTALL_HINT}")


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
    given["db"] = redact_url(url)
    return {name: str(v) if isinstance(v, Path) else v for name, v in given.items()}


def simulate(args: argparse.Namespace) -> int:
    """The `simulate` command: G groups x A sleeptime agents x T turns, closed loop."""
    check_outputs(args)
    shape = group_shape(args)
    quiet_expected_warnings(args)
    args.concurrency = concurrency = args.concurrency or min(args.groups, 32)  # as reported
    title = (
        f"simulate: {args.groups} groups x {args.agents} sleeptime agent(s) x {args.turns} "
        f"turns, frequency {_frequency_text(args.frequency)}, concurrency {concurrency}, "
        f"seed {args.seed}"
    )
    print(title, flush=True)
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
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        print(f"Report: {args.report}")
    if args.plot is not None:
        loadsim.plot(outcome, args.plot, title)
        print(f"Plot: {args.plot}")
    return EXIT_OK if outcome.ok else EXIT_FAILED


def _frequency_text(frequency: int | None) -> str:
    return "none (every turn)" if frequency is None else str(frequency)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_summary(report: dict[str, Any]) -> None:
    """The figures, the latency percentiles and the invariants of a simulation's report."""
    runs: dict[str, int] = report["runs"]
    figures = [
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
        ("peak RSS", f"{report['peak_rss_mb']:.1f} MB"),
        ("peak threads", str(report["peak_threads"])),
        ("actor restarts", str(report["restarts"])),
        ("injected crashes", str(report["injected_crashes"])),
        ("escalated groups", str(report["escalations"])),
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


def print_invariants(checks: dict[str, bool], violations: Sequence[str]) -> None:
    """A table of invariant -> pass/FAIL, then the violations found."""
    rows = [[name, "pass" if held else "FAIL"] for name, held in checks.items()]
    print(format_table(["invariant", "result"], rows))
    broken = [name for name, held in checks.items() if not held]
    if broken:
        print(f"{len(broken)} invariant(s) FAILED: {', '.join(broken)}")
    else:
        print(f"All {len(checks)} invariants hold.")
    for violation in violations:
        print(f"violation: {violation}")


def check(args: argparse.Namespace) -> int:
    """The `check` command: the invariants of an existing database; 1 if one is broken."""
    rt = open_existing(args.db)
    try:
        report: InvariantReport = rt.check_invariants()
    finally:
        rt.stop(drain_timeout=0)
    print(f"Checked {report.groups} group(s) and {report.runs} run(s) in {redact_url(args.db)}")
    print_invariants(report.checks, report.violations)
    return EXIT_OK if report.ok else EXIT_FAILED


# -- the command line ----------------------------------------------------------------------


def frequency_option(text: str) -> int | None:
    """`--frequency`: a whole number of 0 or more, or `none` for every turn."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    # Checked here, not only by the runtime, so a typo fails before a database is opened.
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not 0, a positive whole number, or 'none'")
    return value


def _number(
    convert: Callable[[str], N], accept: Callable[[N], bool], wanted: str
) -> Callable[[str], N]:
    """An argparse `type`: `convert` the text, refuse it unless `accept` holds."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a whole number of 1 or more")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number of 0 or more")
non_negative_float = _number(float, lambda v: 0 <= v < math.inf, "a number of 0 or more")
positive_float = _number(float, lambda v: 0 < v < math.inf, "a number above 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a fraction from 0 to 1")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default shown unless its help already says it.

    Only real defaults are shown: an option whose default is None (nothing given) or False
    (a flag) says in its own words what happens without it, if anything.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        shown = action.help is None or "(default" in action.help
        if shown or default is None or default is False or default == argparse.SUPPRESS:
            return action.help
        text = f"{default:g}" if isinstance(default, float) else str(default)
        # The help is a %-format string (argparse fills %(prog)s and the like in).
        return f"{action.help} (default: {text.replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose help shows each option's default (see `HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_logging_options(parser: argparse.ArgumentParser, default: object) -> None:
    """The logging options, accepted before and after the command name."""
    parser.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default=default,
        help="how much the runtime logs to stderr (default: warning, or $SLEEPTIME_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-json", action="store_true", default=default, help="log JSON lines instead of text"
    )


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    """The options `simulate` and `loadtest` share: the agents, faults, database and outputs."""
    agents = parser.add_argument_group("agents (all of the built-in 'simulated' kind)")
    agents.add_argument(
        "--agents", metavar="A", type=positive_int, default=1, help="sleeptime agents per group"
    )
    agents.add_argument(
        "--frequency",
        metavar="N",
        type=frequency_option,
        default=1,
        help="fire sleeptime every N turns; 'none' for every turn, 0 for never",
    )
    agents.add_argument(
        "--latency-ms",
        metavar="MS",
        type=non_negative_float,
        default=0.0,
        help="each agent step's latency",
    )
    agents.add_argument(
        "--latency-distribution",
        choices=loadsim.DISTRIBUTIONS,
        default="constant",
        help="how step latencies spread around --latency-ms",
    )
    agents.add_argument(
        "--jitter-ms",
        metavar="MS",
        type=non_negative_float,
        default=0.0,
        help="the latency's spread: +- for constant and uniform, sigma*latency for lognormal",
    )
    agents.add_argument(
        "--failure-rate",
        metavar="P",
        type=fraction,
        default=0.0,
        help="fraction of sleeptime steps that fail (their runs end failed); the primary"
        " agent never fails",
    )
    agents.add_argument(
        "--crash-rate",
        metavar="P",
        type=fraction,
        default=0.0,
        help="fault injection: fraction of messages on which an actor crashes and is"
        " restarted by its supervisor",
    )
    agents.add_argument(
        "--seed",
        metavar="S",
        type=non_negative_int,
        default=0,
        help="seeds every agent (each its own), the arrivals and the crashes",
    )
    runtime = parser.add_argument_group("runtime and outputs")
    runtime.add_argument(
        "--db",
        metavar="URL",
        default=None,
        help="database URL (default: a new SQLite file in a temporary directory, printed)",
    )
    runtime.add_argument(
        "--workers",
        metavar="N",
        type=positive_int,
        default=32,
        help="the runtime's agent step threads",
    )
    runtime.add_argument(
        "--wait-timeout",
        metavar="SECONDS",
        type=positive_float,
        default=600.0,
        help="how long to wait for the runs after the last turn",
    )
    runtime.add_argument(
        "--report", metavar="FILE.json", type=Path, help="also write the figures as JSON"
    )
    runtime.add_argument(
        "--plot",
        metavar="FILE.png",
        type=Path,
        help="also draw throughput, runs pending and latency histograms"
        f" (needs matplotlib: {loadsim.PLOT_INSTALL_HINT})",
    )
    runtime.add_argument(
        "--no-progress", action="store_true", help="no progress bar on standard error"
    )


def add_llm_options(parser: argparse.ArgumentParser) -> None:
    """`--llm-url`, `--model`, `--api-key-env`: LLM agents (the `openai` kind) instead."""
    llm = parser.add_argument_group(
        "LLM agents (the 'openai' kind, on any OpenAI-compatible chat-completions server)"
    )
    llm.add_argument(
        "--llm-url",
        metavar="URL",
        help="the server's base URL, e.g. http://127.0.0.1:11434/v1 (Ollama),"
        " http://127.0.0.1:8000/v1 (vLLM); the primary and sleeptime agents are then LLMs",
    )
    llm.add_argument("--model", metavar="NAME", help="the model to ask (needs --llm-url)")
    llm.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="the environment variable holding the API key (local servers need none)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command and option."""
    parser = CommandParser(
        prog=_command_name(),
        description="sleeptime-runtime: a demo, and a look inside its databases.",
        epilog="Without a command it runs the demo.",
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
        help="at most this many runs",
    )
    runs_parser.add_argument("--events", metavar="RUN_ID", help="show this run's event history")
    add_logging_options(runs_parser, logging_after)
    runs_parser.set_defaults(handler=show_runs)

    groups_parser = commands.add_parser("groups", help="a table of groups")
    groups_parser.add_argument("--db", metavar="URL", default=DEFAULT_URL, help="database URL")
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
        "--groups", metavar="G", type=positive_int, default=20, help="groups"
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
        "--groups", metavar="G", type=positive_int, default=20, help="groups"
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code is 0 on success, 2 (with one line on stderr) on error."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
        if args.command is None:
            args = parser.parse_args([*arguments, "demo"])
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
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) left; point stdout at /dev/null so the final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
