"""OpenTelemetry traces of one runtime (the `tracing` extra).

A runtime traces through the tracer provider the host configured (`trace.
set_tracer_provider(...)` before `Runtime.start`), or the one given as
`Runtime.start(url, tracing=provider)`; with none configured it creates no span at all.

The spans (every attribute name starts with `sleeptime.`: `group_id`, `agent_id`,
`run_id`, `turn`, ...):

- `sleeptime.turn`: one per turn, a child of the caller's current span (a web request's,
  say), with `sleeptime.turn.step` (the primary agent's step, where its model requests
  nest) and `sleeptime.turn.commit` (the turn's transaction) inside;
- `sleeptime.run`: one per sleeptime run, from its creation to its end committed, the root
  of a trace of its own, linked to the turn span that created it; inside it
  `sleeptime.run.queued` (created -> running, once per attempt), `sleeptime.run.step` (the
  sleeptime agent's step) and `sleeptime.run.commit` (its end, until committed);
- `sleeptime.model_request`: one per request to a model server (the `openai` kind), a
  client span inside the step that made it, with the model and the outcome.

Example:
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    >>> trace.set_tracer_provider(provider)
    >>> rt = Runtime.start("sqlite:///sleeptime.db")     # traced from now on
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import Any, Self

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider

from actors._observer import Observer, RequestWatch, TurnWatch, Watch
from messages import Run, RunStatus
from persistence import Transition

TRACER = "sleeptime-runtime"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ROOT = otel_context.Context()  # no parent: a run's span starts a trace of its own


def _version() -> str | None:
    try:
        return version("sleeptime-runtime")
    except PackageNotFoundError:
        return None


def _ns(moment: datetime) -> int:
    """A datetime as OpenTelemetry's nanoseconds since the epoch."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


class _RunSpan:
    """The open span of one run, and since when its current attempt waits to start."""

    __slots__ = ("queued_since", "span")

    def __init__(self, span: Span, queued_since: int) -> None:
        self.span = span
        self.queued_since = queued_since


class RuntimeTracing(Observer):
    """Spans of turns, runs and model requests, from one tracer provider."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer(TRACER, _version())
        self._runs: dict[str, _RunSpan] = {}  # open runs' spans, by run id
        self._lock = threading.Lock()

    # -- turns ----------------------------------------------------------------------------

    def caller_context(self) -> Any:
        return otel_context.get_current()

    def turn(self, group_id: str, agent_id: str, parent: Any) -> TurnWatch:
        return _TurnSpan(self, group_id, agent_id, parent)

    # -- runs -----------------------------------------------------------------------------

    def _created(self, run: Run, turn: Span) -> None:
        span = self._tracer.start_span(
            "sleeptime.run",
            context=_ROOT,
            links=[Link(turn.get_span_context())],
            start_time=_ns(run.created_at),
            attributes=_run_attributes(run),
        )
        self._runs[run.id] = _RunSpan(span, _ns(run.created_at))

    def _run_span(self, run: Run) -> _RunSpan:
        """The run's open span; one without a link for a run this process did not create
        (recovered after a restart, or taken over with its shard)."""
        found = self._runs.get(run.id)
        if found is not None:
            return found
        with self._lock:
            found = self._runs.get(run.id)
            if found is None:
                span = self._tracer.start_span(
                    "sleeptime.run",
                    context=_ROOT,
                    start_time=_ns(run.created_at),
                    attributes={**_run_attributes(run), "sleeptime.run.recovered": True},
                )
                found = self._runs[run.id] = _RunSpan(span, _ns(run.created_at))
        return found

    def run_committed(self, run: Run, change: Transition, started_at: datetime | None) -> None:
        if change.new.terminal:
            found = self._runs.pop(run.id, None)
            if found is None:
                found = self._run_span(run)
                self._runs.pop(run.id, None)
            self._ended(found.span, change)
            return
        found = self._run_span(run)
        if change.new is RunStatus.CREATED:  # re-queued: a new attempt waits from now
            found.queued_since = _ns(change.at)
            found.span.add_event(
                "requeued", {"sleeptime.attempt": change.attempt}, timestamp=_ns(change.at)
            )
            return
        queued = self._tracer.start_span(
            "sleeptime.run.queued",
            context=trace.set_span_in_context(found.span, _ROOT),
            start_time=found.queued_since,
            attributes={"sleeptime.attempt": change.attempt},
        )
        queued.end(end_time=_ns(change.at))

    def _ended(self, span: Span, change: Transition) -> None:
        """The run's end is committed: its commit span (from the end's decision until
        now), then the run's span itself, with how it ended."""
        now = time.time_ns()
        commit = self._tracer.start_span(
            "sleeptime.run.commit",
            context=trace.set_span_in_context(span, _ROOT),
            start_time=min(_ns(change.at), now),
        )
        commit.end(end_time=now)
        span.set_attribute("sleeptime.run.status", change.new.value)
        span.set_attribute("sleeptime.attempt", change.attempt)
        if change.stop_reason is not None:
            span.set_attribute("sleeptime.run.stop_reason", change.stop_reason.value)
        if change.new is RunStatus.FAILED:
            span.set_status(Status(StatusCode.ERROR, change.error))
        span.end(end_time=now)

    def run_step(self, run: Run, attempt: int) -> Watch:
        return _ChildSpan(
            self._tracer,
            "sleeptime.run.step",
            self._run_span(run).span,
            {"sleeptime.attempt": attempt},
            current=True,
        )

    # -- agents ---------------------------------------------------------------------------

    def model_request(
        self, agent_id: str, group_id: str, run_id: str | None, model: str
    ) -> RequestWatch:
        attributes = {
            "sleeptime.agent_id": agent_id,
            "sleeptime.group_id": group_id,
            "gen_ai.request.model": model,
        }
        if run_id is not None:
            attributes["sleeptime.run_id"] = run_id
        return _RequestSpan(self._tracer, attributes)

    def close(self) -> None:
        """Forget the spans of runs still open: they end in the next process."""
        self._runs.clear()


def _run_attributes(run: Run) -> dict[str, Any]:
    return {
        "sleeptime.group_id": run.group_id,
        "sleeptime.agent_id": run.agent_id,
        "sleeptime.run_id": run.id,
        "sleeptime.turn": run.turn,
    }


class _ChildSpan(Watch):
    """A span inside `parent`; with `current`, the current span of this thread meanwhile
    (so what it calls, a model request, nests in it)."""

    __slots__ = ("_attributes", "_current", "_name", "_parent", "_span", "_token", "_tracer")

    def __init__(
        self,
        tracer: trace.Tracer,
        name: str,
        parent: Span,
        attributes: dict[str, Any] | None = None,
        current: bool = False,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._parent = parent
        self._attributes = attributes
        self._current = current
        self._span: Span | None = None
        self._token: object = None

    def __enter__(self) -> Self:
        self._span = self._tracer.start_span(
            self._name,
            context=trace.set_span_in_context(self._parent, _ROOT),
            attributes=self._attributes,
        )
        if self._current:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        if self._span is not None:
            if exc is not None:
                _failed(self._span, exc)
            self._span.end()


class _TurnSpan(TurnWatch):
    """The span of one turn, and the runs it created (their spans link to it)."""

    __slots__ = ("_agent_id", "_failed", "_group_id", "_parent", "_span", "_tracing")

    def __init__(self, tracing: RuntimeTracing, group_id: str, agent_id: str, parent: Any) -> None:
        self._tracing = tracing
        self._group_id = group_id
        self._agent_id = agent_id
        self._parent = parent
        self._span: Span = trace.INVALID_SPAN
        self._failed = False

    def __enter__(self) -> Self:
        self._span = self._tracing._tracer.start_span(
            "sleeptime.turn",
            context=self._parent if self._parent is not None else _ROOT,
            attributes={
                "sleeptime.group_id": self._group_id,
                "sleeptime.agent_id": self._agent_id,
            },
        )
        return self

    def step(self) -> Watch:
        return _ChildSpan(self._tracing._tracer, "sleeptime.turn.step", self._span, current=True)

    def commit(self) -> Watch:
        return _ChildSpan(self._tracing._tracer, "sleeptime.turn.commit", self._span)

    def recorded(
        self, turn: int, fired: bool, runs: Sequence[Run], error: BaseException | None
    ) -> None:
        span = self._span
        span.set_attribute("sleeptime.turn", turn)
        span.set_attribute("sleeptime.fired", fired)
        span.set_attribute("sleeptime.runs", len(runs))
        if error is not None:
            self._failed = True
            _failed(span, error)
        for run in runs:
            self._tracing._created(run, span)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not self._failed:
            _failed(self._span, exc)
        self._span.end()


class _RequestSpan(RequestWatch):
    """The client span of one model request, current while it is made."""

    __slots__ = ("_attributes", "_failed", "_span", "_token", "_tracer")

    def __init__(self, tracer: trace.Tracer, attributes: dict[str, Any]) -> None:
        self._tracer = tracer
        self._attributes = attributes
        self._span: Span = trace.INVALID_SPAN
        self._token: object = None
        self._failed = False

    def __enter__(self) -> Self:
        self._span = self._tracer.start_span(
            "sleeptime.model_request", kind=SpanKind.CLIENT, attributes=self._attributes
        )
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def failed(self, outcome: str, error: BaseException) -> None:
        self._failed = True
        self._span.set_attribute("sleeptime.outcome", outcome)
        _failed(self._span, error)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]
        if exc is not None and not self._failed:
            self._span.set_attribute("sleeptime.outcome", "error")
            _failed(self._span, exc)
        elif not self._failed:
            self._span.set_attribute("sleeptime.outcome", "ok")
        self._span.end()


def _failed(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
