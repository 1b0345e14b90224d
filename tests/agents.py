"""Agents for tests: each records what it saw, and some wait on gates the test controls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from actors import AgentContext, StepResult
from messages import Message, MessageCreate, StopReason


class Recorder:
    """A sleeptime agent that records each transcript and how many steps ran at once."""

    def __init__(
        self,
        gate: threading.Event | None = None,
        fail_on: set[int] | None = None,
        ignore_cancel: bool = False,
    ) -> None:
        self.gate = gate
        self.fail_on = fail_on or set()
        self.ignore_cancel = ignore_cancel
        self.transcripts: list[str] = []
        self.run_ids: list[str | None] = []
        self.started = threading.Semaphore(0)
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def factory(self, config: dict[str, Any]) -> Recorder:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            number = len(self.transcripts)
            self.transcripts.append(messages[0].text())
            self.run_ids.append(context.run_id)
        self.started.release()
        try:
            if self.gate is not None:
                self.gate.wait(30)
            if number in self.fail_on:
                raise RuntimeError(f"step {number} fails on purpose")
            if context.cancelled() and not self.ignore_cancel:
                return [MessageCreate(role="assistant", content="stopped: cancelled")]
            return [MessageCreate(role="assistant", content=f"done {number}")]
        finally:
            with self._lock:
                self.active -= 1

    def wait_started(self, count: int = 1, timeout: float = 10.0) -> None:
        for _ in range(count):
            assert self.started.acquire(timeout=timeout), "the agent did not start in time"


class Echo:
    """A primary agent that answers each input with one assistant message per call."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.replies = int(config.get("replies", 1))

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        said = messages[-1].text() if messages else ""
        return [
            MessageCreate(role="assistant", content=f"echo {i}: {said}")
            for i in range(self.replies)
        ]


class Silent:
    """A primary agent that produces nothing."""

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        return []


class Streamer:
    """A primary agent that streams `count` messages, then fails if told to."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.count = int(config.get("count", 3))
        self.fail = bool(config.get("fail", False))

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        return list(self.stream(context, messages))

    def stream(self, context: AgentContext, messages: Sequence[Message]) -> Iterator[MessageCreate]:
        for i in range(self.count):
            yield MessageCreate(role="assistant", content=f"part {i}")
        if self.fail:
            raise RuntimeError("the primary agent broke mid-stream")


class Gated:
    """A primary agent that answers once its gate opens; every agent of the kind shares it.

    Its stream yields `part 0`, waits for the gate, then yields `part 1` and `part 2`.
    `entered` is released each time a turn reaches the agent. The gate starts open.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)

    def factory(self, config: dict[str, Any]) -> Gated:
        return self

    def step(self, context: AgentContext, messages: Sequence[Message]) -> list[MessageCreate]:
        self.entered.release()
        assert self.gate.wait(30), "the test never opened the gate"
        return [MessageCreate(role="assistant", content=f"answer to {messages[-1].text()}")]

    def stream(self, context: AgentContext, messages: Sequence[Message]) -> Iterator[MessageCreate]:
        yield MessageCreate(role="assistant", content="part 0")
        self.entered.release()
        assert self.gate.wait(30), "the test never opened the gate"
        yield MessageCreate(role="assistant", content="part 1")
        yield MessageCreate(role="assistant", content="part 2")

    def wait_entered(self, count: int = 1, timeout: float = 10.0) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=timeout), "no turn reached the agent in time"


class StepLimited:
    """A sleeptime agent that always reaches its step limit."""

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def step(self, context: AgentContext, messages: Sequence[Message]) -> StepResult:
        return StepResult(
            messages=[MessageCreate(role="assistant", content="more to do")],
            stop_reason=StopReason.MAX_STEPS,
        )


def user(text: str) -> MessageCreate:
    return MessageCreate(role="user", content=text)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, every: float = 0.01) -> bool:
    """Whether `condition()` came true within `timeout` seconds (looked at `every` s)."""
    pause = threading.Event()  # never set: its wait is the pause between looks
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        pause.wait(every)
    return True
