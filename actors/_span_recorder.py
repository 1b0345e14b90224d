"""Spans recorded straight into the SDK's span processors: a tenth of the SDK span's cost.

An OpenTelemetry SDK span (`Tracer.start_span` ... `end`) costs some 20 us of CPU: its
attributes are checked and copied into a bounded, locked mapping, the span processors
are told at its start and at its end, and the SDK counts it in metrics of its own. A
runtime of zero-latency agents makes a turn in about 1 ms, so two spans a turn took a
fifth of its throughput. The runtime's spans need none of that machinery: their
attributes are a few strings and numbers it made itself, and the processors that
export (the SDK's batch and simple processors) do nothing at a span's start. So, when
the provider is the SDK's and its only processors are those, a `DirectTracer` samples
and numbers a span as the SDK would (the provider's sampler and id generator), keeps
what is set on it in plain fields, and hands the processors the finished span, a
`ReadableSpan` like the SDK's, at its end: some 3 us. With any other provider, or any
other processor (one may read or change spans as they start), the runtime traces
through the SDK's tracer as usual (`direct_tracer` returns None).

What the SDK does and this does not: span limits (the runtime's spans stay far below
them) and the SDK's own metrics of spans started and ended.

Example:
    >>> tracer = direct_tracer(provider, "sleeptime-runtime", "1.0") or provider.get_tracer(...)
    >>> span = tracer.start_span("sleeptime.turn", attributes={"sleeptime.group_id": "g"})
    >>> span.end()            # the batch processor has it now
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
)
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

_QUIET_AT_START = (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor)
"""Processors whose `on_start` (and `_on_ending`) do nothing: spans need not exist
before they end for them."""
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_RANDOM_ID: int = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)


def _quiet_at_start(processor: Any) -> bool:
    kind = type(processor)
    return all(
        getattr(kind, hook, None) in {getattr(base, hook, None) for base in _QUIET_AT_START}
        for hook in ("on_start", "_on_ending")
    )


def direct_tracer(provider: Any, name: str, version: str | None) -> DirectTracer | None:
    """A tracer recording straight into `provider`'s processors, if `provider` is the
    SDK's and every processor it has is quiet at a span's start; None otherwise."""
    if not isinstance(provider, SdkTracerProvider):
        return None
    tracer = provider.get_tracer(name, version)
    if not isinstance(tracer, SdkTracer):
        return None  # (the SDK disabled: its no-op tracer)
    try:
        processor = tracer.span_processor
        processors = processor._span_processors  # (checked just below)
        scope = tracer._instrumentation_scope
        sampler, ids, resource = tracer.sampler, tracer.id_generator, tracer.resource
    except AttributeError:  # an SDK laid out otherwise than the ones tested
        return None
    if type(processor) is not SynchronousMultiSpanProcessor:
        return None
    if not all(_quiet_at_start(each) for each in processors):
        return None
    return DirectTracer(processor, sampler, ids, resource, scope)


class DirectTracer:
    """Starts spans as the SDK's tracer would, recording them as `RecordedSpan`s."""

    __slots__ = ("_ids", "_processor", "_resource", "_sampler", "_scope")

    def __init__(self, processor: Any, sampler: Any, ids: Any, resource: Any, scope: Any) -> None:
        self._processor = processor
        self._sampler = sampler
        self._ids = ids
        self._resource = resource
        self._scope = scope

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
    ) -> trace.Span:
        """A recording span, or a non-recording one if the sampler leaves it out."""
        links = links or ()
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self._ids.generate_trace_id()
            random_id = bool(_RANDOM_ID) and bool(
                getattr(self._ids, "is_trace_id_random", lambda: False)()
            )
        else:
            trace_id = parent.trace_id
            random_id = bool(parent.trace_flags & _RANDOM_ID)
        sampled = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
        flags = _SAMPLED if sampled.decision.is_sampled() else _NOT_SAMPLED
        if random_id:
            flags = TraceFlags(flags | _RANDOM_ID)
        own = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=flags,
            trace_state=sampled.trace_state,
        )
        if not sampled.decision.is_recording():
            return trace.NonRecordingSpan(own)
        return RecordedSpan(
            self,
            name,
            own,
            parent,
            kind,
            dict(sampled.attributes or {}),
            tuple(links),
            time.time_ns() if start_time is None else start_time,
        )

    def _ended(self, span: RecordedSpan, end_time: int) -> None:
        self._processor.on_end(
            ReadableSpan(
                name=span.name,
                context=span.context,
                parent=span.parent,
                resource=self._resource,
                attributes=span.attributes,
                events=span.events,
                links=span.links,
                kind=span.kind,
                status=span.status,
                start_time=span.start_time,
                end_time=end_time,
                instrumentation_scope=self._scope,
            )
        )


class RecordedSpan(trace.Span):
    """A span whose attributes, events and status are plain fields until it ends; then
    its tracer hands the processors a `ReadableSpan` of it (once: a second end is
    ignored, as the SDK's is). Not locked: each is changed by one thread at a time."""

    __slots__ = (
        "_ended",
        "_tracer",
        "attributes",
        "context",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "start_time",
        "status",
    )

    def __init__(
        self,
        tracer: DirectTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        links: tuple[Link, ...],
        start_time: int,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.links = links
        self.start_time = start_time
        self.events: list[Event] = []
        self.status = Status(StatusCode.UNSET)
        self._ended = False

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._ended:
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self._ended:
            self.attributes.update(attributes)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if not self._ended:
            self.events.append(Event(name, attributes, timestamp))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if not self._ended and context.is_valid:
            self.links = (*self.links, Link(context, attributes))

    def update_name(self, name: str) -> None:
        if not self._ended:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended or self.status.status_code is StatusCode.OK:
            return  # (OK is final, as in the SDK)
        self.status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        described: dict[str, AttributeValue] = {
            "exception.type": kind.__qualname__
            if module in ("builtins", "", None)
            else f"{module}.{kind.__qualname__}",
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        described.update(attributes or {})
        self.add_event("exception", described, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._tracer._ended(self, time.time_ns() if end_time is None else end_time)
