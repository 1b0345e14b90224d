"""`simulate`, `loadtest` and `check` on the command line: small real runs, on both backends."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

import run
from actors import INVARIANTS, Runtime, configure_logging
from cli import loadsim
from persistence import parse_url, redact, sqlite_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_KEYS = {
    "turns",
    "turns_per_second",
    "runs",
    "invariants",
    "latency_ms",
    "peak_rss_mb",
    "peak_threads",
    "parameters",
    "versions",
    "restarts",
    "injected_crashes",
    "passivations",
    "activations",
    "elapsed_s",
    "errors",
}
SMALL = ["--groups", "4", "--agents", "2", "--turns", "5", "--no-progress"]


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """Put logging back to its defaults: the commands log only errors unless told otherwise."""
    yield
    configure_logging()


def invoke(
    capsys: pytest.CaptureFixture[str], report: Path, *argv: str
) -> tuple[int, dict[str, Any], str]:
    """Run one command in-process with `--report`; its exit code, report and output."""
    code = run.main([*argv, "--report", str(report)])
    out = capsys.readouterr().out
    return code, json.loads(report.read_text()), out


def ordered(figures: dict[str, float | None]) -> bool:
    """Whether p50 <= p95 <= p99 <= max, all measured."""
    values = [figures[q] for q in ("p50", "p95", "p99", "max")]
    measured = [v for v in values if v is not None]
    return len(measured) == len(values) and measured == sorted(measured)


# -- simulate ------------------------------------------------------------------------------


def test_simulate_reports_turns_runs_latency_and_invariants(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, out = invoke(capsys, tmp_path / "r.json", "simulate", "--db", db_url, *SMALL)

    assert code == 0, out
    assert report.keys() >= REPORT_KEYS
    assert report["turns"] == 20
    assert report["invariants"] == dict.fromkeys(INVARIANTS, True)
    # Frequency 1: every turn fires one run per sleeptime agent.
    assert sum(report["runs"].values()) == 4 * 2 * 5
    assert report["runs"]["completed"] == 40
    assert report["errors"] == {"count": 0, "first": []}
    assert all(ordered(report["latency_ms"][name]) for name in report["latency_ms"])
    assert report["latency_ms"].keys() == {"turn", "created_to_running", "created_to_terminal"}
    assert report["turns_per_second"] > 0 and report["elapsed_s"] > 0
    assert report["peak_rss_mb"] > 0 and report["peak_threads"] > 1
    assert report["parameters"]["groups"] == 4 and report["parameters"]["concurrency"] == 4
    assert report["versions"].keys() == {
        "python",
        "sleeptime-runtime",
        "sqlalchemy",
        "pykka",
        "pydantic",
    }
    assert f"All {len(INVARIANTS)} invariants hold." in out
    assert "runs completed" in out and "run created -> terminal" in out
    # What the report says is what the database holds.
    with Runtime.start(db_url, read_only=True) as rt:
        groups = rt.list_groups()
        assert [g.turns for g in groups] == [5] * 4
        assert len(rt.list_runs(statuses=["completed"])) == 40


def test_simulate_survives_injected_crashes(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, out = invoke(
        capsys, tmp_path / "r.json", "simulate", "--db", db_url, *SMALL, "--crash-rate", "0.05"
    )

    assert code == 0, out
    assert report["injected_crashes"] > 0 and report["restarts"] > 0
    assert report["escalations"] == 0
    assert report["turns"] == 20
    assert sum(report["runs"].values()) == 40
    assert all(report["invariants"].values())


def test_simulate_caps_the_active_groups_and_reports_passivations(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Long enough (8 turns of 50 ms per group) for a group that declined a passivation
    # (busy: its next turn already waiting) to be asked again (`NUDGE_EVERY_S`).
    argv = ["simulate", "--db", db_url, "--groups", "6", "--turns", "8", "--no-progress"]
    options = ["--latency-ms", "50", "--max-active-groups", "2", "--passivate-after", "none"]
    code, report, out = invoke(capsys, tmp_path / "r.json", *argv, *options)

    assert code == 0, out
    assert report["parameters"]["max_active_groups"] == 2
    assert report["parameters"]["passivate_after"] is None
    # Six groups driven at once against a cap of two: some gave their threads back.
    assert report["passivations"] > 0 and report["activations"] >= 0
    assert report["turns"] == 48 and all(report["invariants"].values())
    (shown,) = [line for line in out.splitlines() if "passivations (actors made idle)" in line]
    assert shown.split()[-1].strip("|│ ") == str(report["passivations"])
    assert "activations (actors woken)" in out


def test_simulate_with_failing_agents_fails_runs_not_the_command(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, out = invoke(
        capsys, tmp_path / "r.json", "simulate", "--db", db_url, *SMALL, "--failure-rate", "0.3"
    )

    assert code == 0, out
    runs = report["runs"]
    assert runs["failed"] > 0 and runs["completed"] > 0
    assert runs["failed"] + runs["completed"] == 40
    assert report["errors"]["count"] == 0  # the primary agent never fails: every turn is taken
    assert all(report["invariants"].values())


def test_simulate_with_sleeptime_paused_has_nothing_to_measure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'paused.db'}"

    code, report, out = invoke(
        capsys, tmp_path / "r.json", "simulate", "--db", db, *SMALL, "--frequency", "0"
    )

    assert code == 0, out
    assert sum(report["runs"].values()) == 0
    assert report["latency_ms"]["created_to_running"] == dict.fromkeys(["p50", "p95", "p99", "max"])
    assert ordered(report["latency_ms"]["turn"])


def test_simulate_without_db_uses_a_fresh_sqlite_file_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    code, report, out = invoke(capsys, tmp_path / "r.json", "simulate", *SMALL)

    assert code == 0, out
    url = next(line for line in out.splitlines() if line.startswith("Database: "))[10:]
    file = sqlite_file(parse_url(url))
    assert file is not None and Path(file).exists() and tmp_path in Path(file).parents
    assert report["parameters"]["db"] == url


def test_simulate_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    picture = tmp_path / "sim.png"
    db = f"sqlite:///{tmp_path / 'plot.db'}"

    code = run.main(["simulate", "--db", db, *SMALL, "--latency-ms", "1", "--plot", str(picture)])

    assert code == 0
    assert picture.read_bytes().startswith(PNG_MAGIC)
    assert f"Plot: {picture}" in capsys.readouterr().out


def test_plot_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    db = tmp_path / "never.db"

    code = run.main(["simulate", "--db", f"sqlite:///{db}", "--plot", str(tmp_path / "p.png")])

    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pip install 'sleeptime-runtime[plot]'" in err
    assert not db.exists()  # refused before any work


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--failure-rate", "1.5"],
        ["simulate", "--crash-rate", "-0.1"],
        ["simulate", "--latency-distribution", "normal"],
        ["simulate", "--latency-ms", "nan"],
        ["simulate", "--frequency", "-2"],
        ["simulate", "--max-active-groups", "0"],
        ["simulate", "--passivate-after", "never"],
        ["loadtest", "--passivate-after", "0"],
        ["loadtest", "--rate", "0"],
        ["loadtest", "--arrivals", "bursty"],
        ["check", "--frobnicate"],
    ],
)
def test_bad_options_exit_2_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(argv) == 2

    assert "usage:" in capsys.readouterr().err


def test_unusable_database_or_report_path_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(["simulate", "--db", "notaurl", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    report = tmp_path / "missing-dir" / "r.json"
    assert run.main(["loadtest", "--report", str(report)]) == 2
    assert "missing-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "name", "says"),
    [
        ("--report", "", "is a directory"),
        ("--plot", "", "is a directory"),
        ("--plot", "sim.txt", "end the name with one of"),
        ("--report", "no-such-dir/r.json", "does not exist"),
    ],
)
@pytest.mark.parametrize("command", ["simulate", "loadtest"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    command: str,
    option: str,
    name: str,
    says: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / name if name else tmp_path
    database = tmp_path / "never.db"
    argv = [command, "--db", f"sqlite:///{database}", "--no-progress", option, str(path)]
    assert run.main(argv) == 2
    captured = capsys.readouterr()
    assert says in captured.err and "Traceback" not in captured.err
    assert not database.exists()  # refused before the run: nothing was started


@pytest.mark.parametrize("option", ["--agents", "--groups"])
def test_a_workload_too_large_to_build_is_refused(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(["simulate", option, "99999999999999999999", "--no-progress"]) == 2
    assert "is not a whole number from 1 to" in capsys.readouterr().err


@pytest.mark.parametrize(("rate", "duration"), [("0.01", "5"), ("1e9", "1e6")])
def test_a_loadtest_offering_no_turn_or_too_many_is_refused_before_it_starts(
    rate: str, duration: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(["loadtest", "--rate", rate, "--duration", duration]) == 2
    assert "a load test offers from 1 to 10,000,000" in capsys.readouterr().err


# -- loadtest ------------------------------------------------------------------------------


def test_loadtest_offers_its_rate_open_loop(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["loadtest", "--db", db_url, "--rate", "40", "--duration", "1", "--groups", "3"]

    code, report, out = invoke(capsys, tmp_path / "r.json", *argv, "--no-progress")

    assert code == 0, out
    assert report.keys() >= REPORT_KEYS | {"offered_rate", "achieved_rate", "errors"}
    assert report["offered_rate"] == 40
    assert report["arrivals"] == len(loadsim.arrival_times(40, 1, "poisson", 0))
    assert report["turns"] == report["arrivals"]
    assert report["achieved_rate"] > 0  # how near 40 depends on the machine: not asserted
    assert report["errors"] == {"count": 0, "first": []}
    assert report["late_starts"] == 0
    assert sum(report["runs"].values()) == report["turns"]  # one agent, every turn fires
    assert all(ordered(report["latency_ms"][name]) for name in report["latency_ms"])
    assert ordered(report["start_delay_ms"])
    assert all(report["invariants"].values())
    assert "achieved rate (turns/s)" in out


# -- check ---------------------------------------------------------------------------------


def test_check_exits_1_when_an_invariant_is_broken(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = invoke(capsys, tmp_path / "r.json", "simulate", "--db", db_url, *SMALL)
    assert code == 0
    assert run.main(["check", "--db", db_url]) == 0
    assert f"All {len(INVARIANTS)} invariants hold." in capsys.readouterr().out

    # Damage it as a crash in the middle of a write never could: a finished run "running".
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE runs SET status = 'running' WHERE turn = 3"))
    engine.dispose()

    assert run.main(["check", "--db", db_url]) == 1

    out = capsys.readouterr().out
    assert "runs_terminal                         FAIL" in out
    assert "invariant(s) FAILED: runs_terminal" in out
    assert "violation: runs_terminal: run run-" in out


def test_check_on_a_missing_sqlite_file_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.db"

    assert run.main(["check", "--db", f"sqlite:///{missing}"]) == 2

    assert "no database at" in capsys.readouterr().err
    assert not missing.exists()


# -- pure parts ----------------------------------------------------------------------------


def test_arrival_times() -> None:
    assert loadsim.arrival_times(4, 1, "uniform", 0) == [0.0, 0.25, 0.5, 0.75]
    assert loadsim.arrival_times(3, 1, "uniform", 0) == [0.0, 1 / 3, 2 / 3]
    poisson = loadsim.arrival_times(1000, 10, "poisson", 7)
    assert poisson == loadsim.arrival_times(1000, 10, "poisson", 7)  # seeded
    assert poisson != loadsim.arrival_times(1000, 10, "poisson", 8)
    assert poisson == sorted(poisson) and poisson[0] > 0 and poisson[-1] < 10
    assert 9_500 <= len(poisson) <= 10_500  # mean 10,000, sd 100


def test_percentiles() -> None:
    assert loadsim.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert loadsim.percentile([5.0], 99) == 5.0
    assert loadsim.summary_ms([0.001 * n for n in range(1, 101)]) == {
        "p50": 50.5,
        "p95": 95.05,
        "p99": 99.01,
        "max": 100.0,
    }
    assert loadsim.summary_ms([]) == dict.fromkeys(["p50", "p95", "p99", "max"])


def test_per_second_buckets() -> None:
    assert loadsim.per_second([0.1, 0.5, 1.2, 2.9], 3.0) == [2, 1, 1]
    assert loadsim.per_second([3.5], 3.0) == [0, 0, 1]  # late ones land in the last bucket
    assert loadsim.per_second([], 0.0) == [0]


def test_every_agent_gets_its_own_seed() -> None:
    seeds = [
        spec["config"]["seed"]
        for shape_seed in (0, 1)
        for group in range(50)
        for position in range(4)
        for spec in [loadsim.GroupShape(agents=3, seed=shape_seed).agent(group, position, 0.0)]
    ]

    assert len(set(seeds)) == len(seeds)


def test_only_sleeptime_agents_fail_and_crashes_get_room() -> None:
    shape = loadsim.GroupShape(agents=2, failure_rate=0.3, crash_rate=0.05, seed=4)

    assert shape.agent(0, 0, 0.0)["config"]["failure_rate"] == 0.0
    options = shape.runtime_options()
    assert options["chaos"].crash_rate == 0.05 and options["chaos"].failure_rate == 0
    assert options["restart_policy"].max_restarts >= 100
    assert shape.max_attempts >= 10
    assert loadsim.GroupShape().runtime_options() == {}


def test_the_urls_printed_hide_only_the_password() -> None:
    assert redact("postgresql://ada:s3cr%40t@db/x") == "postgresql://ada:***@db/x"
    assert redact("postgresql://ada@db/x") == "postgresql://ada@db/x"
    assert redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_simulate_exits_1_when_an_invariant_is_broken_on_purpose(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is damaged just before simulate's own (real) invariant check."""
    real_check = Runtime.check_invariants

    def damage_then_check(rt: Runtime, group_ids: Any = None) -> Any:
        engine = create_engine(db_url)
        with engine.begin() as connection:  # a turn counted that no input was stored for
            connection.execute(text("UPDATE groups SET turns = turns + 1"))
        engine.dispose()
        return real_check(rt, group_ids)

    monkeypatch.setattr(Runtime, "check_invariants", damage_then_check)
    code, report, out = invoke(capsys, tmp_path / "r.json", "simulate", "--db", db_url, *SMALL)
    assert code == 1, out
    assert report["invariants"]["turns_counted"] is False
    assert "turns_counted" in out and "FAIL" in out
