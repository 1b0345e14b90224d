"""The shard hosts a `simulate --ray N` or `loadtest --ray N` runs on (the `ray` extra).

A local Ray (frugal and quiet, started and stopped here) or the cluster of
`--ray-address`; the shard hosts of `--ray-namespace` there, N of them (started here,
and stopped cleanly at the end, if fewer run already), all on the PostgreSQL `--db`.
`cli.workloads` imports this module only when `--ray` or `--ray-address` is given.

Example:
    >>> with ray_hosts(args, options={"workers": 32}) as (client, cluster, hosts):
    ...     outcome = fanout.simulate_across(client, cluster.run_on_hosts, hosts, shape, ...)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from actors.ray_cluster import (
    LocalRay,
    RayCluster,
    RayRuntime,
    connect_ray,
    start_local_ray,
)
from cli.command import CommandError
from persistence import redact


@contextmanager
def ray_hosts(
    args: argparse.Namespace, options: dict[str, Any]
) -> Iterator[tuple[RayRuntime, RayCluster, list[str]]]:
    """A client, the cluster and the hosts' names, for the workload's time."""
    url: str = args.db
    namespace: str = args.ray_namespace
    try:
        here: LocalRay = (
            connect_ray(args.ray_address, namespace=namespace)
            if args.ray_address is not None
            else start_local_ray()
        )
    except ConnectionError as error:
        raise CommandError(str(error)) from error
    cluster = RayCluster(url, namespace, options)
    started: list[str] = []
    try:
        running = cluster.names()
        if running:
            served = cluster.hosts()[0].url if cluster.hosts() else redact(url)
            if served != redact(url):
                raise CommandError(
                    f"the shard hosts in Ray namespace {namespace!r} serve {served}, not"
                    f" {redact(url)}: give their --db, or another --ray-namespace"
                )
        wanted = args.ray or 0
        if wanted > len(running):
            started = cluster.add_hosts(wanted - len(running))
        hosts = cluster.names()
        if not hosts:
            raise CommandError(
                f"no shard hosts in Ray namespace {namespace!r} at {args.ray_address}: give"
                " --ray N to start N of them"
            )
        where = "a local Ray" if here.owned and args.ray_address is None else here.address
        print(f"Ray: {len(hosts)} shard host(s) in namespace {namespace!r} on {where}", flush=True)
        yield cluster.client(), cluster, hosts
    finally:
        try:
            if started:
                cluster.remove_hosts(started)
        finally:
            here.stop()
