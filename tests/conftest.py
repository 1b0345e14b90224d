"""Shared fixtures: a real database per test, on SQLite and on PostgreSQL, and a real runtime.

Every test that takes `db_url` (or `rt`) runs twice, with ids `sqlite` and `postgresql`. The
PostgreSQL half uses one throwaway server per session, started the first time it is needed, and
a fresh database per test. Without PostgreSQL server binaries that half is skipped, or fails
when REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from actors import Runtime
from tests.postgres import (
    MISSING_BINARIES,
    PostgresCluster,
    PostgresUnavailable,
    find_bin_dir,
    unavailable,
)

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for the whole session, removed at its end."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        unavailable(MISSING_BINARIES)
    try:
        cluster = PostgresCluster.create(bin_dir)
    except PostgresUnavailable as error:
        unavailable(str(error))
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty database for one test: a SQLite file or a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sleeptime.db'}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    name = cluster.create_database(request.node.name)
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture
def backend(db_url: str) -> str:
    """The database backend of this test: "sqlite" or "postgresql"."""
    return make_url(db_url).get_backend_name()


@pytest.fixture
def rt(db_url: str) -> Iterator[Runtime]:
    """A started runtime over `db_url`, stopped after the test."""
    runtime = Runtime.start(db_url)
    try:
        yield runtime
    finally:
        runtime.stop(drain_timeout=5)


@pytest.fixture(scope="session")
def local_ray() -> Iterator[object]:
    """A local Ray for the session (frugal and quiet, see actors._ray_local), shut down at
    its end; skipped without the ray extra."""
    ray_cluster = pytest.importorskip("actors.ray_cluster", reason="the ray extra is missing")
    here = ray_cluster.start_local_ray(num_cpus=4)
    try:
        yield here
    finally:
        here.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With tests spread over processes (`-n`, pytest-xdist), keep the Ray tests in one of
    them: each process would otherwise start a local Ray of its own."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))
