"""The bridge from the runtime's threads to an asyncio event loop, with no thread per waiter.

The runtime answers with `concurrent.futures.Future`s that its actors complete in their own
threads. A coroutine waits for one with `wait_done`: the future's done callback hands the
news to the loop, and the coroutine reads the result from the runtime's future itself. Only
the news crosses, never a cancellation: cancelling the coroutine drops its copy of the news
and nothing else (`asyncio.wrap_future` would cancel the runtime's future, so it is not
used). A loop that has closed meanwhile is not told, and the runtime's side goes on as if
nobody had asked.

The news goes through the loop's `LoopInbox`: one `call_soon_threadsafe` per batch, not
per reply. Each `call_soon_threadsafe` writes a byte to the loop's self-pipe, and the loop
reads them back one `recv` at a time, each giving up the GIL and waiting for it again: with
hundreds of runtime threads, 1,000 callers' replies kept the loop in those reads for up to
150 ms at a time. A batch costs one byte, whatever its size.

A streamed turn's messages reach their coroutine through a `LoopSink`, the same way, into
an `asyncio.Queue`, so nothing polls.

Example:
    >>> if await wait_done(command.reply, timeout=5):
    ...     result = command.reply.result()     # done: this never blocks
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from messages import Message


class LoopInbox:
    """Callbacks that the runtime's threads hand to one event loop, run on it in order.

    `post` from any thread; the loop is woken once (`call_soon_threadsafe`) for whatever
    was posted until it runs them. Get a loop's inbox with `inbox_of(loop)`. It holds its
    loop weakly, so that a finished loop is freed along with its inbox.
    """

    __slots__ = ("_items", "_lock", "_loop", "_waking")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[[Any], object], Any]] = []
        self._waking = False

    def post(self, callback: Callable[[Any], object], argument: Any) -> bool:
        """Run `callback(argument)` on the loop soon. False if the loop is closed (then
        nothing runs: nobody is left to tell)."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return False
        with self._lock:
            self._items.append((callback, argument))
            if self._waking:
                return True  # the wake-up on its way takes this one too
            self._waking = True
        try:
            loop.call_soon_threadsafe(self._run, loop)
        except RuntimeError:  # closed just now
            return False
        return True

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._waking = False
        for callback, argument in items:
            try:
                callback(argument)
            except Exception as error:  # one bad callback must not starve the others
                loop.call_exception_handler(
                    {"message": "a callback from the runtime failed", "exception": error}
                )


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopInbox] = (
    weakref.WeakKeyDictionary()
)
_inboxes_lock = threading.Lock()


def inbox_of(loop: asyncio.AbstractEventLoop) -> LoopInbox:
    """The loop's inbox (one per loop, kept as long as the loop lives)."""
    with _inboxes_lock:
        found = _inboxes.get(loop)
        if found is None:
            found = _inboxes[loop] = LoopInbox(loop)
        return found


def resolve_signal(signal: asyncio.Future[None]) -> None:
    """On the loop: the awaited thing happened (unless its waiter gave up already)."""
    if not signal.done():  # its waiter may have been cancelled, or timed out
        signal.set_result(None)


async def wait_signal(signal: asyncio.Future[None], timeout: float | None) -> bool:
    """Wait for `signal`; False if `timeout` seconds passed first (None: no limit)."""
    try:
        await asyncio.wait_for(signal, timeout)
    except TimeoutError:
        return False  # a signal holds no exception: only the timeout raises this
    return True


async def wait_done(future: Future[Any], timeout: float | None = None) -> bool:
    """Wait on the running loop until the runtime's `future` is done; False if `timeout`
    seconds passed first. Cancelling the waiter leaves `future` alone."""
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    signal: asyncio.Future[None] = loop.create_future()
    inbox = inbox_of(loop)
    future.add_done_callback(lambda _: inbox.post(resolve_signal, signal))
    return await wait_signal(signal, timeout)


async def wait_all_done(futures: Sequence[Future[Any]], timeout: float | None = None) -> bool:
    """`wait_done` for many futures at once: the loop is told once, when the last is done."""
    pending = [future for future in futures if not future.done()]
    if not pending:
        return True
    loop = asyncio.get_running_loop()
    signal: asyncio.Future[None] = loop.create_future()
    inbox = inbox_of(loop)
    lock = threading.Lock()
    left = [len(pending)]

    def one_done(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            inbox.post(resolve_signal, signal)

    for future in pending:
        future.add_done_callback(one_done)
    return await wait_signal(signal, timeout)


class LoopSink:
    """A streamed turn's sink (`MessageSink`) that hands each message to a loop's queue.

    The group calls `put` in its thread; the message is put on `queue` by the loop (through
    its inbox), in order, then `None` at the end. Once `close`d (its consumer left) it drops
    everything. A `put` after the loop closed raises RuntimeError, and the group then drops
    this sink (the turn goes on and is recorded: see `actors.group._Sink`).
    """

    __slots__ = ("_closed", "_inbox", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._inbox = inbox_of(loop)
        self._closed = False
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue()

    def put(self, item: Message | None, /) -> None:
        if not self._closed and not self._inbox.post(self.queue.put_nowait, item):
            raise RuntimeError("the stream's event loop is closed")

    def end(self, _: object = None) -> None:
        """From any thread: the stream is over (its reply is done, or it was never sent)."""
        try:
            self.put(None)
        except RuntimeError:
            pass  # the loop is closed: no consumer is left to tell

    def close(self) -> None:
        """The consumer left: drop what comes (the turn itself goes on)."""
        self._closed = True
