"""The bridge from the runtime's threads to an event loop (actors/_bridge.py), without a
runtime: a cancelled waiter cancels nothing of the runtime's, a closed loop is not told, a
batch of news wakes the loop once, and a finished loop is freed."""

from __future__ import annotations

import asyncio
import gc
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from actors import _bridge
from actors._bridge import LoopSink, inbox_of, wait_all_done, wait_done


def test_a_cancelled_waiter_leaves_the_runtimes_future_alone() -> None:
    future: Future[int] = Future()

    async def main() -> None:
        waiter = asyncio.ensure_future(wait_done(future))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
    assert not future.cancelled() and not future.done()
    future.set_result(7)  # the runtime completes it later, as if nobody had asked
    assert future.result() == 7


def test_waits_end_with_the_futures_or_their_timeout() -> None:
    futures: list[Future[None]] = [Future() for _ in range(3)]

    async def main() -> tuple[bool, bool, bool]:
        late = await wait_all_done(futures, timeout=0.05)
        for future in futures:
            threading.Thread(target=future.set_result, args=(None,)).start()
        done = await wait_all_done(futures, timeout=10)
        return late, done, await wait_done(futures[0], timeout=0)

    assert asyncio.run(main()) == (False, True, True)


def test_a_closed_loop_is_not_told_and_a_sink_on_it_raises() -> None:
    loop = asyncio.new_event_loop()
    inbox = inbox_of(loop)
    sink = LoopSink(loop)
    loop.close()
    assert inbox.post(print, "never") is False
    with pytest.raises(RuntimeError):
        sink.put(None)  # so that the group drops this consumer
    sink.end()  # the end of a stream nobody reads any more: quiet


def test_a_batch_of_news_wakes_the_loop_once(monkeypatch: pytest.MonkeyPatch) -> None:
    woken: list[Any] = []
    seen: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wake = loop.call_soon_threadsafe

        def counted(*arguments: Any) -> Any:
            woken.append(arguments)
            return wake(*arguments)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
        inbox = inbox_of(loop)
        done = loop.create_future()

        def post() -> None:
            for n in range(100):
                inbox.post(seen.append, n)
            inbox.post(lambda _: done.set_result(None), None)

        poster = threading.Thread(target=post)
        poster.start()  # the loop cannot run meanwhile: it is in this callback
        poster.join()
        await done

    asyncio.run(main())
    assert seen == list(range(100))  # in order
    assert len(woken) == 1


def test_a_finished_loop_is_freed_with_its_inbox() -> None:
    async def main() -> None:
        future: Future[None] = Future()
        threading.Timer(0.01, future.set_result, (None,)).start()
        assert await wait_done(future, timeout=10)

    gc.collect()
    before = len(_bridge._inboxes)
    for _ in range(5):
        asyncio.run(main())
    gc.collect()
    assert len(_bridge._inboxes) <= before
