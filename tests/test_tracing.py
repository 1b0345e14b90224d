"""OpenTelemetry traces: the spans of a turn and of its runs, and none without a provider.

Spans go to an in-memory exporter through a tracer provider handed to the runtime
(`Runtime.start(..., tracing=provider)`): the global provider can be set only once per
process, so only one test pretends it was, by standing in for its getter.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from actors import PrimaryAgentError, Runtime
from actors._span_recorder import DirectTracer, direct_tracer
from actors._telemetry import tracer_provider
from actors.tracing import _ns
from messages import RunStatus, TurnResult
from tests.agents import Recorder, Streamer, user
from tests.fake_openai import FakeOpenAI, Reply


class StartWatcher(SpanProcessor):
    """A processor that reads spans as they start: the runtime then traces through the
    SDK's own spans (it records straight into processors that do nothing then)."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.started.append(span.name)


class Traced:
    """A tracer provider that keeps every finished span in memory; with `watched`, it
    also watches spans start (so the SDK's spans are used, not `_span_recorder`'s)."""

    def __init__(self, watched: bool = False) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.watcher = StartWatcher() if watched else None
        if self.watcher is not None:
            self.provider.add_span_processor(self.watcher)

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        (found,) = self.named(name)
        return found


@pytest.fixture(params=["recorded", "sdk spans"])
def traced(request: pytest.FixtureRequest) -> Iterator[Traced]:
    """Each test runs with both ways of making spans: recorded straight into the
    processors, and the SDK's own spans (a processor watches them start)."""
    found = Traced(watched=request.param == "sdk spans")
    yield found
    found.provider.shutdown()
    if found.watcher is not None:  # every span was the SDK's, started before it ended
        assert sorted(found.watcher.started) == sorted(span.name for span in found.spans)


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def pop_ms(attributes: dict[str, Any], *names: str) -> dict[str, float]:
    """Take the durations (milliseconds) out of a span's attributes."""
    taken = {name: attributes.pop(name) for name in names}
    assert all(isinstance(value, float) for value in taken.values()), taken
    return taken


def test_one_turn_with_one_fired_run_gives_its_spans_and_the_link(
    db_url: str, traced: Traced
) -> None:
    with Runtime.start(db_url, tracing=traced.provider) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
        )
        result = rt.step(group.id, [user("my favorite color is teal")])
        (run,) = rt.wait_for_runs(result.run_ids, timeout=30)
    assert run.status is RunStatus.COMPLETED

    assert sorted(span.name for span in traced.spans) == ["sleeptime.run", "sleeptime.turn"]
    turn = traced.one("sleeptime.turn")
    assert parent_of(turn) is None
    attributes: dict[str, Any] = dict(turn.attributes or {})
    phases = pop_ms(attributes, "sleeptime.step_ms", "sleeptime.commit_ms")
    assert attributes == {
        "sleeptime.group_id": group.id,
        "sleeptime.agent_id": group.primary_agent_id,
        "sleeptime.turn": 1,
        "sleeptime.fired": True,
    }
    assert turn.start_time is not None and turn.end_time is not None
    turn_ms = (turn.end_time - turn.start_time) / 1e6
    assert all(ms >= 0 for ms in phases.values()) and sum(phases.values()) <= turn_ms

    run_span = traced.one("sleeptime.run")  # in the turn's trace, and linked to it
    assert parent_of(run_span) == span_id(turn) and trace_id(run_span) == trace_id(turn)
    assert [link.context.span_id for link in run_span.links] == [span_id(turn)]
    attributes = dict(run_span.attributes or {})
    phases = pop_ms(attributes, "sleeptime.queued_ms", "sleeptime.step_ms", "sleeptime.commit_ms")
    assert attributes == {
        "sleeptime.group_id": group.id,
        "sleeptime.agent_id": group.sleeptime_agent_ids[0],
        "sleeptime.run_id": run.id,
        "sleeptime.run.status": "completed",
        "sleeptime.run.stop_reason": "end_turn",
    }
    assert run_span.status.status_code is StatusCode.UNSET
    # From the run's creation to its end committed, the phases inside, one after the other.
    assert run_span.start_time == _ns(run.created_at)
    assert run_span.start_time is not None and run_span.end_time is not None
    run_ms = (run_span.end_time - run_span.start_time) / 1e6
    assert all(ms >= 0 for ms in phases.values()) and sum(phases.values()) <= run_ms
    assert run.started_at is not None
    queued_ms = (run.started_at - run.created_at).total_seconds() * 1000
    assert phases["sleeptime.queued_ms"] == pytest.approx(queued_ms, abs=0.01)


def test_a_turn_is_a_child_of_the_callers_span(tmp_path: Path, traced: Traced) -> None:
    tracer = traced.provider.get_tracer("a web service")
    with Runtime.start(f"sqlite:///{tmp_path / 'c.db'}", tracing=traced.provider) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=0
        )
        with tracer.start_as_current_span("POST /turns") as request:
            rt.step(group.id, [user("hi")])
    turn = traced.one("sleeptime.turn")
    assert parent_of(turn) == request.get_span_context().span_id
    assert trace_id(turn) == request.get_span_context().trace_id
    assert traced.named("sleeptime.run") == []  # frequency 0: nothing fired


def test_failures_mark_their_spans(tmp_path: Path, traced: Traced) -> None:
    recorder = Recorder(fail_on={0})
    with Runtime.start(
        f"sqlite:///{tmp_path / 'f.db'}",
        kinds={"breaks": Streamer, "recorder": recorder.factory},
        tracing=traced.provider,
    ) as rt:
        group = rt.create_group(
            primary={"kind": "breaks", "config": {"fail": True}},
            sleeptime=[{"kind": "recorder"}],
            frequency=1,
        )
        streamed = rt.stream(group.id, [user("hi")])  # three messages, then it breaks
        with pytest.raises(PrimaryAgentError) as failed:
            list(streamed)
        assert isinstance(failed.value.result, TurnResult)
        rt.wait_for_runs(failed.value.result.run_ids, timeout=30)
    turn = traced.one("sleeptime.turn")
    assert turn.status.status_code is StatusCode.ERROR
    assert [event.name for event in turn.events] == ["exception"]  # recorded once
    assert "broke mid-stream" in str(turn.status.description)
    run_span = traced.one("sleeptime.run")
    assert run_span.status.status_code is StatusCode.ERROR
    assert "step 0 fails on purpose" in str(run_span.status.description)


def test_model_requests_nest_in_the_turn_or_run_that_made_them(
    tmp_path: Path, traced: Traced
) -> None:
    def llm() -> dict[str, Any]:
        return {
            "kind": "openai",
            "config": {"base_url": fake.url, "model": "fake-model", "backoff_s": 0.01},
        }

    with (
        FakeOpenAI() as fake,
        Runtime.start(f"sqlite:///{tmp_path / 'm.db'}", tracing=traced.provider) as rt,
    ):
        fake.script_primary(Reply.error(500, "overloaded"), Reply.text("hello"))
        fake.script_sleeptime(Reply.call("memory_finish_edits"))
        group = rt.create_group(primary=llm(), sleeptime=[llm()], frequency=1)
        result = rt.step(group.id, [user("hi")])
        (run,) = rt.wait_for_runs(result.run_ids, timeout=30)
    requests = traced.named("sleeptime.model_request")
    assert len(requests) == 3 and all(span.kind is SpanKind.CLIENT for span in requests)
    turn = traced.one("sleeptime.turn")
    run_span = traced.one("sleeptime.run")
    primary = [span for span in requests if parent_of(span) == span_id(turn)]
    sleeptime = [span for span in requests if parent_of(span) == span_id(run_span)]
    assert [(s.attributes or {}).get("sleeptime.outcome") for s in primary] == ["http_500", "ok"]
    assert [s.status.status_code for s in primary] == [StatusCode.ERROR, StatusCode.UNSET]
    (memory,) = sleeptime
    assert dict(memory.attributes or {}) == {
        "sleeptime.agent_id": group.sleeptime_agent_ids[0],
        "sleeptime.group_id": group.id,
        "sleeptime.run_id": run.id,
        "gen_ai.request.model": "fake-model",
        "sleeptime.outcome": "ok",
    }


def test_a_turn_the_sampler_leaves_out_leaves_its_runs_out(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.5)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with Runtime.start(f"sqlite:///{tmp_path / 's.db'}", tracing=provider) as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
        )
        ids = [r for n in range(40) for r in rt.step(group.id, [user(f"turn {n}")]).run_ids]
        rt.wait_for_runs(ids, timeout=60)
    spans = exporter.get_finished_spans()
    turns = {span_id(s): s for s in spans if s.name == "sleeptime.turn"}
    runs = [s for s in spans if s.name == "sleeptime.run"]
    assert 0 < len(turns) < 40  # about half kept
    assert sorted(parent_of(r) or 0 for r in runs) == sorted(turns)  # one run per kept turn
    provider.shutdown()


def test_with_no_tracer_provider_configured_nothing_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # nobody set one
    assert tracer_provider(True) is None
    started: list[str] = []

    def counted(original: Any) -> Any:
        def start_span(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
            started.append(name)
            return original(self, name, *args, **kwargs)

        return start_span

    for tracer_class in (Tracer, trace.ProxyTracer, trace.NoOpTracer):
        monkeypatch.setattr(tracer_class, "start_span", counted(tracer_class.start_span))
    with Runtime.start(f"sqlite:///{tmp_path / 'n.db'}") as rt:
        group = rt.create_group(
            primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=1
        )
        rt.wait_for_runs(rt.step(group.id, [user("my name is Ada")]).run_ids, timeout=30)
    assert started == []


def test_the_hosts_global_provider_is_used_unless_tracing_is_off(
    tmp_path: Path, traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the host had called trace.set_tracer_provider (possible once per process).
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: traced.provider)
    assert tracer_provider(True) is traced.provider
    assert tracer_provider(False) is None
    for name, tracing in (("on", True), ("off", False)):
        with Runtime.start(f"sqlite:///{tmp_path / f'{name}.db'}", tracing=tracing) as rt:
            group = rt.create_group(
                primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}], frequency=0
            )
            rt.step(group.id, [user("hi")])
    assert len(traced.named("sleeptime.turn")) == 1  # the runtime with tracing on


def test_the_spans_of_runs_whose_group_is_deleted_end_as_deleted(
    tmp_path: Path, traced: Traced
) -> None:
    """A run followed no more (its group deleted while it ran or waited) ends its span
    then, marked so, instead of keeping it open for as long as the runtime runs."""
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    with Runtime.start(f"sqlite:///{tmp_path / 'x.db'}", tracing=traced.provider) as rt:
        rt.agents.register("recorder", recorder.factory)
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "recorder"}])
        running = rt.step(group.id, [user("one")]).run_ids
        recorder.wait_started()
        waiting = rt.step(group.id, [user("two")]).run_ids
        rt.delete_group(group.id)
        gate.set()
    runs = [dict(s.attributes or {}) for s in traced.named("sleeptime.run")]
    assert sorted(str(a["sleeptime.run_id"]) for a in runs) == sorted(running + waiting)
    assert {a["sleeptime.run.status"] for a in runs} == {"deleted"}


def test_backfill_runs_are_traced_as_backfill_not_as_recovered(
    tmp_path: Path, traced: Traced
) -> None:
    with Runtime.start(f"sqlite:///{tmp_path / 'x.db'}", tracing=traced.provider) as rt:
        group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
        rt.wait_for_runs(rt.step(group.id, [user("my name is Ada")]).run_ids, timeout=30)
        rt.add_sleeptime_agent(group.id, {"kind": "memory"}, backfill=True)
        joined = rt.get_group(group.id).sleeptime_agent_ids[-1]
        run_ids = [r.id for r in rt.list_runs(agent_id=joined)]
        assert run_ids
        rt.wait_for_runs(run_ids, timeout=30)
    spans = [dict(s.attributes or {}) for s in traced.named("sleeptime.run")]
    backfilled = [a for a in spans if a["sleeptime.run_id"] in run_ids]
    assert len(backfilled) == len(run_ids)
    for attributes in backfilled:
        assert attributes["sleeptime.backfill"] is True
        assert "sleeptime.recovered" not in attributes
        assert attributes["sleeptime.run.status"] == "completed"


def test_spans_are_recorded_straight_into_the_processors_only_where_that_is_the_same() -> None:
    def chosen(*processors: SpanProcessor) -> bool:
        provider = TracerProvider()
        for processor in processors:
            provider.add_span_processor(processor)
        return isinstance(direct_tracer(provider, "t", None), DirectTracer)

    exporter = InMemorySpanExporter()
    assert chosen()  # no processor: nothing is exported, either way
    assert chosen(SimpleSpanProcessor(exporter))
    assert chosen(SimpleSpanProcessor(exporter), BatchSpanProcessor(exporter))
    assert not chosen(SimpleSpanProcessor(exporter), StartWatcher())  # it reads span starts
    assert direct_tracer(trace.NoOpTracerProvider(), "t", None) is None  # not the SDK's


def test_a_recorded_span_ends_as_the_sdks_span_would() -> None:
    """The same calls on a recorded span and on an SDK span give the same finished span
    (but for the ids and times each makes)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorded = direct_tracer(provider, "t", None)
    assert recorded is not None
    sdk = provider.get_tracer("t")
    try:
        raise ValueError("no luck")
    except ValueError as caught:
        error = caught
    for tracer in (recorded, sdk):
        parent = tracer.start_span("parent", attributes={"a": 1})
        span = tracer.start_span(
            "child",
            context=trace.set_span_in_context(parent),
            links=[trace.Link(parent.get_span_context())],
            attributes={"b": "two"},
            start_time=10,
        )
        span.set_attribute("c", 3.5)
        span.set_attributes({"d": True})
        span.add_event("requeued", {"attempt": 2}, timestamp=20)
        span.record_exception(error)
        span.set_status(StatusCode.ERROR, "no luck")
        span.end(end_time=30)
        span.end(end_time=40)  # ignored: ended once
        span.set_attribute("late", 1)  # ignored: ended
        parent.end()
    assert isinstance(span, trace.Span)
    finished = exporter.get_finished_spans()
    assert [s.name for s in finished] == ["child", "parent"] * 2

    def shape(span: ReadableSpan) -> tuple[Any, ...]:
        assert span.context is not None
        return (
            span.name,
            dict(span.attributes or {}),
            [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events],
            (span.status.status_code, span.status.description),
            span.kind,
            span.start_time if span.name == "child" else None,
            span.end_time if span.name == "child" else None,
            span.context.trace_flags,
            span.parent is not None,
            len(span.links),
        )

    def without_times(found: tuple[Any, ...]) -> tuple[Any, ...]:
        events = [(n, a, t if n != "exception" else None) for n, a, t in found[2]]
        return (*found[:2], events, *found[3:])

    assert [without_times(shape(s)) for s in finished[:2]] == [
        without_times(shape(s)) for s in finished[2:]
    ]
    child, parent_span = finished[0], finished[1]
    assert child.parent == parent_span.context and child.links[0].context == parent_span.context
    assert child.resource == finished[2].resource
    assert child.instrumentation_scope == finished[2].instrumentation_scope
    provider.shutdown()
