"""The `demo` command: a conversation that shows a sleeptime agent's memory catching up.

A scripted primary agent (or an LLM, with `--llm-url`) answers six user turns from the
`human` memory block; the memory sleeptime agent fills that block in the background when
sleeptime fires. The demo prints each turn, why sleeptime fired or waited (asking
`actors.decide_fire`, the runtime's own rule), the transcript sent, and the block's edits.

Example:
    >>> firing_turns(2, len(DEMO_TURNS))
    [1, 3, 5]
    >>> fire_reason(2, 1, False, 2)
    'counter 1 of 2; fires next on turn 3'
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from actors import DEFAULT_URL, INITIAL_COUNTER, Runtime, decide_fire
from cli.command import EXIT_FAILED, EXIT_OK, command_name
from cli.loadsim import LLMEndpoint
from cli.options import llm_endpoint
from cli.tables import run_duration, truncate
from messages import Group, MessageCreate, Run, RunStatus
from persistence import parse_url, redact, sqlite_file

DEMO_WAIT_SECONDS = 30.0
LLM_WAIT_SECONDS = 600.0  # a sleeptime run of a real model takes several model calls

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


# -- when sleeptime fires, told ------------------------------------------------------------


def upcoming(frequency: int | None, counter: int, turn: int = 0) -> Iterator[tuple[int, bool]]:
    """Each turn after `turn`, endlessly, and whether it fires, from the counter `turn` stored.

    The decision is the runtime's own (`actors.decide_fire`), taken turn after turn.

    >>> list(islice(upcoming(2, INITIAL_COUNTER), 3))
    [(1, True), (2, False), (3, True)]
    """
    while True:
        turn += 1
        fired, counter = decide_fire(frequency, counter)
        yield turn, fired


def firing_turns(frequency: int | None, turns: int) -> list[int]:
    """The turns, of the first `turns`, on which a new group with this frequency fires."""
    first = islice(upcoming(frequency, INITIAL_COUNTER), turns)
    return [turn for turn, fired in first if fired]


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
    # A frequency of 1 or more fires within its next `frequency` + 1 turns, whatever the counter.
    following = next(later for later, fires in upcoming(frequency, counter, turn) if fires)
    return f"counter {counter} of {frequency}; fires next on turn {following}"


def block_diff(before: str, after: str) -> list[str]:
    """The lines that changed: removed ones marked `-`, new ones `+`, in block order.

    >>> block_diff("name: Ada\\ncolor: orange", "name: Ada\\ncolor: coral")
    ['- color: orange', '+ color: coral']
    """
    marked = difflib.ndiff(before.splitlines(), after.splitlines())
    # Kept lines ("  ") are the bulk of a block and "? " hints point at single characters.
    return [line for line in marked if line.startswith(("- ", "+ "))]


# -- the demo ------------------------------------------------------------------------------


class Demo:
    """Plays `DEMO_TURNS` on a new group and prints what each agent did, for newcomers."""

    def __init__(
        self,
        rt: Runtime,
        out: TextIO,
        show_transcripts: bool,
        llm: LLMEndpoint | None = None,
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
        took = run_duration(run)
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
        command = command_name()
        db = "" if inspect_url == DEFAULT_URL else f" --db {redact(inspect_url)}"
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


def demo(args: argparse.Namespace) -> int:
    """The `demo` command: a new group in the default database, or in --db; nothing deleted."""
    url: str = args.db
    llm = llm_endpoint(args)  # checked before the database is opened (or created)
    file = sqlite_file(parse_url(url))
    db_label = str(Path(file).resolve()) if file is not None else redact(url)
    with Runtime.start(url) as rt:
        demo = Demo(rt, sys.stdout, not args.quiet_transcript, llm)
        return demo.play(args.frequency, db_label, url)
