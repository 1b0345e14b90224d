"""Through a transaction-mode connection pooler (pgbouncer): nothing relies on a session.

pgbouncer in `pool_mode = transaction` hands each transaction whatever server connection is
free, so a session setting made by one client (a reader's read-only mode, a lock held across
transactions) would leak to the next. Two runtimes share one database through it here, as
two processes would (SPEC 15). Skipped without the `pgbouncer` binary (Debian's package; CI
installs it), or a failure with REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Runtime
from messages import RunStatus
from tests.agents import user, wait_until
from tests.postgres import PostgresCluster, _as_server_user, free_port, unavailable


@pytest.fixture
def pooled_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A database of the test cluster, reached through pgbouncer in transaction mode."""
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    if binary is None:
        unavailable("pgbouncer is not installed (Debian's `pgbouncer` package)")
    name = postgres_cluster.create_database("pooled")
    port = free_port("127.0.0.1")
    # pgbouncer runs as the server account when the tests run as root: a directory it can
    # reach (pytest's own temporary directories are the test user's alone).
    tmp_path = Path(tempfile.mkdtemp(prefix="sleeptime-pgbouncer-"))
    tmp_path.chmod(0o777)
    (tmp_path / "users.txt").write_text(f'"{postgres_cluster.user}" ""\n')
    (tmp_path / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={postgres_cluster.host} port={postgres_cluster.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {tmp_path / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 8\nmax_client_conn = 400\n"
        f"logfile = {tmp_path / 'pgbouncer.log'}\n"
    )
    for path in tmp_path.iterdir():
        path.chmod(0o666)
    pooler = subprocess.Popen(_as_server_user([binary, str(tmp_path / "pgbouncer.ini")]))
    # pgbouncer before 1.21 (Debian 12 has 1.18) cannot carry psycopg's prepared statements.
    url = (
        f"postgresql+psycopg://{postgres_cluster.user}@127.0.0.1:{port}/{name}"
        "?prepare_threshold=none"
    )
    try:
        yield url
    finally:
        pooler.terminate()
        pooler.wait(10)
        postgres_cluster.drop_database(name)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_two_runtimes_share_a_database_through_a_transaction_mode_pooler(
    pooled_url: str,
) -> None:
    def started() -> bool:  # pgbouncer listens a moment after it starts
        try:
            Runtime.start(pooled_url, lease_s=2.0, shards=16).stop()
        except Exception:
            return False
        return True

    assert wait_until(started, timeout=20, every=0.1)
    first = Runtime.start(pooled_url, lease_s=2.0, shards=16)
    second = Runtime.start(pooled_url, lease_s=2.0, shards=16)
    try:
        assert len(first._store.book.held()) == len(second._store.book.held()) == 8
        runs = []
        groups = []
        for rt in (first, second):
            for _ in range(3):
                group = rt.create_group(
                    primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
                )
                groups.append((rt, group.id))
        for n in range(10):  # enough for psycopg to prepare its statements, were it to
            for rt, group_id in groups:
                runs.append((rt, rt.step(group_id, [user(f"my favorite color is c{n}")]).run_ids))
        for rt, run_ids in runs:
            assert all(r.status is RunStatus.COMPLETED for r in rt.wait_for_runs(run_ids, 30))
        report = first.check_invariants()
        assert report.ok, report.violations
        assert report.groups == 6
    finally:
        second.stop()
        first.stop()
