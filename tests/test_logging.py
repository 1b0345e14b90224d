"""Logging: the host's `logging` setup receives the runtime's events, at the right levels.

Each test starts from logging as a host leaves it (`tests.logs.host_logging`): the
runtime's `sleeptime` logger with no output of its own, as when nobody called
`configure_logging`; and each puts everything back as it found it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from actors import Chaos, RestartPolicy, Runtime, configure_logging
from actors._logging import ensure_logging
from messages import RunStatus
from messages._log import get_logger, render_message
from tests.agents import Recorder, user
from tests.logs import Records, host_logging


@pytest.fixture(autouse=True)
def as_a_host_leaves_it() -> Iterator[None]:
    with host_logging():
        yield


@pytest.fixture
def records() -> Records:
    """Every record of the runtime's loggers, debug included."""
    handler = Records()
    runtime = logging.getLogger("sleeptime")
    runtime.addHandler(handler)
    runtime.setLevel(logging.DEBUG)
    return handler


def test_a_hosts_basic_config_receives_the_runtimes_events(db_url: str, tmp_path: Path) -> None:
    log_file = tmp_path / "service.log"
    logging.basicConfig(
        filename=log_file,
        level=logging.INFO,
        format="%(levelname)s %(name)s %(message)s",
        force=True,  # pytest has handlers on the root: a host's own setup replaces them
    )
    recorder = Recorder(fail_on={0})
    with Runtime.start(db_url, kinds={"recorder": recorder.factory}) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "recorder"}], frequency=1
        )
        (run_id,) = rt.step(group.id, [user("hello")]).run_ids
        rt.wait_for_runs([run_id], timeout=30)
    lines = log_file.read_text().splitlines()

    assert any(line.startswith("INFO sleeptime.runtime runtime_started ") for line in lines)
    assert f"INFO sleeptime.runtime group_created group_id={group.id} " in "\n".join(lines)
    started = [line for line in lines if " run_started " in line]
    assert len(started) == 1 and started[0].startswith("INFO sleeptime.run run_started ")
    assert f"run_id={run_id}" in started[0] and "queued_ms=" in started[0]
    (finished,) = [line for line in lines if " run_finished " in line]
    assert finished.startswith(f"WARNING sleeptime.run run_finished group_id={group.id} ")
    assert f"run_id={run_id}" in finished
    assert 'status=failed stop_reason=error error="RuntimeError: step 0 fails on purpose"' in (
        finished
    )
    assert "duration_ms=" in finished and "total_ms=" in finished
    assert not [line for line in lines if line.startswith("DEBUG")]  # the host said INFO


def test_run_ends_are_info_when_completed_and_warning_with_the_error_when_failed(
    db_url: str, records: Records
) -> None:
    recorder = Recorder(fail_on={1})
    with Runtime.start(db_url, kinds={"recorder": recorder.factory}) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "recorder"}], frequency=1
        )
        ids = [rt.step(group.id, [user(f"turn {n}")]).run_ids[0] for n in range(2)]
        runs = rt.wait_for_runs(ids, timeout=30)
    assert [r.status for r in runs] == [RunStatus.COMPLETED, RunStatus.FAILED]
    agent_id = group.sleeptime_agent_ids[0]

    started = records.events("run_started")
    assert [e["run_id"] for e in started] == ids
    for event in started:
        assert event.level == logging.INFO and event.logger == "sleeptime.run"
        assert (event["group_id"], event["agent_id"]) == (group.id, agent_id)
        assert event["queued_ms"] >= 0 and event["attempt"] == 1
    finished = {e["run_id"]: e for e in records.events("run_finished")}
    completed, failed = finished[ids[0]], finished[ids[1]]
    assert completed.level == logging.INFO
    assert completed.fields == {
        "group_id": group.id,
        "agent_id": agent_id,
        "run_id": ids[0],
        "status": "completed",
        "stop_reason": "end_turn",
        "error": None,
        "attempt": 1,
        "duration_ms": completed["duration_ms"],
        "total_ms": completed["total_ms"],
    }
    assert 0 <= completed["duration_ms"] <= completed["total_ms"]
    assert failed.level == logging.WARNING
    assert (failed["status"], failed["stop_reason"]) == ("failed", "error")
    assert failed["error"] == "RuntimeError: step 1 fails on purpose"
    assert failed.record.group_id == group.id  # type: ignore[attr-defined]  # for formatters

    turns = records.events("turn_recorded")
    assert [e["turn"] for e in turns] == [1, 2]
    for event in turns:
        assert event.level == logging.DEBUG and event.logger == "sleeptime.group"
        assert event["group_id"] == group.id and event["duration_ms"] > 0


def test_a_timed_out_run_is_logged_at_warning(tmp_path: Path, records: Records) -> None:
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    try:
        with Runtime.start(
            f"sqlite:///{tmp_path / 't.db'}", kinds={"recorder": recorder.factory}
        ) as rt:
            group = rt.create_group(
                primary={"kind": "scripted"},
                sleeptime=[{"kind": "recorder"}],
                frequency=1,
                run_timeout=0.2,
            )
            (run,) = rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
    finally:
        gate.set()
    assert run.stop_reason is not None and run.stop_reason.value == "timeout"
    (finished,) = records.events("run_finished")
    assert finished.level == logging.WARNING
    assert finished["stop_reason"] == "timeout"
    assert "run_timeout of 0.2s" in finished["error"]


def test_json_lines_are_valid_json_with_the_bound_ids(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="debug", json=True)
    with Runtime.start(db_url) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
        )
        (run_id,) = rt.step(group.id, [user("my favorite color is teal")]).run_ids
        rt.wait_for_runs([run_id], timeout=30)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "event"} <= set(e) for e in events)
    assert all(e["logger"].startswith("sleeptime") for e in events)
    datetime.fromisoformat(events[0]["timestamp"])
    (turn,) = [e for e in events if e["event"] == "turn_recorded"]
    assert turn["group_id"] == group.id and turn["agent_id"] == group.primary_agent_id
    assert turn["level"] == "debug" and turn["fired"] is True and turn["duration_ms"] > 0
    (finished,) = [e for e in events if e["event"] == "run_finished"]
    assert finished["level"] == "info" and finished["logger"] == "sleeptime.run"
    assert finished["group_id"] == group.id and finished["run_id"] == run_id
    assert finished["agent_id"] == group.sleeptime_agent_ids[0]
    assert finished["status"] == "completed"


def test_console_lines_carry_the_event_and_its_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="info", json=False)
    with Runtime.start(f"sqlite:///{tmp_path / 'c.db'}") as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
        )
        (run_id,) = rt.step(group.id, [user("my name is Ada")]).run_ids
        rt.wait_for_runs([run_id], timeout=30)
    err = capsys.readouterr().err
    (finished,) = [line for line in err.splitlines() if "run_finished" in line]
    assert "[info" in finished and f"run_id={run_id}" in finished
    assert "status=completed" in finished


def test_configure_logging_changes_only_the_runtimes_logger() -> None:
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    configure_logging(level="info")
    configure_logging(level="error", json=True)  # replaces its handler, adds none
    runtime = logging.getLogger("sleeptime")
    assert len(runtime.handlers) == 1
    assert runtime.level == logging.ERROR and runtime.propagate is False
    assert root.handlers == root_handlers and root.level == root_level
    with pytest.raises(ValueError, match="not one of"):
        configure_logging(level="loud")


def test_the_environment_asks_for_the_runtimes_own_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ensure_logging()
    assert logging.getLogger("sleeptime").handlers == []  # nothing asked: the host's
    monkeypatch.setenv("SLEEPTIME_LOG_LEVEL", "info")
    ensure_logging()
    ensure_logging()
    runtime = logging.getLogger("sleeptime")
    assert len(runtime.handlers) == 1 and runtime.level == logging.INFO


def test_crashes_leave_the_pykka_logger_as_the_host_set_it(
    tmp_path: Path, records: Records
) -> None:
    pykka_logger = logging.getLogger("pykka")
    pykka_logger.setLevel(logging.INFO)
    seen = Records()
    pykka_logger.addHandler(seen)
    handlers = pykka_logger.handlers[:]
    with Runtime.start(
        f"sqlite:///{tmp_path / 'p.db'}",
        chaos=Chaos(crash_rate=1.0, only="group:", crash_limit=1),
        restart_policy=RestartPolicy(backoff_base=0.001, backoff_max=0.01),
    ) as rt:
        assert pykka_logger.level == logging.INFO
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
        )
        rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
        assert rt.stats()["restarts"] == 1
    assert pykka_logger.level == logging.INFO
    assert pykka_logger.handlers == handlers
    assert [r for r in seen.records if r.levelno >= logging.WARNING] == []
    (crashed,) = records.events("actor_crashed")
    assert crashed.level == logging.WARNING and crashed["group_id"] == group.id
    assert crashed.record.exc_info is not None and "InjectedCrash" in crashed["error"]
    (restarted,) = records.events("actor_restarted")
    assert restarted.level == logging.WARNING and restarted["incarnation"] == 1


def test_a_logger_binds_context_and_renders_one_line(records: Records) -> None:
    log = get_logger("sleeptime.test").bind(group_id="group-1")
    log.info("thing_done", count=3, note="two words", missing=None)
    log.debug("detail", name="shadows a record attribute")
    first, second = records.records
    assert first.getMessage() == 'thing_done group_id=group-1 count=3 note="two words"'
    assert first.__dict__["event"] == "thing_done" and first.__dict__["group_id"] == "group-1"
    assert second.name == "sleeptime.test"  # the field `name` did not overwrite it
    assert second.__dict__["event_fields"]["name"] == "shadows a record attribute"
    assert second.funcName == "test_a_logger_binds_context_and_renders_one_line"
    assert render_message("e", {"text": 'say "hi"', "n": 1.5}) == 'e text="say \\"hi\\"" n=1.5'
    with pytest.raises(ValueError, match="under 'sleeptime'"):
        get_logger("elsewhere")
