"""Shard hosts on the test session's local Ray: a database and a cluster for each test
(or module), each in a Ray namespace of its own, stopped at the end.

Imported by the Ray tests only (it imports Ray)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from actors.ray_cluster import RayCluster, start_hosts
from tests.postgres import PostgresCluster

LEASE_S = 1.0
SHARDS = 64
HOST_OPTIONS: dict[str, Any] = {"lease_s": LEASE_S, "shards": SHARDS, "workers": 8}


@contextmanager
def database(postgres: PostgresCluster, name: str) -> Iterator[str]:
    """A fresh PostgreSQL database's URL, dropped at the end."""
    created = postgres.create_database(name)
    try:
        yield postgres.url(created)
    finally:
        postgres.drop_database(created)


@contextmanager
def hosts(url: str, count: int, **options: Any) -> Iterator[RayCluster]:
    """`count` shard hosts on `url`, with short leases, in a new namespace; stopped after."""
    cluster = start_hosts(
        url, count, namespace=f"test-{uuid.uuid4().hex[:8]}", **{**HOST_OPTIONS, **options}
    )
    try:
        yield cluster
    finally:
        cluster.stop(drain_timeout=5)
