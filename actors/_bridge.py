"""The bridge from the runtime's threads to an asyncio event loop, with no thread per waiter.

The runtime answers with `concurrent.futures.Future`s that its actors complete in their own
threads. A coroutine waits for one with `wait_done`: the future's done callback tells the
loop with `call_soon_threadsafe`, and the coroutine reads the result from the runtime's
future itself. Only the news crosses, never a cancellation: cancelling the coroutine drops
its copy of the news and nothing else (`asyncio.wrap_future` would cancel the runtime's
future, so it is not used). A loop that has closed meanwhile is not told: the callback
sees the `RuntimeError` and lets it go, and the runtime's side goes on as if nobody had
asked.

A streamed turn's messages reach their coroutine through a `LoopSink`, the same way: each
`put` is one `call_soon_threadsafe` into an `asyncio.Queue`, so nothing polls.

Example:
    >>> if await wait_done(command.reply, timeout=5):
    ...     result = command.reply.result()     # done: this never blocks
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from messages import Message


def tell_loop(loop: asyncio.AbstractEventLoop, signal: asyncio.Future[None]) -> bool:
    """From any thread: resolve `signal` on its loop. False if the loop is closed."""
    try:
        loop.call_soon_threadsafe(_resolve, signal)
    except RuntimeError:
        return False  # the loop is closed: nobody waits on it any more
    return True


def _resolve(signal: asyncio.Future[None]) -> None:
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
    future.add_done_callback(lambda _: tell_loop(loop, signal))
    return await wait_signal(signal, timeout)


async def wait_all_done(futures: Sequence[Future[Any]], timeout: float | None = None) -> bool:
    """`wait_done` for many futures at once: the loop is told once, when the last is done."""
    pending = [future for future in futures if not future.done()]
    if not pending:
        return True
    loop = asyncio.get_running_loop()
    signal: asyncio.Future[None] = loop.create_future()
    lock = threading.Lock()
    left = [len(pending)]

    def one_done(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            tell_loop(loop, signal)

    for future in pending:
        future.add_done_callback(one_done)
    return await wait_signal(signal, timeout)


class LoopSink:
    """A streamed turn's sink (`MessageSink`) that hands each message to a loop's queue.

    The group calls `put` in its thread; the message is put on `queue` by the loop, in
    order, then `None` at the end. Once `close`d (its consumer left) it drops everything.
    A `put` after the loop closed raises, and the group then drops this sink (the turn
    goes on and is recorded: see `actors.group._Sink`).
    """

    __slots__ = ("_closed", "_loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._closed = False
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue()

    def put(self, item: Message | None, /) -> None:
        if not self._closed:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def end(self, _: object = None) -> None:
        """From any thread: the stream is over (its reply is done, or it was never sent)."""
        try:
            self.put(None)
        except RuntimeError:
            pass  # the loop is closed: no consumer is left to tell

    def close(self) -> None:
        """The consumer left: drop what comes (the turn itself goes on)."""
        self._closed = True
