"""The test fixtures themselves: the throwaway PostgreSQL cluster and the per-test databases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.postgres import (
    MISSING_BINARIES,
    PostgresCluster,
    database_name,
    find_bin_dir,
    scratch_parent,
    unavailable,
)

ROOT = Path(__file__).resolve().parent.parent


def user_tables(cluster: PostgresCluster, dbname: str) -> list[str]:
    with cluster.connect(dbname) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return sorted(str(row[0]) for row in rows)


def test_cluster_accepts_connections_on_loopback_only(postgres_cluster: PostgresCluster) -> None:
    with postgres_cluster.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('listen_addresses', 'port', 'fsync', 'unix_socket_directories')"
            ).fetchall()
        )
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "port": str(postgres_cluster.port),
        "fsync": "off",
        "unix_socket_directories": str(postgres_cluster.base_dir),
    }
    assert postgres_cluster.admin_url == (
        f"postgresql+psycopg://postgres@127.0.0.1:{postgres_cluster.port}/postgres"
    )


@pytest.mark.parametrize("round", [1, 2])
def test_each_test_gets_a_fresh_empty_database(
    db_url: str, backend: str, round: int, request: pytest.FixtureRequest
) -> None:
    url = make_url(db_url)
    assert url.get_backend_name() == backend
    if backend == "sqlite":
        assert url.database is not None and not Path(url.database).exists()
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.username) == ("127.0.0.1", cluster.port, "postgres")
    assert url.database is not None
    assert user_tables(cluster, url.database) == []
    with cluster.connect(url.database) as conn:  # the other round must not see this
        conn.execute("CREATE TABLE leftover (id int)")


def test_two_databases_are_independent(postgres_cluster: PostgresCluster) -> None:
    first = postgres_cluster.create_database("first")
    second = postgres_cluster.create_database("second")
    try:
        assert first != second
        with postgres_cluster.connect(first) as conn:
            conn.execute("CREATE TABLE only_here (note text)")
            conn.execute("INSERT INTO only_here VALUES ('first')")
        assert user_tables(postgres_cluster, first) == ["only_here"]
        assert user_tables(postgres_cluster, second) == []
    finally:
        postgres_cluster.drop_database(first)
        postgres_cluster.drop_database(second)
    with postgres_cluster.connect() as admin:
        left = admin.execute(
            "SELECT count(*) FROM pg_database WHERE datname = ANY(%s)", [[first, second]]
        ).fetchone()
    assert left == (0,)


def test_restart_keeps_committed_data_on_the_same_port(postgres_cluster: PostgresCluster) -> None:
    name = postgres_cluster.create_database("restart")
    port = postgres_cluster.port
    try:
        with psycopg.connect(postgres_cluster.dsn(name)) as conn:
            conn.execute("CREATE TABLE kept (note text)")
            conn.execute("INSERT INTO kept VALUES ('before the restart')")
            conn.commit()
            held = psycopg.connect(postgres_cluster.dsn(name))
        postgres_cluster.restart()
        assert postgres_cluster.port == port
        with pytest.raises(psycopg.OperationalError):  # connections do not survive a restart
            held.execute("SELECT 1")
        held.close()
        with psycopg.connect(postgres_cluster.dsn(name)) as conn:
            assert conn.execute("SELECT note FROM kept").fetchall() == [("before the restart",)]
    finally:
        postgres_cluster.drop_database(name)


def test_stop_then_start_serves_again(postgres_cluster: PostgresCluster) -> None:
    postgres_cluster.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            postgres_cluster.connect()
    finally:
        postgres_cluster.start()
    with postgres_cluster.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_database_names_are_unique_valid_identifiers() -> None:
    names = {database_name("test_x[postgresql-" + "y" * 80 + "]") for _ in range(100)}
    assert len(names) == 100
    assert all(len(name) <= 63 and name.startswith("test_x_postgresql_y") for name in names)
    assert database_name("[]").startswith("test_")


def test_missing_binaries_skip_unless_postgres_is_required() -> None:
    with pytest.raises(pytest.skip.Exception, match="not found"):
        unavailable(MISSING_BINARIES, environ={})
    with pytest.raises(pytest.skip.Exception):
        unavailable(MISSING_BINARIES, environ={"REQUIRE_POSTGRES": "0"})
    with pytest.raises(pytest.fail.Exception, match="set PG_BIN"):
        unavailable(MISSING_BINARIES, environ={"REQUIRE_POSTGRES": "1"})


def fake_install(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name in ("initdb", "pg_ctl"):
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(0o755)
    return directory


def test_binaries_are_found_in_pg_bin_then_path_then_the_newest_debian_install(
    tmp_path: Path,
) -> None:
    debian = tmp_path / "debian"
    for version in ("9.6", "15", "13"):
        fake_install(debian / version / "bin")
    (debian / "16").mkdir()  # a leftover without binaries
    on_path = fake_install(tmp_path / "on-path")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_bin_dir({"PATH": str(empty)}, debian) == debian / "15" / "bin"
    assert find_bin_dir({"PATH": f"{empty}:{on_path}"}, debian) == on_path
    assert find_bin_dir({"PG_BIN": str(on_path), "PATH": ""}, tmp_path / "none") == on_path
    # An explicit PG_BIN is the only place looked at.
    assert find_bin_dir({"PG_BIN": str(empty), "PATH": str(on_path)}, debian) is None
    assert find_bin_dir({"PATH": str(empty)}, tmp_path / "none") is None


def test_require_postgres_turns_the_skip_into_a_failure_in_a_real_session(
    tmp_path: Path,
) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"REQUIRE_POSTGRES", "PYTEST_ADDOPTS", "PG_BIN"}
    }
    env["PG_BIN"] = str(tmp_path)  # holds no binaries

    def session(selection: list[str], **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q", *selection],
            cwd=ROOT,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    this = "tests/test_postgres_fixture.py"
    pg_test = f"{this}::test_cluster_accepts_connections_on_loopback_only"
    sqlite_tests = [
        f"{this}::test_each_test_gets_a_fresh_empty_database[sqlite-{n}]" for n in (1, 2)
    ]
    sessions = {  # run at once: each pays Python's and the runtime's import time
        "skipped": session([pg_test]),
        "required": session([pg_test, *sqlite_tests], REQUIRE_POSTGRES="1"),
    }
    results: dict[str, tuple[int, str]] = {}
    for label, process in sessions.items():
        output = process.communicate(timeout=120)[0]
        results[label] = (process.returncode, output)

    code, output = results["skipped"]
    assert code == 0 and "1 skipped" in output and MISSING_BINARIES in output, output
    code, output = results["required"]
    assert code == 1 and MISSING_BINARIES in output, output
    # The server is set up only for PostgreSQL tests, so SQLite ones pass without it.
    assert "2 passed, 1 error" in output, output


def test_cluster_goes_to_shared_memory_only_when_it_has_room(tmp_path: Path) -> None:
    assert scratch_parent(tmp_path) == tmp_path  # a disk with room stands in for /dev/shm
    assert scratch_parent(tmp_path / "missing") is None
