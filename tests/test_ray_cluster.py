"""Shard hosts on a local Ray (SPEC 16): workloads fanned out over them, a host killed
with kill -9 under load, hosts joining and leaving under load.

Every host is a real Ray actor process on the session's local Ray, over a real
PostgreSQL database, with 1 s leases. Load comes from caller threads through a
`RayRuntime`; each caller records the turns it was answered, and at the end each group
has exactly those turns stored (none lost, none twice), every run ended, and every
invariant holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray extra is missing")

import ray

import run
from actors import INVARIANTS
from actors.ray_cluster import HostInfo, RayCluster, RayRuntime
from tests.agents import Echo, user, wait_until
from tests.postgres import PostgresCluster
from tests.rayhosts import SHARDS, database, hosts

pytestmark = pytest.mark.ray

SLEEPER = {"kind": "simulated", "config": {"latency_ms": 60, "seed": 3}}
SCRIPTED = {"kind": "scripted"}


@pytest.fixture
def pg_url(postgres_cluster: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    with database(postgres_cluster, request.node.name) as url:
        yield url


def held_by(cluster: RayCluster) -> dict[str, set[int]]:
    return {info.name: set(info.held) for info in cluster.hosts()}


def every_shard_held_once(cluster: RayCluster) -> bool:
    held = list(held_by(cluster).values())
    return sum(len(h) for h in held) == SHARDS and len(set().union(*held)) == SHARDS


@dataclass
class Load:
    """Caller threads taking turns on their groups through the client until stopped."""

    client: RayRuntime
    groups: list[str]
    callers: int = 4
    answered: dict[str, list[int]] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answered = {g: [] for g in self.groups}
        self._threads = [
            threading.Thread(target=self._drive, args=(k,), daemon=True)
            for k in range(self.callers)
        ]

    def _drive(self, k: int) -> None:
        mine = self.groups[k :: self.callers]
        n = 0
        while not self._stop.is_set():
            group_id = mine[n % len(mine)]
            n += 1
            try:
                result = self.client.step(group_id, [user(f"turn {n} from caller {k}")])
            except BaseException as error:
                with self._lock:
                    self.errors.append(error)
                return
            with self._lock:
                self.answered[group_id].append(result.turn)
                self.run_ids.extend(result.run_ids)

    def turns(self) -> int:
        with self._lock:
            return sum(len(t) for t in self.answered.values())

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def check(self) -> None:
        """Every call answered, each group's stored turns exactly the answered ones,
        every run ended, every invariant held."""
        assert not self.errors, self.errors
        for group_id, turns in self.answered.items():
            assert sorted(turns) == list(range(1, len(turns) + 1)), group_id
            assert self.client.get_group(group_id).turns == len(turns), group_id
        runs = self.client.wait_for_runs(self.run_ids, timeout=60)
        assert all(run.status.terminal for run in runs)
        report = self.client.check_invariants(self.groups)
        assert report.ok, report.violations


def make_groups(client: RayRuntime, count: int, primary: dict[str, str] = SCRIPTED) -> list[str]:
    return [
        client.create_group(primary=primary, sleeptime=[SLEEPER], frequency=1).id
        for _ in range(count)
    ]


def test_simulate_and_loadtest_fan_out_over_three_hosts(
    local_ray: object, pg_url: str, tmp_path: Path
) -> None:
    with hosts(pg_url, 3) as cluster:
        common = ["--ray", "3", "--ray-namespace", cluster.namespace, "--db", pg_url]
        simulated = tmp_path / "simulate.json"
        shape = ["--groups", "12", "--turns", "5", "--agents", "2", "--latency-ms", "5"]
        code = run.main(["simulate", *common, *shape, "--no-progress", "--report", str(simulated)])
        assert code == 0
        report = json.loads(simulated.read_text())
        assert report["hosts"] == 3 and report["turns"] == 60
        assert report["runs"]["completed"] == 120 and all(report["invariants"].values())
        assert report["latency_ms"]["turn"]["p50"] is not None

        loaded = tmp_path / "loadtest.json"
        shape = ["--groups", "6", "--rate", "40", "--duration", "2", "--arrivals", "uniform"]
        code = run.main(["loadtest", *common, *shape, "--no-progress", "--report", str(loaded)])
        assert code == 0
        report = json.loads(loaded.read_text())
        assert report["hosts"] == 3 and report["turns"] == report["arrivals"] == 80
        assert report["errors"]["count"] == 0 and all(report["invariants"].values())

        client = cluster.client()
        owners = {client.owner_of(g.id).address for g in client.list_groups()}
        assert len(owners) == 3  # each host made (and drove) groups of its own
        assert every_shard_held_once(cluster)


def test_a_host_killed_under_load_is_restarted_and_no_turn_is_lost_or_doubled(
    local_ray: object, pg_url: str
) -> None:
    with hosts(pg_url, 2) as cluster:
        client = cluster.client(retry_timeout=45)
        client.agents.register("echo", Echo, roles=["primary"])  # not a start option
        groups = make_groups(client, 8, primary={"kind": "echo"})
        victim: HostInfo = next(i for i in cluster.hosts() if i.held)
        with Load(client, groups) as load:
            assert wait_until(lambda: load.turns() >= 40, timeout=30)
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = load.turns()

            def restarted() -> bool:
                again = {i.name: i for i in cluster.hosts()}.get(victim.name)
                return again is not None and again.pid != victim.pid

            assert wait_until(restarted, timeout=60, every=0.2)
            # The dead host's groups are served again (by the new incarnation or the other).
            assert wait_until(lambda: load.turns() >= killed_at + 80, timeout=60, every=0.1)
        load.check()
        assert client.retries > 0  # turns in flight at the kill were sent again
        # The new incarnation knows the kind registered through the client: from its peer.
        again = ray.get_actor(victim.name, namespace=cluster.namespace)
        assert "echo" in ray.get(again.kind_names.remote())
        assert wait_until(lambda: every_shard_held_once(cluster), timeout=30, every=0.2)
        attempts = [client.get_run(r).attempt for r in load.run_ids]
        assert max(attempts) <= 3


def test_hosts_joining_and_leaving_hand_their_shards_over_and_lose_nothing(
    local_ray: object, pg_url: str
) -> None:
    with hosts(pg_url, 2) as cluster:
        client = cluster.client(retry_timeout=45)
        groups = make_groups(client, 8)
        with Load(client, groups) as load:
            assert wait_until(lambda: load.turns() >= 30, timeout=30)
            joined = cluster.add_host()  # returns once it holds its share
            assert len(held_by(cluster)[joined]) >= SHARDS // 3 - 1
            before = load.turns()
            assert wait_until(lambda: load.turns() >= before + 30, timeout=30)
            leaving = sorted(held_by(cluster))[0]
            cluster.remove_host(leaving)  # hands every shard over cleanly
            assert leaving not in cluster.names()
            assert wait_until(lambda: every_shard_held_once(cluster), timeout=30, every=0.2)
            after = load.turns()
            assert wait_until(lambda: load.turns() >= after + 30, timeout=30)
        load.check()
        assert client.retries > 0  # turns on moving shards went to their next owner
        assert len(held_by(cluster)) == 2


def test_the_command_line_starts_a_frugal_local_ray_and_leaves_nothing_behind(
    pg_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    before = {p.name for p in Path("/tmp").glob("sleeptime-ray-*")}
    root = Path(__file__).resolve().parent.parent
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("RAY_") or name == "RAY_USAGE_STATS_ENABLED"
    }
    command = ["run.py", "simulate", "--ray", "1", "--db", pg_url, "--ray-namespace", "cli"]
    finished = subprocess.run(
        [sys.executable, *command, "--groups", "4", "--turns", "3", "--no-progress"],
        check=False,
        cwd=root,
        env={**environment, "HOME": str(home), "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "1 shard host(s)" in finished.stdout and "a local Ray" in finished.stdout
    assert f"All {len(INVARIANTS)} invariants hold." in finished.stdout
    assert list(home.iterdir()) == []  # no ~/.ray/auth_token, nothing else
    after = {p.name for p in Path("/tmp").glob("sleeptime-ray-*")}
    assert after <= before  # its session files went with it


def test_the_readme_ray_example_runs(local_ray: object, pg_url: str) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Running on a Ray cluster", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "postgresql://db-host/sleeptime" in example
    example = example.replace("postgresql://db-host/sleeptime", pg_url)
    assert "hosts=3)" in example
    example = example.replace("hosts=3)", 'hosts=3, namespace="readme", lease_s=1.0)', 1)
    exec(compile(example, "README.md", "exec"), {})
