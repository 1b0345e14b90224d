"""The AsyncRuntime: the Runtime for services on an asyncio event loop (SPEC 14).

Every call of `Runtime` (SPEC 11), awaited, with the same arguments, results and errors;
the event loop is never blocked and no thread is held per waiting call.

- A turn (`step`, `record_turn`, `stream`) is checked and admitted on the loop, waits for
  its permit on the loop, and is told to its group's actor there when the actor runs;
  its reply reaches the coroutine through `call_soon_threadsafe` (`actors._bridge`).
- Work that must block (the first turn of a group whose actor is not running reads the
  store and starts it; store reads; `create_group`; `stop`) runs on a small executor of
  `blocking_threads` threads that the AsyncRuntime owns.
- Cancelling a coroutine never changes what the runtime does: a turn that was sent (or
  handed to the executor to be sent) is completed and recorded; one still waiting for a
  permit is withdrawn, and its place and permit go to the next caller.

Example:
    >>> async with await AsyncRuntime.start("sqlite:///sleeptime.db") as rt:
    ...     group = await rt.create_group(primary={"kind": "scripted"},
    ...                                   sleeptime=[{"kind": "memory"}], frequency=2)
    ...     result = await rt.step(group.id, [MessageCreate(role="user", content="hi")])
    ...     async for message in rt.stream(group.id, [MessageCreate(role="user", content="hey")]):
    ...         print(message.text())
    ...     runs = await rt.wait_for_runs(result.run_ids, timeout=30)
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

from pydantic import InstanceOf, TypeAdapter

from actors._admission import TurnTicket, permit_wait
from actors._arguments import BLOCKING_THREADS, DRAIN_TIMEOUT, RunWait
from actors._bridge import (
    LoopSink,
    inbox_of,
    resolve_signal,
    wait_all_done,
    wait_done,
    wait_signal,
)
from actors._protocol import TurnMode
from actors.kinds._registry import AgentKinds
from actors.runtime import DEFAULT_URL, Runtime, TurnCall
from messages import (
    Message,
    MessageCreate,
    Run,
    RuntimeBusy,
    RuntimeStopped,
    TurnResult,
    TurnTimeout,
)
from messages._futures import Reply

if TYPE_CHECKING:
    from actors.metrics import RuntimeMetrics

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_BLOCKING_THREADS = 4
"""Threads of an AsyncRuntime's executor: store reads, first touches of groups, stop."""

_RUNTIME: TypeAdapter[Runtime] = TypeAdapter(InstanceOf[Runtime])


def _in_executor(
    method: Callable[Concatenate[Runtime, P], R],
) -> Callable[Concatenate[AsyncRuntime, P], Coroutine[Any, Any, R]]:
    """`Runtime.<method>`, awaited: run on the AsyncRuntime's executor, with the same
    arguments, result and errors (the arguments are passed on as they are)."""

    @functools.wraps(method)
    async def call(self: AsyncRuntime, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._blocking(method, self._runtime, *args, **kwargs)

    call.__doc__ = f"`Runtime.{method.__name__}`, awaited (on the executor).\n\n{method.__doc__}"
    return call


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class AsyncTurnStream(AsyncIterator[Message]):
    """A streamed turn's messages as its primary agent produces them; the turn runs to its
    end whatever the consumer does.

    `async for` it for the messages; `await result()` is the turn's `TurnResult` (or its
    error); `await aclose()` stops listening without stopping the turn. Errors found
    before the turn was sent (GroupNotFound for a group whose actor was not running,
    RuntimeBusy) are raised by the first iteration, `result()` or `sent()`. With a
    `timeout`, each raises TurnTimeout once that many seconds passed since the call.
    """

    def __init__(self, call: TurnCall, sink: LoopSink, sending: asyncio.Future[Future[TurnResult]]):
        self._call = call
        self._sink = sink
        self._sending = sending
        self._ended = False
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        if self._closed or self._ended:
            raise StopAsyncIteration
        queue = self._sink.queue
        if queue.empty():
            try:
                item = await asyncio.wait_for(queue.get(), _remaining(self._call.deadline))
            except TimeoutError:
                raise self._late() from None
        else:
            item = queue.get_nowait()
        if item is None:  # the end: from the group, or because the turn was never sent
            self._ended = True
            await self.result()  # raises the turn's error, if any, to the consumer
            raise StopAsyncIteration
        return item

    async def sent(self) -> None:
        """Wait until the turn is sent to its group (from then on it is recorded whatever
        happens); raises what kept it from being sent."""
        # asyncio.wait, not await: cancelling this caller must not cancel the sending.
        _, pending = await asyncio.wait({self._sending}, timeout=_remaining(self._call.deadline))
        if pending:
            raise self._late()
        self._sending.result()

    async def result(self) -> TurnResult:
        """The whole turn's result, once it has ended (raises the turn's error)."""
        await self.sent()
        reply = self._sending.result()
        if not await wait_done(reply, _remaining(self._call.deadline)):
            raise self._late()
        return reply.result()

    async def aclose(self) -> None:
        """Stop consuming; the turn still completes and is recorded."""
        self._closed = True
        self._sink.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _late(self) -> TurnTimeout:
        assert self._call.timeout is not None
        return TurnTimeout(self._call.group_id, self._call.timeout)


class AsyncRuntime:
    """A running sleeptime runtime, for coroutines: `Runtime`'s calls, awaited.

    Start one with `await AsyncRuntime.start(url, ...)`, or put one over a running
    `Runtime` with `AsyncRuntime.wrap(runtime)` (both faces then drive the same runtime,
    under the same bounds); `async with` it, or `await stop()` at the end. It may be used
    from any event loop, and from several.
    """

    def __init__(self, runtime: Runtime, blocking_threads: int = DEFAULT_BLOCKING_THREADS):
        self._runtime = _RUNTIME.validate_python(runtime)
        self._executor = ThreadPoolExecutor(
            BLOCKING_THREADS.validate_python(blocking_threads),
            thread_name_prefix="sleeptime-async",
        )
        # Streams' sends still to run, by loop, with their tickets: held until done, and
        # withdrawn if their loop closed first (a task that never ran never frees them).
        self._sending: dict[asyncio.AbstractEventLoop, dict[asyncio.Task[Any], TurnTicket]] = {}
        self._sending_lock = threading.Lock()  # (several loops, on several threads)

    @classmethod
    async def start(
        cls,
        url: str = DEFAULT_URL,
        *,
        blocking_threads: int = DEFAULT_BLOCKING_THREADS,
        **options: Any,
    ) -> AsyncRuntime:
        """`Runtime.start(url, **options)` on a thread, then an AsyncRuntime over it.

        The options are `Runtime.start`'s, passed on as they are (`kinds`, `workers`,
        `read_only`, `max_turns_in_flight`, `max_queued_turns`, `permit_timeout`, ...),
        with the same errors. `blocking_threads` is the size of the executor on which
        blocking work runs. A caller cancelled while the runtime starts leaves nothing
        running: the runtime is stopped once it has started.
        """
        threads = BLOCKING_THREADS.validate_python(blocking_threads)
        starting = ThreadPoolExecutor(1, thread_name_prefix="sleeptime-async-start")
        job = starting.submit(functools.partial(Runtime.start, url, **options))
        starting.shutdown(wait=False)
        try:
            await wait_done(job)
        except BaseException:
            job.add_done_callback(_stop_started)
            raise
        return cls(job.result(), threads)

    @classmethod
    def wrap(
        cls, runtime: Runtime, *, blocking_threads: int = DEFAULT_BLOCKING_THREADS
    ) -> AsyncRuntime:
        """An AsyncRuntime over a running `Runtime`, which goes on serving its own callers;
        both share its bounds (`max_turns_in_flight`, `max_queued_turns`). `stop()` on
        either stops the runtime."""
        return cls(runtime, blocking_threads)

    @staticmethod
    async def migrate(url: str) -> tuple[str | None, str]:
        """`Runtime.migrate(url)` on a thread: upgrade the database's schema."""
        return await asyncio.to_thread(Runtime.migrate, url)

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
    def runtime(self) -> Runtime:
        """The synchronous `Runtime` underneath (for code on threads)."""
        return self._runtime

    @property
    def agents(self) -> AgentKinds:
        """The agent kinds of this runtime: `rt.agents.register(name, factory)`."""
        return self._runtime.agents

    @property
    def read_only(self) -> bool:
        return self._runtime.read_only

    @property
    def stopped(self) -> bool:
        return self._runtime.stopped

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """`Runtime.stop`, on a thread: finish queued turns, wait up to `drain_timeout` s
        for open runs, then stop; then the executor's threads leave."""
        drain_timeout = DRAIN_TIMEOUT.validate_python(drain_timeout)
        try:
            job = self._executor.submit(self._runtime.stop, drain_timeout)
        except RuntimeError:
            return  # stopped already
        # Even if this caller is cancelled, the threads leave once the runtime stopped.
        job.add_done_callback(lambda _: self._executor.shutdown(wait=False))
        await wait_done(job)
        job.result()

    def stats(self) -> dict[str, int]:
        """`Runtime.stats()`: counters held in memory, so nothing to await."""
        return self._runtime.stats()

    @property
    def metrics(self) -> RuntimeMetrics | None:
        """`Runtime.metrics`: the runtime's Prometheus metrics, if it has them."""
        return self._runtime.metrics

    # -- turns ----------------------------------------------------------------------------

    async def step(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult:
        """`Runtime.step`, awaited: run the primary agent on `messages` and apply the
        sleeptime rules (SPEC 4-7); the same arguments, result and errors
        (PrimaryAgentError, TurnTimeout, GroupBusy, RuntimeBusy, ...)."""
        return await self._turn(group_id, messages, "step", timeout, request_id)

    async def record_turn(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult:
        """`Runtime.record_turn`, awaited: store one already-produced turn and apply the
        sleeptime rules."""
        return await self._turn(group_id, messages, "record", timeout, request_id)

    def stream(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> AsyncTurnStream:
        """`Runtime.stream`, for `async for`: the output messages as the primary agent
        produces them. Call it on the loop: the turn is on its way at once, whether or
        not the stream is read. Malformed input, a stopped runtime and GroupBusy raise
        here; the rest comes out of the stream (see AsyncTurnStream)."""
        return self._stream(group_id, messages, timeout, request_id)

    async def _turn(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        mode: TurnMode,
        timeout: float | None,
        request_id: str | None,
        new_request: bool = False,
    ) -> TurnResult:
        """A step or a recorded turn; `new_request` as `Runtime._prepare_turn` has it (for
        a Ray shard host, not for users)."""
        call = self._runtime._prepare_turn(
            group_id, messages, mode, timeout, request_id=request_id, new_request=new_request
        )
        return await self._take_turn(call)

    def _stream(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None,
        request_id: str | None,
        new_request: bool = False,
    ) -> AsyncTurnStream:
        loop = asyncio.get_running_loop()
        sink = LoopSink(loop)
        call = self._runtime._prepare_turn(
            group_id,
            messages,
            "stream",
            timeout,
            sink=sink,
            request_id=request_id,
            new_request=new_request,
        )
        self._withdraw_closed()
        ticket = self._runtime._admission.admit(call.group_id)
        if ticket.granted:  # sent at once, as `stream` says, whatever the loop does next
            sending: asyncio.Future[Future[TurnResult]] = loop.create_task(
                self._sent_by(self._send_granted(call, ticket))
            )
        else:  # a permit to wait for, on the loop
            sending = loop.create_task(self._send(call, ticket))
            with self._sending_lock:
                self._sending.setdefault(loop, {})[sending] = ticket
        sending.add_done_callback(functools.partial(self._sent, sink, ticket))
        return AsyncTurnStream(call, sink, sending)

    @staticmethod
    async def _sent_by(sent: Future[Future[TurnResult]]) -> Future[TurnResult]:
        await wait_done(sent)
        return sent.result()

    def _sent(
        self, sink: LoopSink, ticket: TurnTicket, sending: asyncio.Task[Future[TurnResult]]
    ) -> None:
        """A stream's send ended: its end comes with the reply, or now if it failed."""
        with self._sending_lock:
            loop = sending.get_loop()
            sends = self._sending.get(loop, {})
            sends.pop(sending, None)
            if not sends:
                self._sending.pop(loop, None)
        if sending.cancelled() or sending.exception() is not None:  # retrieved: not logged
            ticket.withdraw()  # a task cancelled before it ran holds its place: free it
            sink.end()
        else:
            sending.result().add_done_callback(sink.end)

    def _withdraw_closed(self) -> None:
        """Free the tickets of streams' sends whose loop was closed before they ran (a
        loop stopped in the very iteration a stream was opened, then closed): they will
        never run, and their places and permits would be held for good."""
        if not self._sending:  # (nearly always: no stream waits for a permit)
            return
        with self._sending_lock:
            closed = [self._sending.pop(loop) for loop in list(self._sending) if loop.is_closed()]
        for sends in closed:
            for ticket in sends.values():
                ticket.withdraw()  # (a ticket already sent is not withdrawn)

    async def _take_turn(self, call: TurnCall) -> TurnResult:
        self._withdraw_closed()
        reply = await self._send(call, self._runtime._admission.admit(call.group_id))
        if not await wait_done(reply, _remaining(call.deadline)):
            assert call.timeout is not None
            raise TurnTimeout(call.group_id, call.timeout)  # the turn still ends, recorded
        return reply.result()

    async def _send(self, call: TurnCall, ticket: TurnTicket) -> Future[TurnResult]:
        """Wait for the turn's permit, then send it: on the loop if its group's actor
        runs, else on the executor (it is started from the store there)."""
        if not ticket.granted:
            try:
                await self._permit(call, ticket)
            except BaseException:
                ticket.withdraw()  # cancelled or timed out: its place and permit go on
                raise
        sent = self._send_granted(call, ticket)
        await wait_done(sent)
        return sent.result()

    def _send_granted(self, call: TurnCall, ticket: TurnTicket) -> Future[Future[TurnResult]]:
        """Send a turn that holds its permit, without waiting: told to its group's actor
        now if it runs, else handed to the executor (it is started from the store
        there). Either way the turn is sent whatever happens to the caller, or its loop,
        from now on. The answer is the turn's reply, once sent."""
        runtime = self._runtime
        address = runtime._running_group(call.group_id)
        if address is not None:
            sent: Future[Future[TurnResult]] = Reply()
            try:
                sent.set_result(runtime._send_turn(call, ticket, address))
            except Exception as error:  # (the reply, rejected, ended the ticket)
                sent.set_exception(error)
            return sent
        try:
            job = self._executor.submit(runtime._send_turn, call, ticket)
        except RuntimeError:  # the executor was shut down: the runtime is stopped
            ticket.withdraw()
            stopped: Future[Future[TurnResult]] = Reply()
            stopped.set_exception(RuntimeStopped())
            return stopped
        ticket.send()
        return job

    async def _permit(self, call: TurnCall, ticket: TurnTicket) -> None:
        """Wait on the loop for the ticket's permit; RuntimeBusy past `permit_timeout`."""
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        inbox = inbox_of(loop)

        def tell() -> None:  # in the thread that freed the permit
            if not inbox.post(resolve_signal, granted):
                ticket.withdraw()  # the loop closed: nobody will send it

        ticket.when_granted(tell)
        admission = self._runtime._admission
        waited = permit_wait(admission.permit_timeout, call.deadline)
        if not await wait_signal(granted, waited):
            assert admission.max_in_flight is not None
            raise RuntimeBusy(admission.max_in_flight, waited or 0.0)

    # -- runs -----------------------------------------------------------------------------

    async def wait_for_runs(
        self, run_ids: Sequence[str], timeout: float | None = None
    ) -> list[Run]:
        """`Runtime.wait_for_runs`, awaited: every run terminal, in the order asked;
        RunsTimeout naming the runs still open once `timeout` seconds passed."""
        asked = RunWait(run_ids=run_ids, timeout=timeout)
        ids, timeout = asked.run_ids, asked.timeout
        self._runtime._check()
        if not ids:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        watched = self._runtime._watch_runs(ids)
        if not await wait_done(watched, timeout):  # the store says which are still open
            return await self._blocking(self._runtime._ended_by_now, ids, timeout, ids)
        futures = watched.result()
        if not await wait_all_done(futures, _remaining(deadline)):
            left = [i for i, future in zip(ids, futures, strict=True) if not future.done()]
            return await self._blocking(self._runtime._ended_by_now, ids, timeout, left)
        return await self._blocking(self._runtime._ended, ids, futures)

    get_run = _in_executor(Runtime.get_run)
    list_runs = _in_executor(Runtime.list_runs)
    count_runs = _in_executor(Runtime.count_runs)
    run_events = _in_executor(Runtime.run_events)
    cancel_run = _in_executor(Runtime.cancel_run)

    # -- groups, memory and history -------------------------------------------------------

    create_group = _in_executor(Runtime.create_group)
    get_group = _in_executor(Runtime.get_group)
    list_groups = _in_executor(Runtime.list_groups)
    count_groups = _in_executor(Runtime.count_groups)
    update_group = _in_executor(Runtime.update_group)
    owner_of = _in_executor(Runtime.owner_of)
    get_agent = _in_executor(Runtime.get_agent)
    get_blocks = _in_executor(Runtime.get_blocks)
    list_messages = _in_executor(Runtime.list_messages)
    check_invariants = _in_executor(Runtime.check_invariants)

    # -- memory blocks from the application (issue 19) -----------------------------------

    get_block = _in_executor(Runtime.get_block)
    set_block = _in_executor(Runtime.set_block)
    create_block = _in_executor(Runtime.create_block)
    delete_block = _in_executor(Runtime.delete_block)
    block_history = _in_executor(Runtime.block_history)
    # -- retention (issue 19) -------------------------------------------------------------

    prune = _in_executor(Runtime.prune)
    # -- groups over their life -----------------------------------------------------------

    delete_group = _in_executor(Runtime.delete_group)
    add_sleeptime_agent = _in_executor(Runtime.add_sleeptime_agent)
    remove_sleeptime_agent = _in_executor(Runtime.remove_sleeptime_agent)

    async def _blocking(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run `fn` on the executor and wait for it on the loop. A cancelled caller
        leaves it running to its end (nobody reads its result)."""
        try:
            job = self._executor.submit(fn, *args, **kwargs)
        except RuntimeError:  # shut down: the runtime was stopped through this face
            raise RuntimeStopped() from None
        await wait_done(job)
        return job.result()


def _stop_started(job: Future[Runtime]) -> None:
    """A start whose caller was cancelled: stop what it started."""
    if job.exception() is None:
        job.result().stop(drain_timeout=0)
