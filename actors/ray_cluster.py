"""sleeptime-runtime on a Ray cluster (SPEC 16): shard hosts as Ray actors, and clients
with the Runtime's API that route each call to the host owning its group.

Needs the `ray` extra (`pip install -e ".[ray]"`); nothing else in the project imports
Ray. A shard host (`ShardHost`) is a runtime over one PostgreSQL database serving a share
of its shards (SPEC 15), as an async Ray actor named `shard-host-<n>` in a namespace,
restarted by Ray when it dies. `start_hosts` starts N of them; `RayRuntime` (and
`AsyncRayRuntime`) is the client.

Example:
    >>> from actors.ray_cluster import local_ray, start_hosts
    >>> with local_ray(), start_hosts("postgresql://db-host/sleeptime", hosts=3) as cluster:
    ...     rt = cluster.client()
    ...     group = rt.create_group(primary={"kind": "scripted"},
    ...                             sleeptime=[{"kind": "memory"}], frequency=2)
    ...     result = rt.step(group.id, [MessageCreate(role="user", content="hi")])
    ...     rt.wait_for_runs(result.run_ids, timeout=30)
    ...     cluster.add_host()                  # takes its share, handed over cleanly
    ...     cluster.remove_host("shard-host-0") # hands its shards over, then leaves

On a cluster that runs already: `ray.init(address="auto")` (or `connect_ray(address)`),
then `RayRuntime.connect(namespace)` finds the hosts started there (with
`start_hosts(..., detached=True)` they outlive the process that started them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import ray
from ray.exceptions import RayActorError

from actors._ray_async_client import AsyncRayRuntime, AsyncRayTurnStream
from actors._ray_client import DEFAULT_RETRY_S, RayAgentKinds, RayRuntime, RayTurnStream
from actors._ray_host import ShardHost
from actors._ray_local import LocalRay, connect_ray, local_ray, start_local_ray
from actors._ray_routes import (
    DEFAULT_NAMESPACE,
    HOST_PREFIX,
    HostDirectory,
    HostGone,
    HostInfo,
    host_address,
)
from actors.runtime import DEFAULT_LEASE_S

R = TypeVar("R")

DEFAULT_HOST_CPUS = 0.25
"""Ray's logical CPUs reserved per host (a placement hint: a host uses what it needs)."""
DEFAULT_MAX_RESTARTS = -1
"""A host is restarted however often it dies."""
MAX_CONCURRENCY = 1000
"""Calls a host serves at once (an async actor: they wait on its event loop)."""
STOP_TIMEOUT_S = 120.0


class RayCluster:
    """The shard hosts of one database in one Ray namespace: start, grow, shrink, stop.

    Made by `start_hosts`, or `RayCluster.connect(namespace)` for hosts running already.
    Hosts are named `shard-host-<n>`; `hosts()` says what each holds. Hosts that are not
    detached live as long as the RayCluster that started them (Ray ends an actor nobody
    holds a handle to): keep it until the hosts should stop.
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        options: Mapping[str, Any],
        host_cpus: float = DEFAULT_HOST_CPUS,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        detached: bool = False,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self._options = dict(options)
        self._host_cpus = host_cpus
        self._max_restarts = max_restarts
        self._detached = detached
        self._directory = HostDirectory(namespace)
        # Ray ends an actor that is not detached once nobody holds a handle to it.
        self._spawned: dict[str, Any] = {}

    @classmethod
    def connect(cls, namespace: str = DEFAULT_NAMESPACE) -> RayCluster:
        """The hosts running in `namespace` (HostGone if none), to add or remove hosts
        (added ones get the options of `start_hosts`' defaults and the first host's URL)."""
        directory = HostDirectory(namespace)
        names = directory.refresh()
        if not names:
            raise HostGone(f"ray:{namespace}/ (no shard host in this namespace)")
        first = directory.handle(directory.address(names[0]))
        info: HostInfo = RayRuntime._get(first.info.remote())
        return cls(info.url, namespace, {})

    # -- the hosts ------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The hosts' names, as Ray lists them now."""
        return self._directory.refresh()

    def hosts(self) -> list[HostInfo]:
        """Every host as it describes itself: pid, node, shards held (those answering)."""
        return self.client().hosts()

    def _spawn(self, name: str, joining: bool) -> Any:
        options: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "max_restarts": self._max_restarts,
            "max_task_retries": 0,  # a client retries, with the request id, at the owner
            "num_cpus": self._host_cpus,
            "max_concurrency": MAX_CONCURRENCY,
            "scheduling_strategy": "SPREAD",
        }
        if self._detached:
            options["lifetime"] = "detached"
        remote: Any = ray.remote(ShardHost)
        host_options = {**self._options, "joining": joining}
        return remote.options(**options).remote(self.url, name, self.namespace, host_options)

    def add_hosts(self, count: int) -> list[str]:
        """Start `count` more hosts, at once; returns once each holds its fair share
        (the others hand their excess over cleanly). Their names, in order."""
        taken = set(self.names())
        numbers = (
            n for n in range(len(taken) + count + 1_000_000) if f"{HOST_PREFIX}{n}" not in taken
        )
        names = [f"{HOST_PREFIX}{next(numbers)}" for _ in range(count)]
        handles = [self._spawn(name, joining=bool(taken)) for name in names]
        try:
            ray.get([handle.info.remote() for handle in handles])
        except BaseException:
            for handle in handles:
                ray.kill(handle, no_restart=True)
            raise
        self._spawned.update(zip(names, handles, strict=True))
        self._directory.refresh()
        return names

    def add_host(self) -> str:
        """Start one more host (see `add_hosts`); its name."""
        return self.add_hosts(1)[0]

    def remove_host(self, name: str, drain_timeout: float = 30.0) -> None:
        """Stop a host cleanly: it hands every shard over (its queued turns finish, its
        open runs get up to `drain_timeout` s, the others take its shards at once), then
        its actor leaves for good (no restart)."""
        self.remove_hosts([name], drain_timeout)

    def remove_hosts(self, names: Sequence[str], drain_timeout: float = 30.0) -> None:
        """Stop these hosts cleanly (see `remove_host`), all at once."""
        handles = {
            name: self._directory.handle(host_address(self.namespace, name)) for name in names
        }
        stopping: list[Any] = [handle.stop.remote(drain_timeout) for handle in handles.values()]
        try:
            for ref in stopping:
                try:
                    ray.get(ref, timeout=drain_timeout + STOP_TIMEOUT_S)
                except RayActorError:
                    pass  # it died meanwhile: its leases expire instead
        finally:
            for name, handle in handles.items():
                ray.kill(handle, no_restart=True)
                self._spawned.pop(name, None)
            self._directory.refresh()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop every host cleanly, all at once (their open runs get `drain_timeout` s;
        those still open stay stored, recovered by the next host that starts)."""
        self.remove_hosts(self.names(), drain_timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- using it -------------------------------------------------------------------------

    def client(self, retry_timeout: float = DEFAULT_RETRY_S) -> RayRuntime:
        """A client with the Runtime's API, routing each call to its group's host."""
        return RayRuntime.connect(self.namespace, retry_timeout=retry_timeout)

    def async_client(self, retry_timeout: float = DEFAULT_RETRY_S) -> AsyncRayRuntime:
        """A client with the AsyncRuntime's API (see `client`)."""
        return AsyncRayRuntime.connect(self.namespace, retry_timeout=retry_timeout)

    def run_on_hosts(
        self, fn: Callable[..., R], slices: Mapping[str, Sequence[Any]]
    ) -> dict[str, R]:
        """`fn(runtime, *arguments)` on each host named in `slices` (name -> arguments),
        all at once, one Ray call per host; their results by host name.

        `runtime` is a `RayRuntime` inside the host: it serves the host's own groups
        with no Ray call and routes the others. This is how a workload runs where its
        groups live (`run.py simulate --ray N`)."""
        refs: dict[str, Any] = {
            name: self._directory.handle(host_address(self.namespace, name)).call.remote(
                fn, tuple(arguments)
            )
            for name, arguments in slices.items()
        }
        return {name: RayRuntime._get(ref) for name, ref in refs.items()}


def start_hosts(
    url: str,
    hosts: int = 2,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    lease_s: float = DEFAULT_LEASE_S,
    host_cpus: float = DEFAULT_HOST_CPUS,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    detached: bool = False,
    **options: Any,
) -> RayCluster:
    """Start `hosts` shard hosts on the PostgreSQL database at `url`, in `namespace`, on
    the Ray this process is connected to (`ray.init`, or `start_local_ray`); returns once
    each holds its fair share of the shards.

    `options` are `Runtime.start`'s (`workers`, `kinds`, `shards`, `max_turns_in_flight`,
    ...), for every host; `lease_s` is how long a dead host's shards wait for a new owner.
    Ray restarts a host that dies up to `max_restarts` times (-1: always); `host_cpus`
    is the logical CPUs each reserves; `detached` hosts outlive this process (stop them
    with `RayCluster.connect(namespace).stop()`)."""
    if hosts < 1:
        raise ValueError(f"hosts={hosts}: start at least one shard host")
    if not url.startswith(("postgresql", "postgres")):
        raise ValueError(
            f"shard hosts share one PostgreSQL database; {url.split(':', 1)[0]!r} is not "
            "one (a SQLite file has one process: use Runtime.start)"
        )
    cluster = RayCluster(
        url, namespace, {"lease_s": lease_s, **options}, host_cpus, max_restarts, detached
    )
    cluster.add_hosts(hosts)
    return cluster


__all__ = [
    "DEFAULT_HOST_CPUS",
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_NAMESPACE",
    "AsyncRayRuntime",
    "AsyncRayTurnStream",
    "HostGone",
    "HostInfo",
    "LocalRay",
    "RayAgentKinds",
    "RayCluster",
    "RayRuntime",
    "RayTurnStream",
    "ShardHost",
    "connect_ray",
    "local_ray",
    "start_hosts",
    "start_local_ray",
]
