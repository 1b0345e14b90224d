"""OpenTelemetry traces of one runtime (the `tracing` extra).

A runtime traces through the tracer provider the host configured
(`trace.set_tracer_provider(...)` before `Runtime.start`), or the one given as
`Runtime.start(url, tracing=provider)`; with none configured it creates no span at all.

The spans (every attribute name starts with `sleeptime.`: `group_id`, `agent_id`,
`run_id`, `turn`, ...):

- `sleeptime.turn`: one per turn, a child of the caller's current span (a web request's,
  say); the primary agent's step and the turn's commit are inside it, their durations
  `sleeptime.step_ms` and `sleeptime.commit_ms`, and the spans of the primary agent's
  model requests are its children;
- `sleeptime.run`: one per sleeptime run, from its creation to its end committed, in the
  trace of the turn that created it (a child of the turn's span, so the sampler keeps or
  drops a turn with its runs) and linked to that span; inside it the time queued
  (`sleeptime.queued_ms`, created -> running), the sleeptime agent's step
  (`sleeptime.step_ms`, its model requests' spans as children) and the commit of its end
  (`sleeptime.commit_ms`); a re-queue is an event (`requeued`). A run this process did
  not create (recovered after a restart) starts a trace of its own, and so does a backfill
  run (`sleeptime.backfill`); a run followed no more before it ended (its group deleted,
  its shard moved) ends its span then, its `sleeptime.run.status` saying why;
- `sleeptime.model_request`: one per request to a model server (the `openai` kind), a
  client span, with the model and the outcome.

The phases of a turn and of a run are durations on their span, not spans of their own: a
span costs some 15-20 us of CPU in the Python SDK, and five more per turn cost a runtime
of zero-latency agents a good part of its throughput (`bench/observability.py`). With the
SDK's provider and its batch or simple processors, the spans are recorded straight into
the processors (`_span_recorder`: some 3 us a span instead of 20); with any other
provider or processor, through the SDK's tracer. A turn the sampler leaves out costs one
unrecorded span, its runs nothing more.

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

from actors._observer import NO_WATCH, Observer, RequestWatch, TurnWatch, Watch
from actors._span_recorder import DirectTracer, direct_tracer
from messages import Run, RunStatus
from messages._errors import describe
from persistence import Transition

TRACER = "sleeptime-runtime"
GATHER_S = 0.05
"""How long the ends of runs gather before their spans are ended together."""
CLOSE_TIMEOUT_S = 10.0
"""How long stopping waits for the spans of ended runs to be ended."""
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
    """The open span of one run, and the times of its current attempt's phases."""

    __slots__ = ("queued_ms", "queued_since", "recording", "span", "step_ms")

    def __init__(self, span: Span, queued_since: datetime) -> None:
        self.span = span
        self.recording = span.is_recording()  # False: left out by the sampler
        self.queued_since = queued_since
        self.queued_ms: float | None = None
        self.step_ms: float | None = None


class RuntimeTracing(Observer):
    """Spans of turns, runs and model requests, from one tracer provider."""

    def __init__(self, provider: TracerProvider) -> None:
        # Straight into the SDK's processors where that is the same (`_span_recorder`).
        self._tracer: trace.Tracer | DirectTracer = direct_tracer(
            provider, TRACER, _version()
        ) or provider.get_tracer(TRACER, _version())
        self._runs: dict[str, _RunSpan] = {}  # open runs' spans, by run id
        self._lock = threading.Lock()
        # A run's end is told on the database writer's thread, which every turn and run
        # change waits for: its span is ended on a thread of its own (see `_end_runs`).
        self._ending: list[tuple[Run, Transition, int]] = []
        self._ended_some = threading.Event()  # set when `_ending` gets its first item
        self._closing = threading.Event()
        self._ender = threading.Thread(target=self._end_runs, name="sleeptime-tracing", daemon=True)
        self._ender.start()

    # -- turns ----------------------------------------------------------------------------

    def caller_context(self) -> Any:
        return otel_context.get_current()

    def turn(self, group_id: str, agent_id: str, parent: Any) -> TurnWatch:
        return _TurnSpan(self, group_id, agent_id, parent)

    # -- runs -----------------------------------------------------------------------------

    def _created(self, run: Run, turn: Span) -> None:
        """The turn `turn` created `run`: its span starts, a child of the turn's (so it is
        sampled with it) and linked to it."""
        if not turn.is_recording():  # the sampler left the turn out: its runs too, for free
            left_out = trace.NonRecordingSpan(turn.get_span_context())
            self._runs[run.id] = _RunSpan(left_out, run.created_at)
            return
        span = self._tracer.start_span(
            "sleeptime.run",
            context=trace.set_span_in_context(turn, _ROOT),
            links=[Link(turn.get_span_context())],
            start_time=_ns(run.created_at),
            attributes=_run_attributes(run),
        )
        self._runs[run.id] = _RunSpan(span, run.created_at)

    def runs_backfilled(self, runs: Sequence[Run]) -> None:
        """Runs an agent joining with backfill got: each starts a trace of its own (no turn
        made them), marked as backfill."""
        for run in runs:
            span = self._tracer.start_span(
                "sleeptime.run",
                context=_ROOT,
                start_time=_ns(run.created_at),
                attributes={**_run_attributes(run), "sleeptime.backfill": True},
            )
            self._runs[run.id] = _RunSpan(span, run.created_at)

    def runs_forgotten(self, run_ids: Sequence[str], why: str) -> None:
        """End the spans of runs followed no more (their group deleted, their shard moved):
        with that as their end, not left open for ever."""
        now = time.time_ns()
        for run_id in run_ids:
            found = self._runs.pop(run_id, None)
            if found is not None and found.recording:
                found.span.set_attribute("sleeptime.run.status", why)
                found.span.end(end_time=now)

    def _run_span(self, run: Run) -> _RunSpan:
        """The run's open span; one without a link for a run this process did not create
        (recovered after a restart, or taken over with its shard)."""
        found = self._runs.get(run.id)
        if found is not None:
            return found
        with self._lock:
            found = self._runs.get(run.id)
            if found is None:
                attributes = {**_run_attributes(run), "sleeptime.recovered": True}
                span = self._tracer.start_span(
                    "sleeptime.run",
                    context=_ROOT,
                    start_time=_ns(run.created_at),
                    attributes=attributes,
                )
                found = self._runs[run.id] = _RunSpan(span, run.created_at)
        return found

    def run_committed(self, run: Run, change: Transition, started_at: datetime | None) -> None:
        found = self._run_span(run)
        if not found.recording:  # nothing to record, nothing to end
            if change.new.terminal:
                self._runs.pop(run.id, None)
        elif change.new is RunStatus.RUNNING:
            found.queued_ms = _ms(found.queued_since, change.at)
        elif change.new is RunStatus.CREATED:  # re-queued: a new attempt waits from now
            found.queued_since = change.at
            found.span.add_event(
                "requeued", {"sleeptime.attempt": change.attempt}, timestamp=_ns(change.at)
            )
        else:
            with self._lock:
                self._ending.append((run, change, time.time_ns()))
                first = len(self._ending) == 1
            if first:
                self._ended_some.set()

    def _end_runs(self) -> None:
        """End the spans of runs whose end was committed, in the order told, until
        `close` (ending a span with its attributes costs some 20 us of CPU).

        It gathers ends for `GATHER_S` after the first before ending them all: a thread
        woken per run costs a busy runtime more than the span itself (each end carries
        its own time, so the spans are exact all the same)."""
        while True:
            self._ended_some.wait()
            closing = self._closing.wait(GATHER_S)
            with self._lock:
                items, self._ending = self._ending, []
                self._ended_some.clear()
            for item in items:
                try:
                    self._ended(*item)
                except Exception:  # a span that could not end is not worth the thread
                    continue
            if closing:
                return

    def _ended(self, run: Run, change: Transition, now: int) -> None:
        """The run's end was committed at `now` (ns): its span ends then, with how."""
        found = self._runs.pop(run.id, None)
        if found is None:
            found = self._run_span(run)
            self._runs.pop(run.id, None)
        span = found.span
        if span.is_recording():  # (a sampler may have left it out)
            attributes: dict[str, Any] = {
                "sleeptime.run.status": change.new.value,
                "sleeptime.commit_ms": round(max(0, now - _ns(change.at)) / 1e6, 3),
            }
            if change.stop_reason is not None:
                attributes["sleeptime.run.stop_reason"] = change.stop_reason.value
            if found.queued_ms is not None:
                attributes["sleeptime.queued_ms"] = found.queued_ms
            if found.step_ms is not None:
                attributes["sleeptime.step_ms"] = found.step_ms
            if change.attempt > 1:
                attributes["sleeptime.attempt"] = change.attempt
            span.set_attributes(attributes)
            if change.new is RunStatus.FAILED:
                span.set_status(Status(StatusCode.ERROR, change.error))
        span.end(end_time=now)

    def run_step(self, run: Run, attempt: int) -> Watch:
        return _StepTimer(self._run_span(run))

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
        """End the spans of the runs that ended; forget those still open (they end in
        the next process)."""
        self._closing.set()
        self._ended_some.set()
        self._ender.join(timeout=CLOSE_TIMEOUT_S)
        self._runs.clear()


def _run_attributes(run: Run) -> dict[str, Any]:
    return {
        "sleeptime.group_id": run.group_id,
        "sleeptime.agent_id": run.agent_id,
        "sleeptime.run_id": run.id,
    }


def _ms(start: datetime, end: datetime) -> float:
    return round(max(0.0, (end - start).total_seconds()) * 1000, 3)


class _Current(Watch):
    """Makes `span` this thread's current span meanwhile (what runs inside, a model
    request, nests in it), and times it."""

    __slots__ = ("_began", "_span", "_token", "elapsed_ms")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: object = None
        self._began = 0.0
        self.elapsed_ms = 0.0

    def __enter__(self) -> Self:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        self._began = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.elapsed_ms = round((time.perf_counter() - self._began) * 1000, 3)
        otel_context.detach(self._token)  # type: ignore[arg-type]


class _StepTimer(_Current):
    """A sleeptime step: inside its run's span; its duration goes on that span."""

    __slots__ = ("_run",)

    def __init__(self, run: _RunSpan) -> None:
        super().__init__(run.span)
        self._run = run

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        self._run.step_ms = self.elapsed_ms


class _Timer(Watch):
    """Times what it is around."""

    __slots__ = ("_began", "elapsed_ms")

    def __init__(self) -> None:
        self._began = 0.0
        self.elapsed_ms = 0.0

    def __enter__(self) -> Self:
        self._began = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.elapsed_ms = round((time.perf_counter() - self._began) * 1000, 3)


class _TurnSpan(TurnWatch):
    """The span of one turn, and the runs it created (their spans link to it)."""

    __slots__ = ("_commit", "_failed", "_parent", "_span", "_start", "_step", "_tracing")

    def __init__(self, tracing: RuntimeTracing, group_id: str, agent_id: str, parent: Any) -> None:
        self._tracing = tracing
        self._parent = parent
        self._start = {"sleeptime.group_id": group_id, "sleeptime.agent_id": agent_id}
        self._span: Span = trace.INVALID_SPAN
        self._step: _Current | None = None
        self._commit: _Timer | None = None
        self._failed = False

    def __enter__(self) -> Self:
        self._span = self._tracing._tracer.start_span(
            "sleeptime.turn",
            context=self._parent if self._parent is not None else _ROOT,
            attributes=self._start,
        )
        return self

    def step(self) -> Watch:
        self._step = _Current(self._span)
        return self._step

    def commit(self) -> Watch:
        if not self._span.is_recording():
            return NO_WATCH
        self._commit = _Timer()
        return self._commit

    def recorded(
        self, turn: int, fired: bool, runs: Sequence[Run], error: BaseException | None
    ) -> None:
        span = self._span
        if span.is_recording():  # (a sampler may have left it out)
            attributes: dict[str, Any] = {"sleeptime.turn": turn, "sleeptime.fired": fired}
            if self._step is not None:
                attributes["sleeptime.step_ms"] = self._step.elapsed_ms
            if self._commit is not None:
                attributes["sleeptime.commit_ms"] = self._commit.elapsed_ms
            span.set_attributes(attributes)
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

    def __init__(self, tracer: trace.Tracer | DirectTracer, attributes: dict[str, Any]) -> None:
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
    span.set_status(Status(StatusCode.ERROR, describe(error)))
