"""The asyncio API (SPEC 14): Runtime's calls, awaited, never blocking the loop or the runtime.

Each test drives its loops with `asyncio.run` (no pytest plugin) and runs on both backends.
Tests wait on futures and events with timeouts; a counter of the runtime is waited for with
`wait_until`, in a thread, so the loop goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from actors import (
    AgentNotFound,
    AgentRoleError,
    AsyncRuntime,
    DatabaseInUse,
    GroupBusy,
    GroupNotFound,
    PrimaryAgentError,
    ReadOnlyRuntime,
    RunNotFound,
    RunsTimeout,
    Runtime,
    RuntimeBusy,
    RuntimeStopped,
    TransitionRefused,
    TurnTimeout,
    UnknownAgentKind,
)
from actors.async_runtime import DEFAULT_BLOCKING_THREADS
from messages import Message, RunStatus, TurnResult
from persistence._engine import make_engines
from tests.agents import Gated, Recorder, Streamer, user, wait_until

T = TypeVar("T")
SIMULATED = {"kind": "simulated", "config": {"latency_ms": 0}}
GATED = {"kind": "gated"}
TEST_LIMIT_S = 60.0


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a test's coroutine on a new event loop; a hang fails it instead of the suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, TEST_LIMIT_S)

    return asyncio.run(bounded())


@contextmanager
def started(db_url: str, **options: Any) -> Iterator[tuple[AsyncRuntime, Gated]]:
    """An AsyncRuntime over a new Runtime (with `options`) that knows the `gated` kind."""
    gated = Gated()
    runtime = Runtime.start(db_url, kinds={"gated": gated.factory}, **options)
    art = AsyncRuntime.wrap(runtime)
    try:
        yield art, gated
    finally:
        gated.gate.set()
        run(art.stop(drain_timeout=5))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait in a thread until `condition()` holds, the loop running meanwhile."""
    assert await asyncio.to_thread(wait_until, condition, timeout), "it never happened"


async def new_groups(
    art: AsyncRuntime, count: int, primary: dict[str, Any] = GATED, frequency: int = 0
) -> list[str]:
    """`count` groups whose actors run (one turn each, one after the other, so a tight
    bound on turns in flight never makes one wait), so a turn is told on the loop."""
    ids = []
    for _ in range(count):
        group = await art.create_group(primary=primary, sleeptime=[SIMULATED], frequency=frequency)
        await art.step(group.id, [user("warm up")])
        ids.append(group.id)
    return ids


def test_a_thousand_concurrent_steps_all_get_their_results(db_url: str) -> None:
    with started(db_url) as (art, _):

        async def main() -> None:
            ids = [
                (await art.create_group(primary=SIMULATED, sleeptime=[SIMULATED], frequency=10)).id
                for _ in range(20)
            ]
            threads_before = peak = threading.active_count()
            pending: set[asyncio.Task[TurnResult]] = {
                asyncio.ensure_future(art.step(ids[n % 20], [user(f"turn {n}")]))
                for n in range(1000)
            }
            tasks = set(pending)
            while pending:  # the process's threads, looked at while the callers wait
                _, pending = await asyncio.wait(pending, timeout=0.01)
                peak = max(peak, threading.active_count())
            results = [task.result() for task in tasks]

            for group_id in ids:
                turns = sorted(r.turn for r in results if r.group_id == group_id)
                assert turns == list(range(1, 51))
            assert all(r.messages and r.messages[0].role == "assistant" for r in results)
            run_ids = [run_id for r in results for run_id in r.run_ids]
            assert len(run_ids) == 20 * 5  # turns 1, 11, 21, 31, 41 fire
            runs = await art.wait_for_runs(run_ids, timeout=30)
            assert [r.id for r in runs] == run_ids
            assert all(r.status is RunStatus.COMPLETED for r in runs)
            # No thread per waiting call: only the groups' and agents' actors started
            # meanwhile, and the executor's threads.
            assert peak <= threads_before + 2 * 20 + DEFAULT_BLOCKING_THREADS + 8, peak
            stats = art.stats()
            assert (stats["restarts"], stats["turns_in_flight"], stats["turns_waiting"]) == (
                0,
                0,
                0,
            )

        run(main())


def test_a_turn_that_waits_never_blocks_the_loop(db_url: str) -> None:
    with started(db_url) as (art, gated):

        async def main() -> None:
            slow, fast = await new_groups(art, 2)
            gated.gate.clear()
            waiting = asyncio.ensure_future(art.step(slow, [user("wait")]))
            cold = asyncio.ensure_future(  # a new group's first turn starts its actor
                art.create_group(primary={"kind": "scripted"}, sleeptime=[SIMULATED])
            )
            await until(lambda: gated.entered.acquire(blocking=False))
            # The loop goes on while the turn waits in its agent: other calls are served.
            group = await cold
            assert (await art.step(group.id, [user("hello")])).turn == 1
            assert (await art.get_group(slow)).turns == 1
            assert not waiting.done()
            gated.gate.set()
            assert (await waiting).turn == 2
            assert (await art.step(fast, [user("then")])).turn == 2

        run(main())


def test_cancelled_callers_leave_their_turns_recorded_and_no_actor_restarted(db_url: str) -> None:
    with started(db_url) as (art, gated):

        async def main() -> None:
            ids = await new_groups(art, 5)
            gated.gate.clear()
            callers = [
                asyncio.ensure_future(art.step(group_id, [user(f"turn {n}")]))
                for n in range(10)
                for group_id in ids
            ]
            await until(lambda: art.stats()["turns_in_flight"] == 50)
            for caller in callers:
                caller.cancel()
            outcomes = await asyncio.gather(*callers, return_exceptions=True)
            assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
            assert art.stats()["turns_in_flight"] == 50  # the turns go on without callers
            gated.gate.set()
            # Turns of a group are serialized: each next turn comes after the cancelled ones.
            after = await asyncio.gather(*(art.step(g, [user("after")]) for g in ids))
            assert [r.turn for r in after] == [12] * 5
            for group_id in ids:
                group = await art.get_group(group_id)
                history = await art.list_messages(group.primary_agent_id)
                said = [m.text() for m in history if m.role == "user"]
                assert said == ["warm up", *(f"turn {n}" for n in range(10)), "after"]
            stats = art.stats()
            assert (stats["restarts"], stats["turns_in_flight"]) == (0, 0)

        run(main())


def test_a_stream_abandoned_with_aclose_leaves_its_turn_stored(db_url: str) -> None:
    with started(db_url) as (art, gated):

        async def main() -> None:
            (group_id,) = await new_groups(art, 1)
            gated.gate.clear()
            stream = art.stream(group_id, [user("tell me")])
            first = await anext(stream)
            assert first.text() == "part 0"
            await stream.aclose()
            assert [m async for m in stream] == []  # closed: nothing more, nothing waits
            gated.gate.set()
            assert (await stream.result()).turn == 2  # the turn ended, and recorded
            assert (await art.step(group_id, [user("next")])).turn == 3
            group = await art.get_group(group_id)
            history = [m.text() for m in await art.list_messages(group.primary_agent_id)]
            assert history[2:6] == ["tell me", "part 0", "part 1", "part 2"]
            assert art.stats()["restarts"] == 0

        run(main())


def test_a_loop_closed_mid_turn_leaves_the_turn_stored_and_the_runtime_healthy(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with started(db_url) as (art, gated):
        ids = run(new_groups(art, 2))
        streamed, stepped = ids
        gated.gate.clear()

        async def leave_mid_stream() -> Message:
            stream = art.stream(streamed, [user("stream")])
            return await anext(stream)  # then the loop closes, the stream still open

        async def leave_mid_step() -> None:
            left = asyncio.ensure_future(art.step(stepped, [user("step")]))
            await asyncio.to_thread(gated.wait_entered)
            assert not left.done()  # cancelled when the loop closes

        assert run(leave_mid_stream()).text() == "part 0"
        run(leave_mid_step())
        gated.gate.set()  # the rest of the stream and both replies meet closed loops

        async def after() -> None:
            turns = await asyncio.gather(*(art.step(g, [user("after")]) for g in ids))
            assert [t.turn for t in turns] == [3, 3]
            group = await art.get_group(streamed)
            history = [m.text() for m in await art.list_messages(group.primary_agent_id)]
            assert history[2:6] == ["stream", "part 0", "part 1", "part 2"]
            assert art.stats()["restarts"] == 0

        run(after())
    # A reply's news for a closed loop is dropped quietly, not raised in a future's callback.
    assert not [r for r in caplog.records if r.name == "concurrent.futures"]


def test_a_sink_that_raises_never_turns_a_recorded_turn_into_an_error(db_url: str) -> None:
    """For both APIs: the asyncio one meets a closed loop (above); a thread's sink may
    raise too, and the group drops it instead of failing the turn."""

    class Broken:
        def put(self, item: Message | None, /) -> None:
            raise RuntimeError("Event loop is closed")

    with started(db_url) as (art, _):
        rt = art.runtime
        (group_id,) = run(new_groups(art, 1))
        call = rt._prepare_turn(group_id, [user("stream")], "stream", None, sink=Broken())
        reply, _ = rt._submit_turn(call)
        result = reply.result(timeout=10)
        assert [m.text() for m in result.messages] == ["part 0", "part 1", "part 2"]
        assert rt.get_group(group_id).turns == 2
        assert rt.step(group_id, [user("next")]).turn == 3


def test_permits_are_never_leaked_by_cancellation(db_url: str) -> None:
    with started(db_url, max_turns_in_flight=2, permit_timeout=30) as (art, gated):

        async def main() -> list[str]:
            first, second, third = await new_groups(art, 3)
            gated.gate.clear()
            holding = [asyncio.ensure_future(art.step(g, [user("hold")])) for g in (first, second)]
            await until(lambda: art.stats()["turns_in_flight"] == 2)
            waiting = [asyncio.ensure_future(art.step(third, [user(f"w{n}")])) for n in range(10)]
            await until(lambda: art.stats()["turns_waiting"] == 10)
            impatient = [
                asyncio.ensure_future(art.step(third, [user("short")], timeout=0.2))
                for _ in range(3)
            ]
            for caller in impatient:  # their own timeout ends the wait for a permit
                with pytest.raises(RuntimeBusy):
                    await caller
            for caller in waiting[:4]:
                caller.cancel()
            await until(lambda: art.stats()["turns_waiting"] == 6)
            gated.gate.set()
            await asyncio.gather(*holding, *waiting[4:])
            assert all(caller.cancelled() for caller in waiting[:4])
            stats = art.stats()
            assert (stats["turns_in_flight"], stats["turns_waiting"]) == (0, 0)
            assert (await art.get_group(third)).turns == 1 + 6  # never sent: never recorded

            # Callers cancelled at any moment, waiting or granted or sent, leak nothing.
            chance = random.Random(16)
            callers = [
                asyncio.ensure_future(art.step((first, second, third)[n % 3], [user("x")]))
                for n in range(150)
            ]
            for caller in callers:
                if chance.random() < 0.4:
                    for _ in range(chance.randrange(4)):
                        await asyncio.sleep(0)  # let the others move a little
                    caller.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
            await until(lambda: art.stats()["turns_in_flight"] == 0)
            assert art.stats()["turns_waiting"] == 0
            assert all(art.runtime._admission.queued(g) == 0 for g in (first, second, third))
            return [first, second, third]

        async def leave_while_waiting() -> None:
            gated.gate.clear()
            left = [
                asyncio.ensure_future(art.step(group_id, [user(text)]))
                for group_id, text in [(first, "hold"), (second, "hold"), (third, "waits")]
            ]
            await until(lambda: art.stats()["turns_waiting"] == 1)
            assert not any(caller.done() for caller in left)  # cancelled when the loop closes

        first, second, third = run(main())
        run(leave_while_waiting())
        assert art.stats()["turns_waiting"] == 0
        gated.gate.set()
        assert wait_until(lambda: art.stats()["turns_in_flight"] == 0)


def test_group_busy_beyond_the_per_group_bound_in_both_apis(db_url: str) -> None:
    gated = Gated()

    async def main() -> None:
        async with await AsyncRuntime.start(
            db_url, kinds={"gated": gated.factory}, max_queued_turns=2
        ) as art:
            busy, other = await new_groups(art, 2)
            gated.gate.clear()
            queued = [asyncio.ensure_future(art.step(busy, [user(f"q{n}")])) for n in range(2)]
            await until(lambda: art.stats()["turns_in_flight"] == 2)
            with pytest.raises(GroupBusy) as refused:
                await art.step(busy, [user("one too many")])
            assert (refused.value.group_id, refused.value.limit) == (busy, 2)
            with pytest.raises(GroupBusy):
                await art.record_turn(busy, [user("q"), {"role": "assistant", "content": "a"}])
            with pytest.raises(GroupBusy):
                art.stream(busy, [user("one too many")])
            with pytest.raises(GroupBusy):
                await asyncio.to_thread(art.runtime.step, busy, [user("one too many")])
            other_turn = asyncio.ensure_future(art.step(other, [user("elsewhere")]))
            await until(lambda: art.stats()["turns_in_flight"] == 3)  # other groups go on
            gated.gate.set()
            assert [r.turn for r in await asyncio.gather(*queued)] == [2, 3]
            assert (await other_turn).turn == 2
            assert (await art.step(busy, [user("room again")])).turn == 4

    run(main())


def test_runtime_busy_past_the_permit_timeout_in_both_apis(db_url: str) -> None:
    with started(db_url, max_turns_in_flight=1, permit_timeout=0.2) as (art, gated):

        async def main() -> None:
            holder, other = await new_groups(art, 2)
            gated.gate.clear()
            holding = asyncio.ensure_future(art.step(holder, [user("hold")]))
            await until(lambda: art.stats()["turns_in_flight"] == 1)
            with pytest.raises(RuntimeBusy) as refused:
                await art.step(other, [user("no permit")])
            assert refused.value.limit == 1
            stream = art.stream(other, [user("no permit")])
            with pytest.raises(RuntimeBusy):
                await anext(stream)
            with pytest.raises(RuntimeBusy):
                await asyncio.to_thread(art.runtime.step, other, [user("no permit")])
            assert art.stats()["turns_waiting"] == 0
            gated.gate.set()
            assert (await holding).turn == 2
            assert (await art.get_group(other)).turns == 1  # nothing sent, nothing stored
            assert (await art.step(other, [user("a permit")])).turn == 2

        run(main())


def test_every_error_arrives_as_the_same_type_through_both_apis(db_url: str) -> None:
    release = threading.Event()
    recorder = Recorder(gate=release)
    with started(db_url) as (art, gated):
        rt = art.runtime
        rt.agents.register("recorder", recorder.factory)
        rt.agents.register("streamer", Streamer)
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "recorder"}], frequency=1
        )
        slow = rt.create_group(primary=GATED, sleeptime=[SIMULATED], frequency=0)
        failing = rt.create_group(
            primary={"kind": "streamer", "config": {"fail": True}}, sleeptime=[SIMULATED]
        )
        running = rt.step(group.id, [user("one")]).run_ids[0]
        recorder.wait_started()  # the first run waits in its agent; the next ones queue
        refused = [rt.step(group.id, [user(f"then {n}")]).run_ids[0] for n in range(2)]
        writer, reader = make_engines(db_url)  # behind the runtime's back, a refused cancel
        with writer.begin() as connection:
            connection.execute(
                text("UPDATE runs SET status = 'completed' WHERE id IN (:a, :b)"),
                {"a": refused[0], "b": refused[1]},
            )
        writer.dispose()
        reader.dispose()
        gated.gate.clear()
        scripted, memory = {"kind": "scripted"}, [{"kind": "memory"}]

        async def streamed(group_id: str) -> list[Message]:
            return [message async for message in art.stream(group_id, [user("go")])]

        cases: list[
            tuple[type[BaseException], Callable[[], Any], Callable[[], Coroutine[Any, Any, Any]]]
        ]
        cases = [
            (
                GroupNotFound,
                lambda: rt.step("group-unknown", [user("x")]),
                lambda: art.step("group-unknown", [user("x")]),
            ),
            (
                GroupNotFound,
                lambda: list(rt.stream("group-unknown", [user("x")])),
                lambda: streamed("group-unknown"),
            ),
            (
                GroupNotFound,
                lambda: rt.get_group("group-unknown"),
                lambda: art.get_group("group-unknown"),
            ),
            (RunNotFound, lambda: rt.get_run("run-unknown"), lambda: art.get_run("run-unknown")),
            (AgentNotFound, lambda: rt.get_blocks("agent-x"), lambda: art.get_blocks("agent-x")),
            (ValidationError, lambda: rt.step(group.id, []), lambda: art.step(group.id, [])),
            (
                ValidationError,
                lambda: rt.record_turn(group.id, [{"role": "wizard", "content": "x"}]),
                lambda: art.record_turn(group.id, [{"role": "wizard", "content": "x"}]),
            ),
            (
                ValidationError,
                lambda: rt.step(group.id, [user("x")], timeout=-1),
                lambda: art.step(group.id, [user("x")], timeout=-1),
            ),
            (
                ValidationError,
                lambda: rt.create_group(primary=scripted, sleeptime=memory, frequency=-1),
                lambda: art.create_group(primary=scripted, sleeptime=memory, frequency=-1),
            ),
            (
                ValidationError,
                lambda: rt.list_runs(statuses=["asleep"]),
                lambda: art.list_runs(statuses=["asleep"]),
            ),
            (
                ValidationError,
                lambda: rt.wait_for_runs([running], timeout=-1),
                lambda: art.wait_for_runs([running], timeout=-1),
            ),
            (
                UnknownAgentKind,
                lambda: rt.create_group(primary={"kind": "nobody"}, sleeptime=memory),
                lambda: art.create_group(primary={"kind": "nobody"}, sleeptime=memory),
            ),
            (
                AgentRoleError,
                lambda: rt.create_group(primary={"kind": "memory"}, sleeptime=memory),
                lambda: art.create_group(primary={"kind": "memory"}, sleeptime=memory),
            ),
            (
                RunsTimeout,
                lambda: rt.wait_for_runs([running], timeout=0.05),
                lambda: art.wait_for_runs([running], timeout=0.05),
            ),
            (
                TurnTimeout,
                lambda: rt.step(slow.id, [user("slow")], timeout=0.05),
                lambda: art.step(slow.id, [user("slow")], timeout=0.05),
            ),
            (
                PrimaryAgentError,
                lambda: rt.step(failing.id, [user("x")]),
                lambda: art.step(failing.id, [user("x")]),
            ),
            (
                PrimaryAgentError,
                lambda: list(rt.stream(failing.id, [user("x")])),
                lambda: streamed(failing.id),
            ),
            (
                TransitionRefused,
                lambda: rt.cancel_run(refused[0]),
                lambda: art.cancel_run(refused[1]),
            ),
            (
                TypeError,  # an argument Runtime does not take
                lambda: rt.step(group.id, [user("x")], colour="red"),  # type: ignore[call-arg]
                lambda: art.step(group.id, [user("x")], colour="red"),  # type: ignore[call-arg]
            ),
        ]
        if db_url.startswith("sqlite"):  # on PostgreSQL a second process shares the shards
            cases.append(
                (DatabaseInUse, lambda: Runtime.start(db_url), lambda: AsyncRuntime.start(db_url))
            )
        for expected, sync_call, async_call in cases:
            with pytest.raises(expected) as sync_error:
                sync_call()
            with pytest.raises(expected) as async_error:
                run(async_call())
            assert type(async_error.value) is type(sync_error.value)
            if isinstance(sync_error.value, PrimaryAgentError):
                assert isinstance(async_error.value, PrimaryAgentError)
                assert isinstance(async_error.value.result, TurnResult)  # the recorded turn

        read_only = AsyncRuntime.wrap(Runtime.start(db_url, read_only=True))
        with pytest.raises(ReadOnlyRuntime):
            read_only.runtime.step(group.id, [user("x")])
        with pytest.raises(ReadOnlyRuntime):
            run(read_only.step(group.id, [user("x")]))
        run(read_only.stop())
        gated.gate.set()
        release.set()

    with pytest.raises(RuntimeStopped):  # `started` stopped it
        art.runtime.step(group.id, [user("x")])
    stopped_calls: list[Callable[[], Coroutine[Any, Any, Any]]] = [
        lambda: art.step(group.id, [user("x")]),
        lambda: streamed(group.id),
        lambda: art.get_group(group.id),
        lambda: art.wait_for_runs([running]),
    ]
    for stopped_call in stopped_calls:
        with pytest.raises(RuntimeStopped):
            run(stopped_call())
    run(art.stop())  # stopping again changes nothing


def test_start_checks_its_own_options_and_passes_the_rest_on(db_url: str) -> None:
    with pytest.raises(ValidationError):
        run(AsyncRuntime.start(db_url, blocking_threads=0))
    with pytest.raises(ValidationError):
        run(AsyncRuntime.start(db_url, max_queued_turns=0))
    with pytest.raises(TypeError):
        run(AsyncRuntime.start(db_url, no_such_option=1))

    async def main() -> None:
        async with await AsyncRuntime.start(db_url, max_turns_in_flight=7) as art:
            assert art.runtime._admission.max_in_flight == 7
            assert "gated" not in art.agents
            art.agents.register("gated", Gated().factory)
            assert "gated" in art.runtime.agents
            assert not art.stopped and not art.read_only
        assert art.stopped

    run(main())


def test_a_start_whose_caller_was_cancelled_leaves_nothing_running(db_url: str) -> None:
    async def cancelled() -> None:
        starting = asyncio.ensure_future(AsyncRuntime.start(db_url))
        await asyncio.sleep(0)  # it begins: the runtime starts on its thread
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

    def database_free() -> bool:
        try:
            Runtime.start(db_url).stop()
        except DatabaseInUse:
            return False
        return True

    run(cancelled())
    assert wait_until(database_free, timeout=30, every=0.1)  # stopped once it had started


def test_the_asyncio_api_has_every_public_call_of_the_runtime() -> None:
    """SPEC 14: AsyncRuntime mirrors Runtime call for call, SPEC 15's `owner_of` included."""
    public = {name for name in dir(Runtime) if not name.startswith("_")}
    missing = sorted(name for name in public if not hasattr(AsyncRuntime, name))
    assert missing == []


@pytest.mark.parametrize("name", ["step", "record_turn", "stream"])
def test_the_asyncio_turn_calls_take_exactly_the_arguments_of_the_synchronous_ones(
    name: str,
) -> None:
    """Same names, kinds and defaults: what only a Ray shard host may pass (`new_request`,
    a stream's sink) is not reachable through either public API."""
    sync = inspect.signature(getattr(Runtime, name)).parameters
    asynchronous = inspect.signature(getattr(AsyncRuntime, name)).parameters
    assert [(p.name, p.kind, p.default) for p in asynchronous.values()] == [
        (p.name, p.kind, p.default) for p in sync.values()
    ]
    assert "new_request" not in asynchronous and "sink" not in asynchronous


LOOP_CLOSED_WARNINGS = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)
"""What asyncio says of a task on a loop closed before it ran: the user's doing."""


def _stream_on_a_loop_closed_at_once(art: AsyncRuntime, group_id: str, text: str) -> None:
    """Open a stream and stop the loop in the same iteration, then close the loop (a loop
    stopped by a signal handler, or a run_until_complete ending then): the stream's
    send may never get to run on it."""
    loop = asyncio.new_event_loop()

    async def handler() -> None:
        art.stream(group_id, [user(text)])
        loop.stop()

    task = loop.create_task(handler())
    loop.run_forever()
    loop.close()
    assert task.done()


@LOOP_CLOSED_WARNINGS
def test_a_stream_whose_loop_closed_at_once_is_still_sent_and_frees_its_place(
    db_url: str,
) -> None:
    """SPEC 14: a stream sends its turn at once; one left on a closed loop still
    completes and is recorded. Before, its send waited for a task the closed loop never
    ran: nothing was recorded, and its permit and place in its group were held for good
    (the group then refused every turn with GroupBusy)."""
    with Runtime.start(db_url, max_turns_in_flight=16, max_queued_turns=8) as rt:
        art = AsyncRuntime.wrap(rt)
        cold = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        warm = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        rt.step(warm.id, [user("hello")])  # its actor runs: told on the loop's own thread
        for n in range(3):
            _stream_on_a_loop_closed_at_once(art, cold.id, f"cold {n}")
            _stream_on_a_loop_closed_at_once(art, warm.id, f"warm {n}")
        assert wait_until(
            lambda: rt.get_group(cold.id).turns == 3 and rt.get_group(warm.id).turns == 4
        )
        assert wait_until(lambda: rt.stats()["turns_in_flight"] == 0)
        assert rt.step(cold.id, [user("and again")]).turn == 4


@LOOP_CLOSED_WARNINGS
def test_a_stream_waiting_for_a_permit_on_a_loop_closed_at_once_frees_its_place(
    db_url: str,
) -> None:
    """A stream with no permit yet waits for one on its loop; if that loop closes before
    it ran, its place and its turn's waiting are given up by the next call."""
    gated = Gated()
    with Runtime.start(db_url, max_turns_in_flight=1, max_queued_turns=1) as rt:
        art = AsyncRuntime.wrap(rt)
        rt.agents.register("gated", gated.factory)
        holder = rt.create_group(primary={"kind": "gated"}, sleeptime=[{"kind": "memory"}])
        other = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        gated.gate.clear()
        thread = threading.Thread(target=lambda: rt.step(holder.id, [user("hold")]), daemon=True)
        thread.start()
        gated.wait_entered()
        _stream_on_a_loop_closed_at_once(art, other.id, "never sent")
        assert rt.stats()["turns_waiting"] == 1
        gated.gate.set()
        thread.join(30)
        result = asyncio.run(art.step(other.id, [user("after")], timeout=30))
        assert result.turn == 1  # its place was free again; the closed loop's turn was not sent
        assert rt.stats()["turns_waiting"] == 0 and rt.stats()["turns_in_flight"] == 0
