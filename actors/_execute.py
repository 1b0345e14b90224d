"""One sleeptime run, start to end, as it executes on a pool thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pydantic

from actors._observer import NO_OBSERVER, Observer
from actors._protocol import StartDecision, StepDone
from actors._transcript import render_transcript
from actors.sdk import (
    COMPLETED_STOP_REASONS,
    FAILED_STOP_REASONS,
    AgentBehaviour,
    AgentContext,
    Memory,
    StepFailed,
    StepResult,
    checked_stop_reason,
)
from messages import (
    AgentConfigError,
    Group,
    Message,
    MessageCreate,
    Run,
    StopReason,
    StoreUnavailable,
    TextContent,
    UnknownAgentKind,
)
from messages._errors import describe, text_of
from messages._ids import new_id
from persistence import Store, utcnow


def stamp(
    create: MessageCreate,
    *,
    agent_id: str,
    group_id: str,
    sequence: int,
    turn: int | None = None,
    run_id: str | None = None,
) -> Message:
    """Give a message its id and place in one agent's history."""
    # Not model_construct: pydantic's compiled validation of these few fields is faster
    # than its Python-level construct (5.4 against 6.6 us a message, pydantic 2.13).
    return Message(
        id=new_id("message"),
        agent_id=agent_id,
        group_id=group_id,
        sequence=sequence,
        role=create.role,
        content=create.parts(),
        name=create.name,
        tool_calls=create.tool_calls,
        tool_call_id=create.tool_call_id,
        turn=turn,
        run_id=run_id,
        created_at=utcnow(),
    )


def as_output(
    output: Sequence[MessageCreate | Mapping[str, Any]] | StepResult,
) -> tuple[list[MessageCreate], StopReason]:
    """An agent's return value as messages and a stop reason (dicts are validated)."""
    if isinstance(output, StepResult):
        # (Validated already, unless built with model_construct.)
        what = "a completed step (StepResult)"
        return list(output.messages), checked_stop_reason(
            output.stop_reason, COMPLETED_STOP_REASONS, what
        )
    if isinstance(output, (str, bytes)) or not isinstance(output, Sequence):
        raise TypeError(
            f"an agent's step must return a list of messages, not {type(output).__name__}"
        )
    return [
        m if isinstance(m, MessageCreate) else MessageCreate.model_validate(m) for m in output
    ], StopReason.END_TURN


@dataclass(slots=True)
class Built:
    """The agent a step built on its pool thread (or why it could not), for the agent's
    actor to keep for its next runs; `generation` is the registrations of its kind the
    actor had seen when it handed the step over."""

    generation: int
    behaviour: AgentBehaviour | None = None
    error: str | None = None


def build_agent(build: Callable[[], AgentBehaviour]) -> tuple[AgentBehaviour | None, str | None]:
    """The agent `build` makes, or why it could not (its factory is user code)."""
    try:
        return build(), None
    except (AgentConfigError, UnknownAgentKind, pydantic.ValidationError) as error:
        return None, str(error)
    except BaseException as error:  # the registry wraps the factory's own; a wrapper's
        return None, describe(error)


def execute_run(
    *,
    begin: Callable[[], Group],
    run: Run,
    token: int,
    decided: Future[StartDecision],
    behaviour: AgentBehaviour | None,
    store: Store,
    abandoned: threading.Event,
    window: list[Message] | None = None,
    build_error: str | None = None,
    build: Callable[[], AgentBehaviour] | None = None,
    built: Built | None = None,
    observer: Observer = NO_OBSERVER,
) -> StepDone:
    """Ask for the run's start (`begin`: the start request `token`, and the step's
    deadline from now; it returns the group's settings the run is made with), wait for
    the tracker's decision and for the start's commit, then build the transcript of the
    run's window, step the agent, and report the outcome.

    Never raises: whatever goes wrong, even a `SystemExit` from the agent's code, ends up
    as the run's error text. A run that does not start (refused, put off, its start not
    recorded) is reported with `started` False; so is one whose agent gave up on it
    (`abandoned`: its deadline passed) before it began. `behaviour` None: the agent could
    not be built (`build_error`), the run fails once started; with `build`, the agent is
    built here first (once the start is committed; its time counts in the run's), and
    what it made is left in `built`. `observer` watches the step.
    """
    # The decision comes once the start is committed. The agent gives the request up at
    # its deadline (and sets `abandoned`); this wait, longer, only frees the thread if the
    # tracker never answers.
    try:
        group = begin()
        decision = decided.result(2 * group.run_timeout + 1)
    except TimeoutError:
        return _not_started(run, run.attempt, token, "the start was not decided in time")
    if not decision.started:
        return _not_started(
            run, run.attempt, token, decision.reason or "not started", retry=decision.retry
        )
    attempt = decision.attempt
    assert decision.committed is not None and decision.cancel is not None
    cancel = decision.cancel
    try:
        decision.committed.result()  # the run is durably `running` before any of its work
        if abandoned.is_set():
            return _not_started(run, attempt, token, "given up at its deadline")
        if window is None:
            window = store.window(group.primary_agent_id, run.window_first_seq, run.window_last_seq)
    except StoreUnavailable as error:
        # An outage of the store is not the agent's failure: the run is queued again.
        return _not_started(
            run, attempt, token, f"the store was unavailable at the start: {error}", aborted=True
        )
    except Exception as error:
        return _failed_before_step(run, attempt, token, f"could not record the start: {error}")
    if behaviour is None and build is not None:
        behaviour, build_error = build_agent(build)
        if built is not None:
            built.behaviour, built.error = behaviour, build_error
    if behaviour is None:
        return _failed_before_step(run, attempt, token, build_error or "agent could not be built")
    messages: list[Message] = []
    try:
        text = render_transcript(window, group.preamble, group.transcript_max_messages)
        transcript = stamp(
            MessageCreate(role="user", content=[TextContent(text=text)]),
            agent_id=run.agent_id,
            group_id=group.id,
            sequence=1,  # provisional: the writer numbers a run's messages as it appends them
            run_id=run.id,
        )
        messages.append(transcript)
        memory = Memory(lambda: store.get_blocks(run.agent_id), store, cancel.is_set, run_id=run.id)
        context = AgentContext(
            agent_id=run.agent_id,
            group_id=group.id,
            run_id=run.id,
            memory=memory,
            history=lambda: store.list_messages(run.agent_id),
            cancel_event=cancel,
            recent_history=lambda limit: store.recent_messages(run.agent_id, limit),
            observer=observer,
        )
        try:
            with observer.run_step(run, attempt):
                try:
                    produced, stop_reason = as_output(behaviour.step(context, [transcript]))
                finally:
                    memory.close()
        except StepFailed as failure:
            messages.extend(_stamp_all(failure.messages, run, group.id))
            try:  # (checked as it was raised, unless changed since)
                reason = checked_stop_reason(failure.stop_reason, FAILED_STOP_REASONS, "")
            except ValueError:
                reason = StopReason.ERROR
            return _ended(run, attempt, token, messages, reason, text_of(failure))
        messages.extend(_stamp_all(produced, run, group.id))
    except BaseException as error:  # agent code: even SystemExit fails only this run
        error_text = describe(error)
        return _ended(run, attempt, token, messages, StopReason.ERROR, error_text)
    return _ended(run, attempt, token, messages, stop_reason)


def _ended(
    run: Run,
    attempt: int,
    token: int,
    messages: list[Message],
    stop_reason: StopReason,
    error: str | None = None,
) -> StepDone:
    """How a started attempt ended: what its agent said, and why it stopped."""
    return StepDone(
        run_id=run.id,
        attempt=attempt,
        messages=messages,
        stop_reason=stop_reason,
        error=error,
        token=token,
    )


def _failed_before_step(run: Run, attempt: int, token: int, error: str) -> StepDone:
    """The run started but its agent never stepped: it fails with `error`."""
    return _ended(run, attempt, token, [], StopReason.ERROR, error)


def _not_started(
    run: Run, attempt: int, token: int, error: str, *, retry: bool = True, aborted: bool = False
) -> StepDone:
    return StepDone(
        run_id=run.id,
        attempt=attempt,
        messages=[],
        stop_reason=StopReason.ERROR,
        error=error,
        started=False,
        token=token,
        retry=retry,
        aborted=aborted,
    )


def _stamp_all(produced: Sequence[MessageCreate], run: Run, group_id: str) -> list[Message]:
    """The agent's output, after the transcript message (numbered for now 2, 3, ...)."""
    return [
        stamp(m, agent_id=run.agent_id, group_id=group_id, sequence=i, run_id=run.id)
        for i, m in enumerate(produced, start=2)
    ]
