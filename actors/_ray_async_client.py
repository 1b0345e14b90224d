"""AsyncRayRuntime: the AsyncRuntime's calls (SPEC 14) on a Ray cluster of shard hosts.

The same routing and retries as `RayRuntime` (whose state it shares: the shards'
owners, the hosts, the kinds), awaited. A turn, a stream and `wait_for_runs` await
Ray's object references on the loop, so a waiting call holds no thread and the loop is
never blocked by them; the other calls (reads, `create_group`, `update_group`,
`cancel_run`, `owner_of`) run the synchronous client's call on a small executor, as
`AsyncRuntime` runs its store reads. Cancelling a caller never changes what the host
does: a turn that was sent is completed and recorded.

Example:
    >>> rt = AsyncRayRuntime.connect("sleeptime")
    >>> result = await rt.step(group_id, [MessageCreate(role="user", content="hi")])
    >>> async for message in rt.stream(group_id, [MessageCreate(role="user", content="hey")]):
    ...     print(message.text())
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

from ray.exceptions import RayActorError

from actors._arguments import RunWait
from actors._ray_client import (
    DEFAULT_RETRY_S,
    MAX_REDIRECTS,
    RESULT_GRACE_S,
    RayAgentKinds,
    RayRuntime,
    _TurnCall,
)
from actors._ray_routes import (
    DEFAULT_NAMESPACE,
    Backoff,
    HostGone,
    Recourse,
    parse_address,
    recourse,
    unwrap,
)
from actors.async_runtime import DEFAULT_BLOCKING_THREADS
from messages import (
    GroupOwner,
    Message,
    MessageCreate,
    NotOwner,
    Run,
    RunNotFound,
    RunsTimeout,
    RuntimeStopped,
    TurnResult,
    TurnTimeout,
)

if TYPE_CHECKING:
    from actors.metrics import RuntimeMetrics

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _in_executor(
    method: Callable[Concatenate[RayRuntime, P], R],
) -> Callable[Concatenate[AsyncRayRuntime, P], Awaitable[R]]:
    """`RayRuntime.<method>`, awaited: run on the AsyncRayRuntime's executor."""

    @functools.wraps(method)
    async def call(self: AsyncRayRuntime, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._blocking(method, self._client, *args, **kwargs)

    call.__doc__ = f"`RayRuntime.{method.__name__}`, awaited (on the executor).\n\n{method.__doc__}"
    return call


class AsyncRayTurnStream(AsyncIterator[Message]):
    """A streamed turn on a cluster, for `async for` (see `AsyncTurnStream`): the turn is
    sent at once; `sent()`, `result()` and `aclose()` as there. If the host dies
    mid-stream the turn is sent again with its request id, and the messages already
    yielded are not yielded again."""

    def __init__(self, client: AsyncRayRuntime, call: _TurnCall) -> None:
        self._client = client
        self._call = call
        self._backoff = client._client._backoff(call.deadline)
        self._seen: set[str] = set()
        self._remote: Any = None
        self._result: TurnResult | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._closed = False
        self._sending = asyncio.get_running_loop().create_task(self._open())
        client._sending.add(self._sending)
        self._sending.add_done_callback(client._sending.discard)

    async def _open(self) -> None:
        call, client = self._call, self._client

        async def attempt(target: str) -> None:
            handle = await client._handle(target)
            generator = handle.stream.remote(
                call.group_id, call.messages, call.remaining(), *call.remote_id()
            )
            await client._get(await generator.__anext__())  # StreamSent, or why not sent
            self._remote = generator

        await client._routed(call.group_id, attempt, self._backoff)

    async def sent(self) -> None:
        """Wait until the turn is sent to its group's host; raises what kept it from it."""
        # asyncio.wait, not await: cancelling this caller must not cancel the sending.
        await asyncio.wait({self._sending})
        self._sending.result()

    async def _advance(self) -> Message | None:
        await self.sent()
        while not self._ended:
            try:
                ref = await self._remote.__anext__()
                item: Message | TurnResult = await self._client._get(ref)
            except StopAsyncIteration:
                raise RuntimeError("a shard host's stream ended without its result") from None
            except BaseException as raised:
                error = unwrap(raised)
                if recourse(error) is Recourse.GIVE_UP or not await self._retry(error):
                    self._ended, self._error = True, error
                    raise error from None
                continue
            if isinstance(item, TurnResult):
                self._ended, self._result = True, item
                return None
            if item.id not in self._seen:
                self._seen.add(item.id)
                return item
        return None

    async def _retry(self, error: BaseException) -> bool:
        routes = self._client._client._routes
        if isinstance(error, NotOwner) and parse_address(error.address) is not None:
            routes.learn(self._call.group_id, str(error.address))
        else:
            routes.forget(self._call.group_id)
            pause = self._backoff.next_pause()
            if pause is None:
                return False
            await asyncio.sleep(pause)
        await self._open()
        return True

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        if self._closed or self._ended:
            raise StopAsyncIteration
        message = await self._advance()
        if message is None:
            raise StopAsyncIteration
        return message

    async def result(self) -> TurnResult:
        """The whole turn's result, once it has ended (raises the turn's error)."""
        while not self._ended:
            await self._advance()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    async def aclose(self) -> None:
        """Stop consuming; the turn still completes and is recorded."""
        self._closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncRayRuntime:
    """`AsyncRuntime`'s calls on a Ray cluster of shard hosts, routed as `RayRuntime`
    routes them. Make one with `AsyncRayRuntime.connect(namespace)`, `.wrap(client)` or
    `RayCluster.async_client()`; `stop()` stops the client, not the hosts."""

    def __init__(
        self, client: RayRuntime, blocking_threads: int = DEFAULT_BLOCKING_THREADS
    ) -> None:
        self._client = client
        self._executor = ThreadPoolExecutor(blocking_threads, thread_name_prefix="sleeptime-ray")
        self._sending: set[asyncio.Task[Any]] = set()  # streams' sends, held until done

    @classmethod
    def connect(
        cls,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        retry_timeout: float = DEFAULT_RETRY_S,
        blocking_threads: int = DEFAULT_BLOCKING_THREADS,
    ) -> AsyncRayRuntime:
        """A client of the shard hosts running in `namespace` (HostGone if none)."""
        return cls(RayRuntime.connect(namespace, retry_timeout=retry_timeout), blocking_threads)

    @classmethod
    def wrap(
        cls, client: RayRuntime, *, blocking_threads: int = DEFAULT_BLOCKING_THREADS
    ) -> AsyncRayRuntime:
        """An AsyncRayRuntime sharing a `RayRuntime`'s routes and hosts."""
        return cls(client, blocking_threads)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def runtime(self) -> RayRuntime:
        """The synchronous `RayRuntime` underneath (for code on threads)."""
        return self._client

    @property
    def agents(self) -> RayAgentKinds:
        return self._client.agents

    @property
    def read_only(self) -> bool:
        return False

    @property
    def stopped(self) -> bool:
        return self._client.stopped

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop the client (the hosts go on serving)."""
        self._client.stop(drain_timeout)
        self._executor.shutdown(wait=False)

    def stats(self) -> dict[str, int]:
        """Every host's `stats()`, added up (a short blocking call to each host)."""
        return self._client.stats()

    @property
    def metrics(self) -> RuntimeMetrics | None:
        """`RayRuntime.metrics`: None unless this client has a runtime of its own."""
        return self._client.metrics

    # -- calling hosts --------------------------------------------------------------------

    async def _blocking(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            job = self._executor.submit(fn, *args, **kwargs)
        except RuntimeError:  # shut down: this client was stopped
            raise RuntimeStopped() from None
        return await asyncio.wrap_future(job)

    async def _handle(self, address: str) -> Any:
        directory = self._client._directory
        found = directory.cached(address)
        return found if found is not None else await self._blocking(directory.handle, address)

    @staticmethod
    async def _get(ref: Any, timeout: float | None = None) -> Any:
        try:
            if timeout is None:
                return await ref
            return await asyncio.wait_for(ref, timeout)
        except BaseException as error:
            raise unwrap(error) from None

    async def _target(self, group_id: str) -> str:
        known = self._client._routes.owner(group_id)
        if known is not None:
            return known
        owner: GroupOwner = await self._blocking(self._client.owner_of, group_id)
        if owner.address is None or parse_address(owner.address) is None:
            raise NotOwner(group_id, owner.shard, owner.owner, owner.address)
        self._client._routes.learn(group_id, owner.address)
        return owner.address

    async def _routed(
        self, group_id: str, attempt: Callable[[str], Awaitable[T]], backoff: Backoff
    ) -> T:
        """`RayRuntime._routed`, awaited."""
        routes, directory = self._client._routes, self._client._directory
        redirects = 0
        while True:
            target: str | None = None
            try:
                target = await self._target(group_id)
                return await attempt(target)
            except BaseException as raised:
                error = unwrap(raised)
                move = recourse(error)
                if move is Recourse.GIVE_UP:
                    raise error from None
                if move is Recourse.GO_TO_OWNER and redirects < MAX_REDIRECTS:
                    assert isinstance(error, NotOwner) and error.address is not None
                    redirects += 1
                    routes.learn(group_id, error.address)
                    continue
                routes.forget(group_id)
                if target is not None and isinstance(error, RayActorError | HostGone):
                    await self._blocking(directory.failed, target)
                pause = backoff.next_pause()
                if pause is None:
                    raise error from None
                redirects = 0
                await asyncio.sleep(pause)

    # -- turns ----------------------------------------------------------------------------

    async def _turn(self, call: _TurnCall) -> TurnResult:
        async def attempt(target: str) -> TurnResult:
            remaining = call.remaining()
            handle = await self._handle(target)
            ref = getattr(handle, call.mode).remote(
                call.group_id, call.messages, remaining, *call.remote_id()
            )
            wait = None if remaining is None else remaining + RESULT_GRACE_S
            try:
                result: TurnResult = await self._get(ref, wait)
            except TimeoutError as late:
                if isinstance(late, TurnTimeout):
                    raise
                assert call.timeout is not None
                raise TurnTimeout(call.group_id, call.timeout) from None
            return result

        return await self._routed(call.group_id, attempt, self._client._backoff(call.deadline))

    async def step(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult:
        """`RayRuntime.step`, awaited (no thread is held while it waits)."""
        call = self._client._prepare("step", group_id, messages, timeout, request_id)
        return await self._turn(call)

    async def record_turn(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult:
        """`RayRuntime.record_turn`, awaited."""
        call = self._client._prepare("record_turn", group_id, messages, timeout, request_id)
        return await self._turn(call)

    def stream(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> AsyncRayTurnStream:
        """`RayRuntime.stream`, for `async for`; call it on the loop: the turn is on its
        way at once. Malformed input and a stopped client raise here; the rest comes out
        of the stream (see AsyncRayTurnStream)."""
        call = self._client._prepare("stream", group_id, messages, timeout, request_id)
        return AsyncRayTurnStream(self, call)

    # -- runs -----------------------------------------------------------------------------

    async def wait_for_runs(
        self, run_ids: Sequence[str], timeout: float | None = None
    ) -> list[Run]:
        """`RayRuntime.wait_for_runs`, awaited: each owner asked for its own runs at once."""
        asked = RunWait(run_ids=run_ids, timeout=timeout)
        ids, timeout = asked.run_ids, asked.timeout
        self._client._check()
        if not ids:
            return []
        backoff = self._client._backoff(None if timeout is None else time.monotonic() + timeout)
        wanted = list(dict.fromkeys(ids))
        stored = await self._blocking(self._client._stored_runs, wanted)
        for run_id in wanted:
            if run_id not in stored:
                raise RunNotFound(run_id)
        done = {i: run for i, run in stored.items() if run.status.terminal}
        still_open: list[str] = []
        waiting = [i for i in wanted if i not in done]
        while waiting:
            ended, failed, timed_out = await self._wait_at_owners(waiting, stored, backoff, timeout)
            done.update(ended)
            still_open += timed_out
            waiting = failed
            if waiting:
                pause = backoff.next_pause()
                if pause is None:
                    still_open += waiting
                    break
                await asyncio.sleep(pause)
        if still_open:
            order = {run_id: n for n, run_id in enumerate(ids)}
            raise RunsTimeout(sorted(set(still_open), key=order.__getitem__), timeout or 0.0)
        return [done[i] for i in ids]

    async def _wait_at_owners(
        self,
        run_ids: list[str],
        stored: dict[str, Run],
        backoff: Backoff,
        timeout: float | None,
    ) -> tuple[dict[str, Run], list[str], list[str]]:
        by_target: dict[str, list[str]] = {}
        failed: list[str] = []
        for run_id in run_ids:
            try:
                target = await self._target(stored[run_id].group_id)
            except BaseException as raised:
                error = unwrap(raised)
                if recourse(error) is Recourse.GIVE_UP:
                    raise error from None
                failed.append(run_id)
                continue
            by_target.setdefault(target, []).append(run_id)
        left = None if timeout is None else backoff.remaining()

        async def wait_at(target: str) -> list[Run]:
            handle = await self._handle(target)
            runs: list[Run] = await self._get(handle.wait_for_runs.remote(by_target[target], left))
            return runs

        targets = list(by_target)
        outcomes = await asyncio.gather(*(wait_at(t) for t in targets), return_exceptions=True)
        ended: dict[str, Run] = {}
        timed_out: list[str] = []
        for target, outcome in zip(targets, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                ended.update((run.id, run) for run in outcome)
                continue
            error = unwrap(outcome)
            if isinstance(error, RunsTimeout):
                timed_out.extend(error.open_run_ids)
                continue
            if recourse(error) is Recourse.GIVE_UP:
                raise error
            for run_id in by_target[target]:
                self._client._routes.forget(stored[run_id].group_id)
            if isinstance(error, RayActorError | HostGone):
                await self._blocking(self._client._directory.failed, target)
            failed.extend(by_target[target])
        return ended, failed, timed_out

    get_run = _in_executor(RayRuntime.get_run)
    list_runs = _in_executor(RayRuntime.list_runs)
    count_runs = _in_executor(RayRuntime.count_runs)
    run_events = _in_executor(RayRuntime.run_events)
    cancel_run = _in_executor(RayRuntime.cancel_run)

    # -- groups, memory and history -------------------------------------------------------

    create_group = _in_executor(RayRuntime.create_group)
    get_group = _in_executor(RayRuntime.get_group)
    list_groups = _in_executor(RayRuntime.list_groups)
    count_groups = _in_executor(RayRuntime.count_groups)
    update_group = _in_executor(RayRuntime.update_group)
    owner_of = _in_executor(RayRuntime.owner_of)
    get_agent = _in_executor(RayRuntime.get_agent)
    get_blocks = _in_executor(RayRuntime.get_blocks)
    list_messages = _in_executor(RayRuntime.list_messages)
    check_invariants = _in_executor(RayRuntime.check_invariants)

    # -- memory blocks from the application (issue 19) -----------------------------------

    get_block = _in_executor(RayRuntime.get_block)
    set_block = _in_executor(RayRuntime.set_block)
    create_block = _in_executor(RayRuntime.create_block)
    delete_block = _in_executor(RayRuntime.delete_block)
    block_history = _in_executor(RayRuntime.block_history)
    prune = _in_executor(RayRuntime.prune)
    delete_group = _in_executor(RayRuntime.delete_group)
    add_sleeptime_agent = _in_executor(RayRuntime.add_sleeptime_agent)
    remove_sleeptime_agent = _in_executor(RayRuntime.remove_sleeptime_agent)
    hosts = _in_executor(RayRuntime.hosts)
