"""Prometheus metrics: a known workload scrapes as exactly what happened, per runtime.

Every figure is read from the runtime's own registry (`rt.metrics.registry`), as a scrape
would read it, and compared with what the workload did: turns that fired and did not,
runs that completed and failed, a crash injected by `Chaos`, passivations.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from actors import Chaos, RestartPolicy, Runtime, StoreRejected, StoreUnavailable
from actors.metrics import RuntimeMetrics
from messages import RunStatus
from tests.agents import Recorder, user, wait_until
from tests.fake_openai import FakeOpenAI, Reply

ROOT = Path(__file__).resolve().parent.parent
MEMORY = {"kind": "memory"}


def value(rt: Runtime, name: str, **labels: str) -> float:
    """A sample's value as scraped; 0 when the series does not exist (yet)."""
    assert rt.metrics is not None
    found = rt.metrics.registry.get_sample_value(f"sleeptime_{name}", labels)
    return 0.0 if found is None else found


def by_label(rt: Runtime, name: str, label: str) -> dict[str, float]:
    """Every series of a counter, by one label's value."""
    assert rt.metrics is not None
    return {
        sample.labels[label]: sample.value
        for family in rt.metrics.registry.collect()
        for sample in family.samples
        if sample.name == f"sleeptime_{name}"
    }


def test_a_known_workload_scrapes_as_exactly_what_happened(db_url: str) -> None:
    recorder = Recorder(fail_on={1})  # the second sleeptime step fails
    with Runtime.start(
        db_url,
        kinds={"recorder": recorder.factory},
        metrics=True,
        # The group's actor crashes on its first message, once; its supervisor restarts it.
        chaos=Chaos(crash_rate=1.0, only="group:", crash_limit=1),
        restart_policy=RestartPolicy(backoff_base=0.001, backoff_max=0.01),
    ) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "recorder"}], frequency=2
        )
        results = [rt.step(group.id, [user(f"turn {n}")]) for n in range(1, 5)]
        run_ids = [run_id for result in results for run_id in result.run_ids]
        runs = rt.wait_for_runs(run_ids, timeout=30)
        stats = rt.stats()

        assert [r.fired for r in results] == [True, False, True, False]
        assert [r.status for r in runs] == [RunStatus.COMPLETED, RunStatus.FAILED]
        assert value(rt, "turns_total", fired="true") == 2
        assert value(rt, "turns_total", fired="false") == 2
        assert value(rt, "turn_duration_seconds_count") == 4
        assert value(rt, "runs_created_total") == 2
        assert by_label(rt, "runs_ended_total", "status") == {"completed": 1, "failed": 1}
        assert value(rt, "runs_ended_total", status="failed", stop_reason="error") == 1
        assert value(rt, "runs_ended_total", status="completed", stop_reason="end_turn") == 1
        assert value(rt, "runs_requeued_total") == 0
        assert value(rt, "run_queued_seconds_count") == 2
        assert value(rt, "run_duration_seconds_count", status="completed") == 1
        assert value(rt, "run_duration_seconds_count", status="failed") == 1
        assert by_label(rt, "actor_crashes_total", "actor") == {"group": 1}
        assert by_label(rt, "actor_restarts_total", "actor") == {"group": 1}
        assert by_label(rt, "actor_escalations_total", "actor") == {}
        assert stats["injected_crashes"] == 1 and stats["restarts"] == 1
        assert value(rt, "commit_batch_size_sum") == stats["writes"]
        assert value(rt, "commit_duration_seconds_count") == stats["transactions"]
        assert by_label(rt, "store_errors_total", "error") == {}
        assert by_label(rt, "model_request_duration_seconds_count", "outcome") == {}
        # The gauges, read as the scrape happens.
        assert value(rt, "active_groups") == stats["active_groups"] == 1
        assert value(rt, "active_agents") == stats["active_agents"] == 1
        assert value(rt, "open_runs", status="created") == 0
        assert value(rt, "open_runs", status="running") == 0
        assert value(rt, "turns_in_flight") == 0
        assert value(rt, "writes_queued") == 0


def test_runs_an_agent_joining_with_backfill_gets_are_counted_as_created(db_url: str) -> None:
    """Backfill runs are created by the join, not by a turn: counted all the same, so
    `runs_created_total` agrees with `runs_ended_total` and with the runs table."""
    with Runtime.start(db_url, metrics=True) as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        made = [r for n in range(3) for r in rt.step(group.id, [user(f"turn {n}")]).run_ids]
        agent = rt.add_sleeptime_agent(group.id, {"kind": "memory"}, backfill=True)
        backfilled = [r.id for r in rt.list_runs(agent_id=agent.id)]
        assert backfilled
        rt.wait_for_runs(made + backfilled, timeout=30)
        stored = rt.list_runs(group_id=group.id)
        assert value(rt, "runs_created_total") == len(stored) == len(made) + len(backfilled)
        assert sum(by_label(rt, "runs_ended_total", "status").values()) == len(stored)


def test_open_runs_and_turns_show_in_the_gauges_while_they_are_open(db_url: str) -> None:
    recorder = Recorder(gate=threading.Event())
    with Runtime.start(db_url, kinds={"recorder": recorder.factory}, metrics=True) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "recorder"}], frequency=1
        )
        first = rt.step(group.id, [user("one")]).run_ids
        second = rt.step(group.id, [user("two")]).run_ids
        recorder.wait_started()  # the first run steps, held at its gate; the second waits
        try:
            assert value(rt, "open_runs", status="running") == 1
            assert value(rt, "open_runs", status="created") == 1
        finally:
            assert recorder.gate is not None
            recorder.gate.set()
        rt.wait_for_runs(first + second, timeout=30)
        assert value(rt, "open_runs", status="running") == 0
        assert value(rt, "open_runs", status="created") == 0


def test_passivations_and_activations_are_counted_by_kind_of_actor(db_url: str) -> None:
    with Runtime.start(db_url, metrics=True, max_active_groups=1, passivate_after=None) as rt:
        spec = {"kind": "simulated", "config": {"seed": 1}}
        first, second = (
            rt.create_group(primary={"kind": "scripted"}, sleeptime=[spec], frequency=1)
            for _ in range(2)
        )
        rt.wait_for_runs(rt.step(first.id, [user("a")]).run_ids, timeout=30)
        rt.wait_for_runs(rt.step(second.id, [user("b")]).run_ids, timeout=30)
        # Beyond max_active_groups, the least recently used group goes, and its agent.
        assert wait_until(lambda: value(rt, "passivations_total", actor="agent") >= 1)
        rt.wait_for_runs(rt.step(first.id, [user("c")]).run_ids, timeout=30)  # wakes it
        assert wait_until(
            lambda: (
                sum(by_label(rt, "passivations_total", "actor").values())
                == rt.stats()["passivations"]
            )
        )
        stats = rt.stats()
        assert by_label(rt, "passivations_total", "actor")["group"] >= 1
        assert sum(by_label(rt, "activations_total", "actor").values()) == stats["activations"]
        assert by_label(rt, "activations_total", "actor")["group"] >= 1


def test_two_runtimes_in_one_process_keep_their_own_figures(tmp_path: Path) -> None:
    spec = {"kind": "simulated", "config": {"seed": 1}}
    with (
        Runtime.start(f"sqlite:///{tmp_path / 'a.db'}", metrics=True) as a,
        Runtime.start(f"sqlite:///{tmp_path / 'b.db'}", metrics=True) as b,
    ):
        for rt, turns in ((a, 3), (b, 1)):
            group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[spec], frequency=1)
            ids = [r for _ in range(turns) for r in rt.step(group.id, [user("hi")]).run_ids]
            rt.wait_for_runs(ids, timeout=30)
        assert a.metrics is not None and b.metrics is not None
        assert a.metrics.registry is not b.metrics.registry
        assert value(a, "turns_total", fired="true") == 3
        assert value(b, "turns_total", fired="true") == 1
        assert value(a, "runs_ended_total", status="completed", stop_reason="end_turn") == 3
        assert value(b, "runs_ended_total", status="completed", stop_reason="end_turn") == 1


def test_a_registry_of_the_hosts_takes_one_runtime_and_is_left_clean(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with Runtime.start(url, metrics=registry) as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY], frequency=0)
        rt.step(group.id, [user("hi")])
        assert registry.get_sample_value("sleeptime_turns_total", {"fired": "false"}) == 1
        with pytest.raises(ValueError, match="one runtime"):
            Runtime.start(f"sqlite:///{tmp_path / 'b.db'}", metrics=registry)
        rt.step(group.id, [user("again")])  # the first is untouched by the refused second
        assert registry.get_sample_value("sleeptime_turns_total", {"fired": "false"}) == 2
    assert registry.get_sample_value("sleeptime_turns_total", {"fired": "false"}) is None
    with Runtime.start(url, metrics=registry) as again:  # the registry was left clean
        assert again.metrics is not None and again.metrics.registry is registry


def test_metrics_are_served_on_a_port_and_in_an_asgi_app(tmp_path: Path) -> None:
    with Runtime.start(f"sqlite:///{tmp_path / 's.db'}", metrics=True) as rt:
        assert rt.metrics is not None
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[MEMORY], frequency=0)
        rt.step(group.id, [user("hi")])
        port = rt.metrics.serve(port=0, addr="127.0.0.1")
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            served = answer.read().decode()
        assert 'sleeptime_turns_total{fired="false"} 1.0' in served
        assert "sleeptime_active_groups 1.0" in served

        app = FastAPI()
        app.mount("/metrics", rt.metrics.asgi_app())
        mounted = asyncio.run(_get(app, "/metrics/"))
        assert mounted.status_code == 200
        assert 'sleeptime_turns_total{fired="false"} 1.0' in mounted.text
    with pytest.raises(urllib.error.URLError):  # the server stopped with the runtime
        urllib.request.urlopen(url, timeout=2)


async def _get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        return await client.get(path)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def test_model_requests_are_counted_by_outcome(tmp_path: Path, fake: FakeOpenAI) -> None:
    def llm() -> dict[str, Any]:
        return {
            "kind": "openai",
            "config": {"base_url": fake.url, "model": "fake-model", "backoff_s": 0.01},
        }

    fake.script_primary(Reply.error(500, "overloaded"), Reply.text("hello"))
    fake.script_sleeptime(Reply.error(429, "slow down", retry_after="0"), Reply.malformed())
    with Runtime.start(f"sqlite:///{tmp_path / 'm.db'}", metrics=True) as rt:
        group = rt.create_group(primary=llm(), sleeptime=[llm()], frequency=1)
        (run,) = rt.wait_for_runs(rt.step(group.id, [user("hi")]).run_ids, timeout=30)
        assert run.status is RunStatus.FAILED  # the malformed answer fails it, unretried
        counts = by_label(rt, "model_request_duration_seconds_count", "outcome")
    assert counts == {"http_500": 1, "ok": 1, "http_429": 1, "malformed": 1}


def test_store_errors_are_counted_by_kind() -> None:
    metrics = RuntimeMetrics()
    metrics.store_error(StoreUnavailable("sqlite:///x.db", "disk I/O error"))
    metrics.store_error(StoreRejected("sqlite:///x.db", "constraint failed"))
    metrics.store_error(StoreUnavailable("sqlite:///x.db", "disk I/O error"))
    sample = metrics.registry.get_sample_value
    assert sample("sleeptime_store_errors_total", {"error": "unavailable"}) == 2
    assert sample("sleeptime_store_errors_total", {"error": "rejected"}) == 1
    assert "sleeptime_store_errors_total" in metrics.text()


def test_without_the_extras_the_runtime_works_and_imports_neither(tmp_path: Path) -> None:
    """No module imports prometheus_client or opentelemetry unless asked to; with them
    missing (as if not installed) the runtime runs, and asking for metrics says what to
    install."""
    code = textwrap.dedent(
        f"""
        import json, sys
        blocked = sys.argv[1] == "blocked"
        if blocked:
            sys.modules["prometheus_client"] = None  # an import of it raises ImportError
            sys.modules["opentelemetry"] = None
        from actors import Runtime
        from messages import MessageCreate
        with Runtime.start("sqlite:///{tmp_path}/" + sys.argv[1] + ".db") as rt:
            group = rt.create_group(
                primary={{"kind": "scripted"}}, sleeptime=[{{"kind": "memory"}}], frequency=1
            )
            said = [MessageCreate(role="user", content="my favorite color is teal")]
            runs = rt.wait_for_runs(rt.step(group.id, said).run_ids, timeout=30)
            hint = None
            if blocked:
                try:
                    Runtime.start("sqlite:///{tmp_path}/refused.db", metrics=True)
                except ImportError as error:
                    hint = str(error)
            print(json.dumps({{
                "status": runs[0].status.value,
                "metrics": rt.metrics is not None,
                "imported": sorted(
                    name for name in ("prometheus_client", "opentelemetry")
                    if sys.modules.get(name) is not None
                ),
                "hint": hint,
            }}))
        """
    )
    for mode in ("clean", "blocked"):
        done = subprocess.run(
            [sys.executable, "-c", code, mode],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "SLEEPTIME_LOG_LEVEL": "error"},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen["status"] == "completed"
        assert seen["metrics"] is False
        assert seen["imported"] == []
        if mode == "blocked":
            assert "pip install 'sleeptime-runtime[metrics]'" in seen["hint"]


def test_a_requeued_run_ended_before_its_next_attempt_has_no_running_duration(
    db_url: str,
) -> None:
    """`run_duration_seconds` is running -> end: a run re-queued after a stop (attempt 2)
    and cancelled before that attempt starts ran for no time here, and is not counted
    (it was, with its first attempt's start)."""
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    with Runtime.start(db_url, kinds={"recorder": recorder.factory}) as first:
        group = first.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "recorder"}])
        (run_id,) = first.step(group.id, [user("hello")]).run_ids
        recorder.wait_started()
        first.stop(drain_timeout=0)  # left running: the next start re-queues it
    gate.set()
    # Its kind is not registered here: the re-queued run waits for it, `created`.
    with Runtime.start(db_url, metrics=True) as rt:
        assert wait_until(lambda: rt.get_run(run_id).attempt == 2)
        assert rt.cancel_run(run_id).status is RunStatus.CANCELLED
        assert value(rt, "runs_ended_total", status="cancelled", stop_reason="cancelled") == 1
        assert value(rt, "run_duration_seconds_count", status="cancelled") == 0
