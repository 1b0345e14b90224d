"""`Reply` behaves as `concurrent.futures.Future` does, `Flag` as `threading.Event`, and
`wait_all` as `concurrent.futures.wait`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messages._futures import Flag, Reply, reject, resolve, wait_all

WAIT_S = 10.0

OPERATIONS = (
    "cancel",
    "set_running",
    "set_result",
    "set_exception",
    "add_callback",
    "result_now",
    "exception_now",
    "state",
)


def _apply(future: Future[int], operation: str, calls: list[str]) -> object:
    """One operation on `future`, as (what it returned, or the type of what it raised)."""
    try:
        if operation == "cancel":
            return future.cancel()
        if operation == "set_running":
            return future.set_running_or_notify_cancel()
        if operation == "set_result":
            future.set_result(7)
            return None
        if operation == "set_exception":
            future.set_exception(KeyError("k"))
            return None
        if operation == "add_callback":
            future.add_done_callback(lambda f: calls.append(f"done:{f.cancelled()}"))
            return None
        if operation == "result_now":
            return future.result(timeout=0)
        if operation == "exception_now":
            return repr(future.exception(timeout=0))
        return (future.done(), future.cancelled(), future.running())
    except (CancelledError, TimeoutError, InvalidStateError, KeyError, RuntimeError) as error:
        return type(error)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(OPERATIONS), max_size=8))
def test_a_reply_answers_every_sequence_of_calls_as_the_standard_future(
    operations: list[str],
) -> None:
    standard: Future[int] = Future()
    reply: Future[int] = Reply()
    standard_calls: list[str] = []
    reply_calls: list[str] = []
    for operation in operations:
        expected = _apply(standard, operation, standard_calls)
        got = _apply(reply, operation, reply_calls)
        assert got == expected, (operation, operations)
        assert reply_calls == standard_calls, (operation, operations)


def test_every_waiter_wakes_with_the_result() -> None:
    reply: Reply[str] = Reply()
    got: list[str] = []
    lock = threading.Lock()
    started = threading.Barrier(9)

    def wait() -> None:
        started.wait(WAIT_S)
        value = reply.result(timeout=WAIT_S)
        with lock:
            got.append(value)

    waiters = [threading.Thread(target=wait) for _ in range(8)]
    for waiter in waiters:
        waiter.start()
    started.wait(WAIT_S)
    assert resolve(reply, "answer")
    for waiter in waiters:
        waiter.join(WAIT_S)
    assert got == ["answer"] * 8
    assert reply.result(timeout=0) == "answer"  # and the gate stays open for later readers


def test_a_wait_times_out_and_a_cancel_wakes_the_waiter() -> None:
    reply: Reply[int] = Reply()
    with pytest.raises(TimeoutError):
        reply.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        reply.exception(timeout=0)
    woke = threading.Event()

    def wait() -> None:
        with pytest.raises(CancelledError):
            reply.result(timeout=WAIT_S)
        woke.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert reply.cancel()
    assert woke.wait(WAIT_S)
    waiter.join(WAIT_S)
    assert not resolve(reply, 1)  # a caller that gave up: the worker's report is dropped
    assert not reject(reply, ValueError("late"))


def test_an_error_reaches_the_waiter_and_a_failing_callback_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reply: Reply[int] = Reply()
    seen: list[BaseException | None] = []

    def broken(_: Future[int]) -> None:
        raise RuntimeError("callback bug")

    reply.add_done_callback(broken)
    reply.add_done_callback(lambda f: seen.append(f.exception()))
    with caplog.at_level("ERROR", logger="concurrent.futures"):
        assert reject(reply, ValueError("no"))
    assert isinstance(seen[0], ValueError)  # the callback after the broken one still ran
    assert "exception calling callback" in caplog.text
    with pytest.raises(ValueError, match="no"):
        reply.result()


@pytest.mark.parametrize("make", [Future, Reply], ids=["standard", "reply"])
def test_wait_all_returns_the_futures_not_done_in_order(make: Callable[[], Future[int]]) -> None:
    done, late, cancelled = make(), make(), make()
    done.set_result(1)
    cancelled.cancel()
    assert wait_all([done, late, cancelled], timeout=0.01) == [late]
    timer = threading.Timer(0.05, late.set_result, (2,))
    timer.start()
    assert wait_all([done, late, cancelled], timeout=WAIT_S) == []
    timer.join(WAIT_S)
    assert wait_all([], timeout=0) == []


@settings(max_examples=40, deadline=None)
@given(
    order=st.permutations(range(6)),
    repeated=st.lists(st.integers(0, 5), max_size=3),
    standard=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_wait_all_returns_once_the_last_future_is_done_in_any_order(
    order: list[int], repeated: list[int], standard: list[bool]
) -> None:
    """Completed (or cancelled) from another thread in any order while a thread waits, a
    future listed twice included: the wait ends when the last is done, not before."""
    futures: list[Future[int]] = [Future() if s else Reply() for s in standard]
    listed = futures + [futures[i] for i in repeated]
    almost = threading.Event()
    outcome: list[list[Future[int]]] = []
    waiter = threading.Thread(target=lambda: outcome.append(wait_all(listed, timeout=WAIT_S)))
    waiter.start()

    def complete_all_but_the_last() -> None:
        for index in order[:-1]:
            if index % 3 == 0:
                futures[index].cancel()
            else:
                futures[index].set_result(index)
        almost.set()

    worker = threading.Thread(target=complete_all_but_the_last)
    worker.start()
    assert almost.wait(WAIT_S)
    assert waiter.is_alive()  # the last is not done: the wait goes on
    assert wait_all(listed, timeout=0) == [f for f in listed if f is futures[order[-1]]]
    futures[order[-1]].set_result(9)
    waiter.join(WAIT_S)
    worker.join(WAIT_S)
    assert outcome == [[]]


def test_an_event_loop_awaits_a_reply() -> None:
    reply: Reply[int] = Reply()

    async def main() -> int:
        threading.Timer(0.01, reply.set_result, (5,)).start()
        return await asyncio.wait_for(asyncio.wrap_future(reply), WAIT_S)

    assert asyncio.run(main()) == 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(("set", "clear", "is_set", "wait_now")), max_size=10))
def test_a_flag_answers_every_sequence_of_calls_as_the_standard_event(
    operations: list[str],
) -> None:
    standard, flag = threading.Event(), Flag()
    for operation in operations:
        answers: list[bool | None] = []
        for event in (standard, flag):
            if operation == "set":
                event.set()
                answers.append(None)
            elif operation == "clear":
                event.clear()
                answers.append(None)
            elif operation == "is_set":
                answers.append(event.is_set())
            else:
                answers.append(event.wait(0))
        assert answers[0] == answers[1], (operation, operations)


def test_a_flag_wakes_its_waiters_and_times_out_while_down() -> None:
    flag = Flag()
    assert not flag.wait(0.01)
    woke = threading.Barrier(5)

    def wait() -> None:
        assert flag.wait(WAIT_S)
        woke.wait(WAIT_S)

    waiters = [threading.Thread(target=wait) for _ in range(4)]
    for waiter in waiters:
        waiter.start()
    flag.set()
    woke.wait(WAIT_S)  # every waiter woke
    for waiter in waiters:
        waiter.join(WAIT_S)
    flag.clear()
    assert not flag.wait(0)
    threading.Timer(0.02, flag.set).start()
    assert flag.wait(WAIT_S)
