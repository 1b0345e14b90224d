"""The shard host: a runtime owning a share of the shards, as an async Ray actor.

One host is one `Runtime` (over `Runtime.start(url, lease_s=..., address=...)`, SPEC 15)
inside a Ray actor named `shard-host-<n>` in its cluster's namespace, advertising
`ray:<namespace>/<name>` as its address, so a `NotOwner` raised anywhere names the actor
to call. Its methods are coroutines (an async actor): Ray runs them all on the actor's
event loop, many at once, through the host's `AsyncRuntime`, so a waiting call holds no
thread. Ray restarts a host that dies (`max_restarts`) by calling `__init__` again with
the same arguments: the new runtime joins as a new member and takes its fair share of the
shards once the dead one's leases expire, recovering their runs as any restart does.

Calls come from `RayRuntime` clients (`actors._ray_client`), which route each to the
host owning the group's shard; `call(fn, ...)` runs a slice of work on the host itself
(`fn(runtime, ...)` on a thread, with a client that serves the host's own groups
directly), for workloads that fan out over the cluster.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import structlog

from actors._ray_client import RayRuntime
from actors._ray_routes import HostDirectory, HostInfo, host_address
from actors.async_runtime import DEFAULT_BLOCKING_THREADS, AsyncRuntime
from actors.runtime import Runtime
from actors.sdk import AgentFactory, AgentRole
from messages import Agent, Block, Group, Message, MessageCreate, PruneReport, Run, TurnResult
from persistence import redact

log = structlog.get_logger("sleeptime.ray")

KindEntry = tuple[AgentFactory, tuple[AgentRole, ...] | None]
"""A kind registered on the cluster: its factory, and the roles it plays (None: its own)."""
PEER_KINDS_TIMEOUT_S = 2.0
"""How long a starting host waits for a peer's kinds (a peer restarting too may not answer)."""
JOB_THREADS = 8
"""Threads a host runs `call` jobs on (slices of a workload)."""
READS = frozenset(
    {
        "get_run",
        "list_runs",
        "count_runs",
        "run_events",
        "get_group",
        "list_groups",
        "count_groups",
        "get_agent",
        "get_blocks",
        "list_messages",
        "check_invariants",
        "owner_of",
        "get_block",
        "block_history",
    }
)
"""The calls any host answers (they read the database)."""


class StreamSent:
    """The first item of a host's stream: the turn was sent to its group (from then on it
    is recorded whatever happens to the stream)."""

    __slots__ = ()


def _kinds_from_peers(directory: HostDirectory, name: str) -> dict[str, KindEntry]:
    """The kinds registered on a running peer (a restarted host must know them before its
    runtime recovers any run); none if no peer answers in time."""
    for peer in directory.refresh():
        if peer == name:
            continue
        try:
            handle = directory.handle(directory.address(peer))
            kinds: dict[str, KindEntry] = RayRuntime._get(
                handle.kinds.remote(), PEER_KINDS_TIMEOUT_S
            )
        except Exception as error:  # restarting, or gone: ask the next one
            log.info("peer_kinds_unavailable", peer=peer, error=type(error).__name__)
            continue
        return kinds
    return {}


def _with_roles(factory: AgentFactory, roles: tuple[AgentRole, ...] | None) -> AgentFactory:
    """The factory, carrying its roles as `agent_roles` (how `Runtime.start(kinds=)` reads
    them)."""
    if roles is None:
        return factory
    carrying = functools.partial(factory)
    carrying.agent_roles = roles  # type: ignore[attr-defined]
    return carrying


class ShardHost:
    """A runtime serving a share of the shards of one PostgreSQL database, as a Ray actor.

    Made by `start_hosts` (`actors.ray_cluster`) with `ray.remote(ShardHost)`; each
    method is called with `.remote(...)` by a `RayRuntime`, which picks the host.
    `options` are `Runtime.start`'s (`lease_s`, `workers`, `kinds`, ...), plus
    `blocking_threads` for the host's `AsyncRuntime`.
    """

    def __init__(self, url: str, name: str, namespace: str, options: Mapping[str, Any]) -> None:
        self._name = name
        self._namespace = namespace
        self._address = host_address(namespace, name)
        options = dict(options)
        given: dict[str, AgentFactory] = options.pop("kinds", None) or {}
        blocking_threads = options.pop("blocking_threads", DEFAULT_BLOCKING_THREADS)
        joining = bool(options.pop("joining", False))
        directory = HostDirectory(namespace)
        # A host restarted by Ray, or added to running ones, may have missed kinds that
        # clients registered since the cluster started: its peers know them.
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        peers = _kinds_from_peers(directory, name) if joining or restarted else {}
        self._kinds: dict[str, KindEntry] = {
            **peers,
            **{kind: (factory, None) for kind, factory in given.items()},
        }
        kinds = {kind: _with_roles(f, roles) for kind, (f, roles) in self._kinds.items()}
        self._runtime = Runtime.start(url, address=self._address, kinds=kinds, **options)
        self._rt = AsyncRuntime.wrap(self._runtime, blocking_threads=blocking_threads)
        self._url = redact(url)
        self._started_at = time.time()
        self._jobs = ThreadPoolExecutor(JOB_THREADS, thread_name_prefix="shard-host-job")
        self._router = RayRuntime(directory, self._runtime._store.book.shards, local=self._runtime)
        log.info("shard_host_started", host=name, pid=os.getpid())

    # -- about the host -------------------------------------------------------------------

    async def info(self) -> HostInfo:
        """Who this host is, where it runs, and the shards it holds now."""
        book = self._runtime._store.book
        return HostInfo(
            name=self._name,
            address=self._address,
            pid=os.getpid(),
            node=socket.gethostname(),
            url=self._url,
            shards=book.shards,
            held=sorted(book.held()),
            started_at=self._started_at,
            stopped=self._runtime.stopped,
        )

    async def stats(self) -> dict[str, int]:
        return self._rt.stats()

    async def kinds(self) -> dict[str, KindEntry]:
        """The kinds registered on the cluster (through a client, or at start)."""
        return dict(self._kinds)

    async def register_kind(
        self, kind: str, factory: AgentFactory, roles: Sequence[AgentRole] | None
    ) -> None:
        self._rt.agents.register(kind, factory, roles)
        self._kinds[kind] = (factory, None if roles is None else tuple(roles))

    async def kind_names(self) -> list[str]:
        return self._rt.agents.names()

    # -- turns ----------------------------------------------------------------------------

    async def step(
        self,
        group_id: str,
        messages: list[MessageCreate],
        timeout: float | None,
        request_id: str | None,
        new_request: bool = False,
    ) -> TurnResult:
        return await self._rt._turn(group_id, messages, "step", timeout, request_id, new_request)

    async def record_turn(
        self,
        group_id: str,
        messages: list[MessageCreate],
        timeout: float | None,
        request_id: str | None,
        new_request: bool = False,
    ) -> TurnResult:
        return await self._rt._turn(group_id, messages, "record", timeout, request_id, new_request)

    async def stream(
        self,
        group_id: str,
        messages: list[MessageCreate],
        timeout: float | None,
        request_id: str | None,
        new_request: bool = False,
    ) -> AsyncIterator[StreamSent | Message | TurnResult]:
        """A streamed turn: `StreamSent` once the turn is sent, each message as the
        primary agent produces it, then the turn's `TurnResult` (or its error).
        `new_request`: the client made `request_id` just now (see `Runtime._prepare_turn`)."""
        stream = self._rt._stream(group_id, messages, timeout, request_id, new_request)
        async with stream:
            await stream.sent()
            yield StreamSent()
            async for message in stream:
                yield message
            yield await stream.result()

    # -- runs, groups, reads --------------------------------------------------------------

    async def wait_for_runs(self, run_ids: list[str], timeout: float | None) -> list[Run]:
        return await self._rt.wait_for_runs(run_ids, timeout)

    async def stored_runs(self, run_ids: list[str]) -> dict[str, Run]:
        """The runs as stored (those that exist), for a client to route by their groups."""
        return await self._rt._blocking(self._runtime._store.get_runs, run_ids)

    async def cancel_run(self, run_id: str) -> Run:
        return await self._rt.cancel_run(run_id)

    async def create_group(self, arguments: dict[str, Any]) -> Group:
        group: Group = await self._rt.create_group(**arguments)
        return group

    async def update_group(self, group_id: str, changes: dict[str, Any]) -> Group:
        group: Group = await self._rt.update_group(group_id, **changes)
        return group

    # -- memory blocks from the application (issue 19) -----------------------------------

    async def set_block(self, agent_id: str, label: str, value: str) -> Block:
        block: Block = await self._rt.set_block(agent_id, label, value)
        return block

    async def create_block(
        self, agent_id: str, label: str, value: str, options: dict[str, Any]
    ) -> Block:
        block: Block = await self._rt.create_block(agent_id, label, value, **options)
        return block

    async def delete_block(self, agent_id: str, label: str) -> Block:
        block: Block = await self._rt.delete_block(agent_id, label)
        return block

    async def prune(self, options: dict[str, Any]) -> PruneReport:
        """`Runtime.prune` over the groups this host serves (the others are skipped)."""
        report: PruneReport = await self._rt.prune(**options)
        return report

    # -- groups over their life -----------------------------------------------------------

    async def delete_group(self, group_id: str) -> None:
        await self._rt.delete_group(group_id)

    async def add_sleeptime_agent(
        self,
        group_id: str,
        spec: Any,
        backfill: bool,
        backfill_window: int | None,
        agent_id: str,
    ) -> Agent:
        """`Runtime.add_sleeptime_agent` with the agent id its client made: a retry of a
        call that went through answers with the agent it added."""
        return await self._rt._blocking(
            self._runtime._add_sleeptime_agent, group_id, spec, backfill, backfill_window, agent_id
        )

    async def remove_sleeptime_agent(self, group_id: str, agent_id: str) -> Agent:
        return await self._rt.remove_sleeptime_agent(group_id, agent_id)

    async def read(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One of the calls any host answers (`READS`), by name."""
        if name not in READS:
            raise ValueError(f"{name!r} is not a read a shard host answers: {sorted(READS)}")
        method: Callable[..., Any] = getattr(self._rt, name)
        return await method(*args, **kwargs)

    # -- work and lifecycle ---------------------------------------------------------------

    async def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """`fn(runtime, *args)` on a thread of this host: a slice of a workload, run where
        its groups live. `runtime` is a `RayRuntime` that serves this host's groups
        directly and routes the others over Ray."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._jobs, functools.partial(fn, self._router, *args))

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop the runtime: every shard handed over cleanly (SPEC 15), then nothing runs.
        The actor stays until it is killed (`RayCluster.remove_host` does both)."""
        self._router.stop()
        await self._rt.stop(drain_timeout)
        self._jobs.shutdown(wait=False, cancel_futures=True)
        log.info("shard_host_stopped", host=self._name)

    def __repr__(self) -> str:  # Ray shows it in its logs and errors
        return f"ShardHost({self._name})"
