"""The command line (`run.py`): the demo tells its story, `runs`/`groups` show the database."""

from __future__ import annotations

import argparse
import ast
import doctest
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

import run
from actors import INVARIANTS, Runtime, configure_logging, decide_fire
from cli.demo import block_diff, fire_reason, firing_turns
from cli.tables import format_table, short_id
from messages import Group, Run, RunStatus, StoreUnavailable
from persistence import parse_url, sqlite_file
from persistence._engine import driver_hint

REPO = Path(run.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """Put logging back to its defaults after a test that asked for debug or JSON logs."""
    yield
    configure_logging()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def turns_that_fired(out: str) -> list[int]:
    """The turn numbers whose `sleeptime:` line in the demo's output says it fired."""
    fired, turn = [], 0
    for line in out.splitlines():
        if line.startswith("Turn "):
            turn = int(line.split()[1])
        elif line.startswith("  sleeptime: fires"):
            fired.append(turn)
    return fired


def turn_block(out: str, turn: int) -> str:
    """The demo's lines for one turn."""
    start = out.index(f"\nTurn {turn}\n")
    end = out.find("\n\n", start + 1)
    return out[start : end if end != -1 else None]


def final_human_block(out: str) -> str:
    """The lines under "The human block now reads:", without their indent."""
    lines = out.splitlines()
    start = lines.index("The human block now reads:") + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    return "\n".join(block)


@pytest.fixture
def demo_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The URL of a database the demo has just filled."""
    url = sqlite_url(tmp_path / "demo.db")
    assert run.main(["demo", "--db", url, "--quiet-transcript"]) == 0
    capsys.readouterr()
    return url


def stored(url: str) -> tuple[Group, list[Run]]:
    """The one group in the database and its runs, read through the public API."""
    rt = Runtime.start(url)
    try:
        (group,) = rt.list_groups()
        return group, rt.list_runs(group_id=group.id)
    finally:
        rt.stop(drain_timeout=0)


# -- the demo -------------------------------------------------------------------------------


def test_demo_shows_memory_catching_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = sqlite_url(tmp_path / "demo.db")

    assert run.main(["demo", "--db", url]) == 0

    out = capsys.readouterr().out
    assert turns_that_fired(out) == [1, 3, 5]
    assert "counter 1 of 2" in turn_block(out, 2)
    assert "<system-reminder>" in out
    assert "Messages:" in out
    assert "user: Actually, my favorite color is coral." in turn_block(out, 5)
    # The point of the demo: the answer is out of date first, and right after the next fire.
    assert "I don't know your favorite color yet." in turn_block(out, 3)
    assert "assistant: Your favorite color is orange." in turn_block(out, 5)
    assert "assistant: Your favorite color is coral." in turn_block(out, 6)
    assert "- favorite color: orange" in turn_block(out, 5)
    assert "+ favorite color: coral" in turn_block(out, 5)
    assert final_human_block(out).endswith("favorite color: coral")
    assert f"python run.py runs --db {url}" in out
    assert len(out.splitlines()) <= 100  # short enough to read in one screenful or two


def test_demo_leaves_what_it_says_in_the_database(demo_db: str) -> None:
    group, runs = stored(demo_db)

    assert (group.frequency, group.turns) == (2, 6)
    assert [run.turn for run in runs] == [1, 3, 5]
    assert {run.status for run in runs} == {RunStatus.COMPLETED}
    assert [(r.window_first_seq, r.window_last_seq) for r in runs] == [(1, 2), (3, 6), (7, 10)]


def test_quiet_transcript_leaves_the_transcripts_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(["demo", "--db", sqlite_url(tmp_path / "q.db"), "--quiet-transcript"]) == 0

    out = capsys.readouterr().out
    assert "<system-reminder>" not in out
    assert turns_that_fired(out) == [1, 3, 5]


@pytest.mark.parametrize(
    ("frequency", "fired"), [("1", [1, 2, 3, 4, 5, 6]), ("0", []), ("3", [1, 4])]
)
def test_demo_frequency_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], frequency: str, fired: list[int]
) -> None:
    url = sqlite_url(tmp_path / "f.db")

    assert run.main(["demo", "--db", url, "--frequency", frequency, "--quiet-transcript"]) == 0

    assert turns_that_fired(capsys.readouterr().out) == fired


def test_demo_with_db_leaves_the_default_database_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    # Files named like the default database, in the working directory, must survive.
    keep = {name: f"keep {name}" for name in ["sleeptime.db", "sleeptime.db-wal"]}
    keep["notes.txt"] = "keep me"
    for name, text in keep.items():
        (tmp_path / name).write_text(text)
    given = tmp_path / "given.db"

    assert run.main(["demo", "--db", sqlite_url(given), "--quiet-transcript"]) == 0
    assert run.main(["demo", "--db", sqlite_url(given), "--quiet-transcript"]) == 0

    for name, text in keep.items():
        assert (tmp_path / name).read_text() == text
    rt = Runtime.start(sqlite_url(given))
    try:
        assert len(rt.list_groups()) == 2  # the second demo added to the given database
    finally:
        rt.stop(drain_timeout=0)


def test_no_arguments_runs_the_demo_in_the_default_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    assert run.main([]) == 0
    first = capsys.readouterr().out
    assert run.main([]) == 0  # a second demo adds its group: nothing is deleted

    assert turns_that_fired(first) == [1, 3, 5]
    assert f"Database: {tmp_path / 'sleeptime.db'}" in first
    # The inspection commands it suggests read the same default database: no --db needed.
    for command in ["groups", "runs", "check"]:
        assert f"\n  python run.py {command}\n" in first
    rt = Runtime.start(sqlite_url(tmp_path / "sleeptime.db"))
    try:
        groups = rt.list_groups()
        assert [group.turns for group in groups] == [6, 6]
        assert len(rt.list_runs()) == 6
    finally:
        rt.stop(drain_timeout=0)


def test_the_demos_options_work_without_its_name(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "--quiet-transcript", "--frequency", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "<system-reminder>" not in finished.stdout
    assert turns_that_fired(finished.stdout) == [1, 4]
    assert f"Database: {tmp_path / 'sleeptime.db'}" in finished.stdout


@pytest.mark.parametrize(
    ("argv", "parsed"),
    [
        ([], ["demo"]),
        (["--quiet-transcript"], ["demo", "--quiet-transcript"]),
        (["--log-level", "debug", "--db", "x"], ["demo", "--log-level", "debug", "--db", "x"]),
        (["--log-json"], ["demo", "--log-json"]),
        (["--log-level", "debug", "groups"], None),
        (["--log-json", "runs", "--log-level", "error"], None),
        (["demo", "--db", "x"], None),
        (["-h"], None),
        (["--help"], None),
        (["frobnicate"], None),  # argparse says it is no command
        (["--log-level", "loud", "groups"], None),  # argparse says what is wrong
        (["--log-level"], None),
    ],
)
def test_no_command_means_the_demo(argv: list[str], parsed: list[str] | None) -> None:
    assert run.demo_by_default(argv) == (argv if parsed is None else parsed)


def test_demo_refuses_a_default_database_it_cannot_read_and_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sleeptime.db").write_bytes(b"not a database")

    assert run.main([]) == 2

    assert_one_error_line(capsys, "sleeptime.db", "not a database")
    assert (tmp_path / "sleeptime.db").read_bytes() == b"not a database"


def test_demo_as_a_subprocess(tmp_path: Path) -> None:
    default_db = REPO / "sleeptime.db"
    existed = default_db.exists()

    finished = subprocess.run(
        [sys.executable, "run.py", "demo", "--db", sqlite_url(tmp_path / "sub.db")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 0, finished.stderr
    assert final_human_block(finished.stdout).endswith("favorite color: coral")
    assert "Traceback" not in finished.stderr
    assert default_db.exists() == existed


# -- runs and groups ------------------------------------------------------------------------


def test_groups_lists_the_demo_group(demo_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    group, _ = stored(demo_db)

    assert run.main(["groups", "--db", demo_db]) == 0

    out = capsys.readouterr().out
    header, _, row, footer = out.splitlines()
    assert header.split()[:4] == ["group", "frequency", "counter", "turns"]
    assert row.split() == [group.id, "2", "1", "6", short_id(group.cursor), "1", "active"]
    assert footer == "1 group(s)"


def test_runs_lists_the_demo_runs(demo_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, runs = stored(demo_db)

    assert run.main(["runs", "--db", demo_db]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "group", "agent", "status"]
    rows = [line.split() for line in lines[2:-1]]
    assert [row[0] for row in rows] == [r.id for r in reversed(runs)]
    assert [row[3:5] for row in rows] == [["completed", "end_turn"]] * 3
    assert [row[7] for row in rows] == ["7-10", "3-6", "1-2"]
    assert lines[-1] == "3 run(s), newest first"


def test_check_lists_every_invariant_and_fails_on_a_broken_one(
    demo_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, runs = stored(demo_db)

    assert run.main(["check", "--db", demo_db]) == 0
    out = capsys.readouterr().out
    results = dict(line.split() for line in out.splitlines() if line.split()[-1:] == ["pass"])
    assert results == dict.fromkeys(INVARIANTS, "pass")
    assert f"All {len(INVARIANTS)} invariants hold." in out

    engine = sqlalchemy.create_engine(parse_url(demo_db))
    with engine.begin() as connection:  # a late write of attempt 1 after attempt 2
        connection.execute(
            sqlalchemy.text(
                "UPDATE run_events SET attempt = 2 WHERE run_id = :run AND status = 'running'"
            ),
            {"run": runs[0].id},
        )
    engine.dispose()
    assert run.main(["check", "--db", demo_db]) == 1
    out = capsys.readouterr().out
    assert "1 invariant(s) FAILED: attempts_monotonic" in out
    assert f"violation: attempts_monotonic: run {runs[0].id}: attempts 1 -> 2 -> 1" in out


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [(["completed"], 3), (["failed"], 0), (["failed", "completed"], 3), (["cancelled"], 0)],
)
def test_runs_status_filter(
    demo_db: str, capsys: pytest.CaptureFixture[str], statuses: list[str], expected: int
) -> None:
    options = [option for status in statuses for option in ("--status", status)]

    assert run.main(["runs", "--db", demo_db, *options]) == 0

    out = capsys.readouterr().out
    assert out.count(" completed ") == expected
    if expected == 0:
        assert out == "No runs match.\n"


def test_runs_filters_take_the_short_ids_shown(
    demo_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    group, runs = stored(demo_db)

    assert run.main(["runs", "--db", demo_db, "--group", short_id(group.id)]) == 0
    assert capsys.readouterr().out.count(" completed ") == 3
    sleeper = short_id(group.sleeptime_agent_ids[0])
    assert run.main(["runs", "--db", demo_db, "--agent", sleeper, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert runs[2].id in out and runs[0].id not in out  # the newest two
    assert "older ones: " in out and f"--after {runs[1].id}" in out
    # A full page that is the last one says so: no next page to follow into nothing.
    assert run.main(["runs", "--db", demo_db, "--agent", sleeper, "--limit", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 run(s), newest first"
    assert run.main(["groups", "--db", demo_db, "--limit", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 group(s)"
    assert run.main(["runs", "--db", demo_db, "--agent", group.primary_agent_id]) == 0
    assert capsys.readouterr().out == "No runs match.\n"


def test_runs_events_shows_the_history(demo_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, runs = stored(demo_db)

    assert run.main(["runs", "--db", demo_db, "--events", runs[1].id]) == 0

    out = capsys.readouterr().out
    assert out.startswith(f"run {runs[1].id}\n")
    statuses = [line.split()[0] for line in out.splitlines()[5:]]
    assert statuses == ["created", "running", "completed"]


# -- errors ---------------------------------------------------------------------------------


def assert_one_error_line(capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("command", ["demo", "runs", "groups"])
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite:////nonexistent-dir/x.db", "/nonexistent-dir/x.db"),
        ("notaurl", "not a database URL"),
        ("nodriver://x/y", "no driver"),
    ],
)
def test_bad_database_url_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], command: str, url: str, says: str
) -> None:
    assert run.main([command, "--db", url]) == 2

    assert_one_error_line(capsys, says)
    assert not Path("/nonexistent-dir").exists()


def test_inspecting_a_missing_sqlite_file_does_not_create_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.db"

    assert run.main(["runs", "--db", sqlite_url(missing)]) == 2

    assert_one_error_line(capsys, "no database at", "demo")
    assert not missing.exists()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--events", "run-does-not-exist"], "no run with id 'run-does-not-exist'"),
        (["--group", "group-nope"], "no group with id 'group-nope'"),
        (["--agent", "agent-nope"], "no agent with id 'agent-nope'"),
        (["--agent", "agent-"], "matches 2 ids"),
    ],
)
def test_unknown_ids_are_one_line_and_exit_2(
    demo_db: str, capsys: pytest.CaptureFixture[str], options: list[str], says: str
) -> None:
    assert run.main(["runs", "--db", demo_db, *options]) == 2

    assert_one_error_line(capsys, says)


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "--status", "bogus"],
        ["runs", "--limit", "0"],
        ["demo", "--frequency", "-1"],
        ["demo", "--frequency", "often"],
        ["frobnicate"],
        ["--log-level", "loud", "groups"],
        ["--frequency", "often"],  # the demo's, without its name
        ["--quiet-transcript", "groups"],
    ],
)
def test_bad_arguments_exit_2_with_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(argv) == 2

    err = capsys.readouterr().err
    assert "usage:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "groups"],
        ["groups", "--log-level", "info", "--log-json"],
        ["--log-json", "runs", "--log-level", "error"],
    ],
)
def test_logging_options_before_or_after_the_command(
    demo_db: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main([*argv, "--db", demo_db]) == 0

    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--groups", "0"],
        ["simulate", "--report", "{tmp}/missing/r.json"],
        ["simulate", "--db", "bogus://x"],
        ["loadtest", "--rate", "0.01", "--duration", "1"],
        ["loadtest", "--model", "m"],
        ["loadtest", "--llm-url", "http://127.0.0.1:9/v1", "--model", "m", "--latency-ms", "5"],
        ["demo", "--model", "m"],
        ["demo", "--frequency", "-1"],
        ["--model", "m"],
        ["--frequency", "-1"],
    ],
    ids=" ".join,
)
def test_a_refused_run_leaves_nothing_behind(tmp_path: Path, argv: list[str]) -> None:
    temp, work = tmp_path / "temp", tmp_path / "work"
    temp.mkdir()
    work.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    command = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]

    finished = subprocess.run(
        [sys.executable, str(REPO / "run.py"), *command],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert "Traceback" not in finished.stderr
    assert list(temp.iterdir()) == []  # no temporary directory for a database
    assert list(work.iterdir()) == []  # no default database in the working directory


def test_a_runtime_that_cannot_start_takes_its_temporary_directory_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    opened: list[str] = []

    def refuse(url: str, **_options: object) -> Runtime:
        opened.append(url)
        raise StoreUnavailable(url, "refused for the test")

    monkeypatch.setattr(Runtime, "start", refuse)

    assert run.main(["simulate", "--groups", "1", "--turns", "1", "--no-progress"]) == 2

    assert_one_error_line(capsys, "refused for the test")
    assert len(opened) == 1 and tmp_path in Path(opened[0].removeprefix("sqlite:///")).parents
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "says", "not_says"),
    [
        ("postgresql+psycopg2://ada@127.0.0.1:9/db", "pip install psycopg2-binary", None),
        ("postgresql+pg8000://ada@127.0.0.1:9/db", "tested with psycopg 3", "pip install pg8000"),
    ],
)
def test_a_missing_driver_gets_the_install_hint_of_that_driver(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    says: str,
    not_says: str | None,
) -> None:
    driver = parse_url(url).get_driver_name()
    monkeypatch.setitem(sys.modules, driver, None)  # not installed, even where it is

    assert run.main(["groups", "--db", url]) == 2

    err = capsys.readouterr().err
    assert says in err and "postgresql://" in err, err
    assert not_says is None or not_says not in err


def test_a_missing_psycopg_3_gets_the_postgres_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)

    assert run.main(["groups", "--db", "postgresql://ada@127.0.0.1:9/db"]) == 2

    assert_one_error_line(capsys, "no driver", "pip install 'sleeptime-runtime[postgres]'")


def test_driver_hint_names_only_postgresql_drivers() -> None:
    assert driver_hint(parse_url("mysql://ada@db/x")) == ""
    assert driver_hint(parse_url("sqlite:///x.db")) == ""
    assert "psycopg 3" in driver_hint(parse_url("postgres://ada@db/x"))
    assert "psycopg2-binary" in driver_hint(parse_url("postgresql+psycopg2://ada@db/x"))


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parser of each command, by name, and the top-level one as ''."""
    parser = run.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **commands.choices}


def help_entries(help_text: str) -> dict[str, str]:
    """Each option's entry in a --help text, by its long name, whitespace folded."""
    entries: dict[str, str] = {}
    name = None
    for line in help_text.splitlines():
        found = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if found:
            name = found[1]
            entries[name] = line
        elif name is not None and line.startswith("   "):
            entries[name] += line
        else:
            name = None
    return {key: " ".join(text.split()) for key, text in entries.items()}


@pytest.mark.parametrize("command", sorted(command_parsers()))
def test_help_shows_every_default(command: str) -> None:
    parser = command_parsers()[command]
    entries = help_entries(parser.format_help())
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]

    assert options
    for action in options:
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            continue  # nothing to show: its help says what happens without it
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        entry = entries[action.option_strings[-1]]
        assert f"(default: {shown})" in entry, entry


# -- pure helpers ---------------------------------------------------------------------------


def test_format_table_aligns_columns() -> None:
    table = format_table(["id", "n", "note"], [["a", "1", "x"], ["bcd", "22", ""]], {1})

    assert table.splitlines() == [
        "id    n  note",
        "---  --  ----",
        "a     1  x",
        "bcd  22",
    ]


def test_format_table_refuses_a_ragged_row() -> None:
    with pytest.raises(ValueError, match="2 cells"):
        format_table(["a", "b", "c"], [["1", "2"]])


FREQUENCIES = [None, 0, 1, 2, 3, 5, 7, 12]


def decided(frequency: int | None, counter: int, turns: int) -> list[tuple[int, bool]]:
    """The counter each of `turns` turns stores and whether it fires, by `decide_fire` alone."""
    stored = []
    for _ in range(turns):
        fired, counter = decide_fire(frequency, counter)
        stored.append((counter, fired))
    return stored


@pytest.mark.parametrize("frequency", FREQUENCIES)
def test_firing_turns_agrees_with_the_runtime(frequency: int | None) -> None:
    fired = [turn for turn, (_, fires) in enumerate(decided(frequency, -1, 40), 1) if fires]

    assert firing_turns(frequency, 40) == fired
    assert firing_turns(frequency, 0) == []


@pytest.mark.parametrize("frequency", FREQUENCIES)
@pytest.mark.parametrize("start", [-1, 0, 1, 4, 11, 30])  # after update_group: any counter
def test_fire_reason_names_the_turn_the_runtime_fires_next(
    frequency: int | None, start: int
) -> None:
    stored = decided(frequency, start, 40)
    fired = [turn for turn, (_, fires) in enumerate(stored, 1) if fires]

    for turn, (counter, fires) in enumerate(stored[:25], 1):
        reason = fire_reason(frequency, counter, fires, turn)
        following = re.search(r"fires next on turn (\d+)$", reason)
        if frequency is None or frequency == 0:
            assert following is None, reason
        elif fires:
            assert reason == f"counter {counter} of {frequency}"
        else:
            assert following is not None, reason
            assert int(following[1]) == min(t for t in fired if t > turn), reason


@pytest.mark.parametrize(
    ("frequency", "counter", "fired", "turn", "expected"),
    [
        (2, 0, True, 1, "counter 0 of 2"),
        (2, 1, False, 2, "counter 1 of 2; fires next on turn 3"),
        (5, 2, False, 3, "counter 2 of 5; fires next on turn 6"),
        (None, -1, True, 4, "no frequency: every turn"),
        (0, -1, False, 4, "frequency 0: sleeptime is paused"),
    ],
)
def test_fire_reason(
    frequency: int | None, counter: int, fired: bool, turn: int, expected: str
) -> None:
    assert fire_reason(frequency, counter, fired, turn) == expected


def test_block_diff_shows_only_changed_lines() -> None:
    before = "name: Ada\nfavorite color: orange"
    after = "name: Ada\nfavorite color: coral\nlives in: Lisbon"

    assert block_diff(before, after) == [
        "- favorite color: orange",
        "+ favorite color: coral",
        "+ lives in: Lisbon",
    ]


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///demo.db", "demo.db"),
        ("sqlite:////tmp/x.db?timeout=5", "/tmp/x.db"),
        ("sqlite+pysqlite:///a/b.db", "a/b.db"),
        ("sqlite:///:memory:", None),
        ("postgresql://localhost/db", None),
    ],
)
def test_the_file_the_commands_look_for_is_the_runtimes(url: str, path: str | None) -> None:
    # The demo's "Database:" line and the inspecting commands' "no database at" check ask
    # persistence which file a URL names, as the runtime does: one parser of URLs.
    assert sqlite_file(parse_url(url)) == path


def test_the_command_line_uses_only_the_public_api() -> None:
    library = {"actors", "messages", "persistence"}
    for source in [REPO / "run.py", *sorted((REPO / "cli").glob("*.py"))]:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                used = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                used = [alias.name for alias in node.names]
            else:
                continue
            for name in used:
                top, *rest = name.split(".")
                assert top != "sqlalchemy", f"{source.name}: only persistence/ speaks SQL"
                private = [part for part in rest if part.startswith("_")]
                assert top not in library or not private, f"{source.name} imports {name}"


@pytest.mark.parametrize(
    "module", ["run", "cli.command", "cli.options", "cli.tables", "cli.demo", "cli.inspection"]
)
def test_the_examples_in_the_docstrings_hold(module: str) -> None:
    tried = doctest.testmod(importlib.import_module(module))

    assert tried.attempted > 0 and tried.failed == 0


def test_demo_and_inspection_on_any_backend(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(["demo", "--db", db_url, "--quiet-transcript"]) == 0
    assert "favorite color: coral" in capsys.readouterr().out
    assert run.main(["groups", "--db", db_url]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 group(s)"
    assert run.main(["runs", "--db", db_url, "--status", "completed"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 run(s), newest first"
    assert run.main(["migrate", "--db", db_url]) == 0
    assert "already at schema revision" in capsys.readouterr().out


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "nowhere.invalid:6379"])
def test_a_ray_address_nobody_answers_at_is_an_error_at_once(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ray.init` keeps trying an address for minutes; the workload says at once that
    nothing answers there (exit 2, one line), before touching the database."""
    database = "postgresql://nobody@127.0.0.1:9/nothing"
    code = run.main(["simulate", "--ray-address", address, "--groups", "1", "--db", database])
    assert code == 2
    error = capsys.readouterr().err
    assert f"no Ray cluster answers at {address}" in error
