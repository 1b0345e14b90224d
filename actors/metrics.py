"""Prometheus metrics of one runtime, through `prometheus_client` (the `metrics` extra).

`Runtime.start(url, metrics=True)` gives the runtime a `RuntimeMetrics` (`rt.metrics`)
with a registry of its own, so several runtimes in one process never mix their figures;
`metrics=prometheus_client.REGISTRY` puts them on the host's default registry instead (one
runtime per registry). Serve them on a port of their own, or mount them in an ASGI app:

    >>> rt = Runtime.start("sqlite:///sleeptime.db", metrics=True)
    >>> rt.metrics.serve(port=9464)                       # GET :9464/metrics
    >>> app.mount("/metrics", rt.metrics.asgi_app())      # FastAPI, Starlette, ...

What is counted (every name starts with `sleeptime_`):

- turns: `turns_total{fired}`, `turn_duration_seconds` (the group's actor taking the turn
  to its reply: the primary agent's step and the commit);
- runs: `runs_created_total`, `runs_ended_total{status,stop_reason}`,
  `runs_requeued_total`, `run_queued_seconds` (created -> running),
  `run_duration_seconds{status}` (running -> terminal);
- actors: `actor_crashes_total`, `actor_restarts_total`, `actor_escalations_total`,
  `passivations_total`, `activations_total`, each by `actor` (group, agent, tracker);
- the store: `commit_duration_seconds` and `commit_batch_size` (writes per transaction),
  `store_errors_total{error}` (unavailable, rejected);
- model requests (the `openai` kind): `model_request_duration_seconds{outcome}` (ok,
  timeout, unreachable, malformed, http_<status>; its `_count` counts them);
- gauges, read when scraped: `active_groups`, `active_agents`, `open_runs{status}`,
  `turns_in_flight`, `turns_waiting`, `writes_queued` (the writer's queue).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

from prometheus_client import (
    CollectorRegistry,
    generate_latest,
    make_asgi_app,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from actors._observer import Load, Observer, RequestWatch, TurnWatch, actor_kind
from actors._tally import Tally, TallyCounter, TallyHistogram
from messages import Run, RunStatus, StoreUnavailable
from persistence import Transition

PREFIX = "sleeptime"
C = TypeVar("C", bound=Collector)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: turns and commits, from half a millisecond to seconds."""
_SLOW = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds: runs and model requests, up to the default run timeout."""
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_FIRED = {True: ("true",), False: ("false",)}


class RuntimeMetrics(Observer):
    """The Prometheus instruments of one runtime, and how to expose them.

    `registry` is where they live: a new `CollectorRegistry` unless one is given.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._own_registry = registry is None
        self.registry = CollectorRegistry() if registry is None else registry
        self._collectors: list[Collector] = []
        self._servers: list[Any] = []
        self._lock = threading.Lock()

        tally = self._tally = Tally()
        self._observe = tally.observe

        def counter(
            name: str, documentation: str, labels: Sequence[str] = (), children: Any = ()
        ) -> TallyCounter:
            return tally.counter(f"{PREFIX}_{name}", documentation, labels, children)

        def histogram(
            name: str, documentation: str, buckets: Sequence[float], labels: Sequence[str] = ()
        ) -> TallyHistogram:
            return tally.histogram(f"{PREFIX}_{name}", documentation, buckets, labels)

        self._turns = counter(
            "turns",
            "Turns recorded, by whether sleeptime fired.",
            ["fired"],
            children=[("true",), ("false",)],
        )
        self._turn_seconds = histogram(
            "turn_duration_seconds",
            "Seconds from a group's actor taking a turn to its reply.",
            _FAST,
        )
        self._runs_created = counter(
            "runs_created", "Sleeptime runs created (by turns, and as an agent joins: backfill)."
        )
        self._runs_ended = counter(
            "runs_ended", "Runs that ended, by status and stop reason.", ["status", "stop_reason"]
        )
        self._runs_requeued = counter("runs_requeued", "Runs re-queued after an interruption.")
        self._queued_seconds = histogram(
            "run_queued_seconds", "Seconds from a run's creation to its start (running).", _SLOW
        )
        self._run_seconds = histogram(
            "run_duration_seconds",
            "Seconds from a run's start (running) to its end, by how it ended.",
            _SLOW,
            ["status"],
        )
        self._crashes = counter("actor_crashes", "Actor crashes, by kind of actor.", ["actor"])
        self._restarts = counter("actor_restarts", "Actors restarted after a crash.", ["actor"])
        self._escalations = counter(
            "actor_escalations", "Actors that crashed too often (their group failed).", ["actor"]
        )
        self._passivations = counter(
            "passivations", "Idle actors that gave their thread back.", ["actor"]
        )
        self._activations = counter(
            "activations", "Passivated actors started again by a message.", ["actor"]
        )
        self._commit_seconds = histogram(
            "commit_duration_seconds", "Seconds per transaction of the writer.", _FAST
        )
        self._batch_size = histogram(
            "commit_batch_size", "Writes committed per transaction.", _BATCH
        )
        self._store_errors = counter(
            "store_errors", "Calls the database failed, by kind of error.", ["error"]
        )
        self._model_seconds = histogram(
            "model_request_duration_seconds",
            "Seconds per request to a model server, by outcome (its _count counts them).",
            _SLOW,
            ["outcome"],
        )
        self._keep(tally)
        self._gauges = _LoadCollector()
        self._keep(self._gauges)

    def _keep(self, collector: C) -> C:
        """Register `collector` (so a clash with a registry's names is said at start)."""
        try:
            self.registry.register(collector)
        except ValueError as error:
            self._unregister()
            raise ValueError(
                f"{error}: a registry holds the metrics of one runtime; give each runtime "
                "its own (Runtime.start(..., metrics=True)), or register it in the host's "
                "only once"
            ) from error
        self._collectors.append(collector)
        return collector

    # -- exposing them --------------------------------------------------------------------

    def text(self) -> str:
        """The metrics in the Prometheus text format, as a scrape reads them."""
        return generate_latest(self.registry).decode()

    def serve(self, port: int = 9464, addr: str = "0.0.0.0") -> int:
        """Serve `GET /metrics` on `addr:port` from a thread of its own, until the runtime
        stops; returns the port (give 0 for any free one)."""
        server, _ = start_http_server(port, addr, registry=self.registry)
        with self._lock:
            self._servers.append(server)
        return int(server.server_port)

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app answering with these metrics, to mount in a service's app."""
        return make_asgi_app(registry=self.registry)

    # -- the observer ---------------------------------------------------------------------

    def turn(self, group_id: str, agent_id: str, parent: Any) -> TurnWatch:
        return _TurnTimer(self)

    def runs_backfilled(self, runs: Sequence[Run]) -> None:
        self._observe(self._runs_created, (), len(runs))

    def run_committed(self, run: Run, change: Transition, started_at: datetime | None) -> None:
        new = change.new
        if new is RunStatus.RUNNING:
            self._observe(self._queued_seconds, (), _seconds(run.created_at, change.at))
        elif new is RunStatus.CREATED:
            self._observe(self._runs_requeued, (), 1)
        else:
            stop = "" if change.stop_reason is None else change.stop_reason.value
            self._observe(self._runs_ended, (new.value, stop), 1)
            if started_at is not None:
                self._observe(self._run_seconds, (new.value,), _seconds(started_at, change.at))

    def model_request(
        self, agent_id: str, group_id: str, run_id: str | None, model: str
    ) -> RequestWatch:
        return _RequestTimer(self)

    def actor_crashed(self, identity: str, error: BaseException) -> None:
        self._observe(self._crashes, (actor_kind(identity),), 1)

    def actor_restarted(self, identity: str, incarnation: int) -> None:
        self._observe(self._restarts, (actor_kind(identity),), 1)

    def actor_escalated(self, identity: str, reason: str) -> None:
        self._observe(self._escalations, (actor_kind(identity),), 1)

    def actor_passivated(self, identity: str) -> None:
        self._observe(self._passivations, (actor_kind(identity),), 1)

    def actor_activated(self, identity: str) -> None:
        self._observe(self._activations, (actor_kind(identity),), 1)

    def batch_committed(self, writes: int, seconds: float) -> None:
        self._observe(self._commit_seconds, (), seconds)
        self._observe(self._batch_size, (), writes)

    def store_error(self, error: Exception) -> None:
        kind = "unavailable" if isinstance(error, StoreUnavailable) else "rejected"
        self._observe(self._store_errors, (kind,), 1)

    def observe_load(self, sample: Callable[[], Load]) -> None:
        self._gauges.sample = sample

    def close(self) -> None:
        """Stop the servers `serve` started; leave a registry of the host's as it was."""
        with self._lock:
            servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
            server.server_close()
        self._gauges.sample = None
        if not self._own_registry:
            self._unregister()

    def _unregister(self) -> None:
        for collector in self._collectors:
            try:
                self.registry.unregister(collector)
            except KeyError:
                pass
        self._collectors = []


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


class _TurnTimer(TurnWatch):
    """Times one turn; counts it once it is recorded."""

    __slots__ = ("_began", "_fired", "_metrics")

    def __init__(self, metrics: RuntimeMetrics) -> None:
        self._metrics = metrics
        self._began = 0.0
        self._fired: bool | None = None

    def __enter__(self) -> Self:
        self._began = time.perf_counter()
        return self

    def recorded(
        self, turn: int, fired: bool, runs: Sequence[Run], error: BaseException | None
    ) -> None:
        self._fired = fired
        if runs:
            metrics = self._metrics
            metrics._observe(metrics._runs_created, (), len(runs))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fired is not None:  # a turn that was not recorded is not a turn
            metrics = self._metrics
            metrics._observe(metrics._turns, _FIRED[self._fired], 1)
            metrics._observe(metrics._turn_seconds, (), time.perf_counter() - self._began)


class _RequestTimer(RequestWatch):
    """Times one model request and counts it by outcome."""

    __slots__ = ("_began", "_metrics", "_outcome")

    def __init__(self, metrics: RuntimeMetrics) -> None:
        self._metrics = metrics
        self._began = 0.0
        self._outcome = "ok"

    def __enter__(self) -> Self:
        self._began = time.perf_counter()
        return self

    def failed(self, outcome: str, error: BaseException) -> None:
        self._outcome = outcome

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        outcome = self._outcome if exc is None or self._outcome != "ok" else "error"
        metrics = self._metrics
        metrics._observe(metrics._model_seconds, (outcome,), time.perf_counter() - self._began)


class _LoadCollector(Collector):
    """The gauges, read from the runtime when scraped (nothing while it is not running)."""

    def __init__(self) -> None:
        self.sample: Callable[[], Load] | None = None

    def describe(self) -> Iterator[Any]:
        return iter(_gauge_families(None))

    def collect(self) -> Iterator[Any]:
        sample = self.sample
        if sample is None:
            return iter(())
        try:
            load = sample()
        except Exception:  # a stopping runtime, say: nothing to say this time
            return iter(())
        return iter(_gauge_families(load))


def _gauge_families(load: Load | None) -> list[Any]:
    def gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation)
        if value is not None:
            family.add_metric([], value)
        return family

    open_runs = GaugeMetricFamily(
        f"{PREFIX}_open_runs", "Runs followed here, not yet terminal, by status.", labels=["status"]
    )
    if load is not None:
        for status, count in sorted(load.open_runs.items()):
            open_runs.add_metric([status], count)
    return [
        gauge(
            "active_groups",
            "Groups whose actor is running (not passivated).",
            None if load is None else load.active_groups,
        ),
        gauge(
            "active_agents",
            "Sleeptime agents whose actor is running (not passivated).",
            None if load is None else load.active_agents,
        ),
        open_runs,
        gauge(
            "turns_in_flight",
            "Turns sent to their group and not ended.",
            None if load is None else load.turns_in_flight,
        ),
        gauge(
            "turns_waiting",
            "Turns waiting for a permit (max_turns_in_flight).",
            None if load is None else load.turns_waiting,
        ),
        gauge(
            "writes_queued",
            "Writes waiting for the database writer.",
            None if load is None else load.writes_queued,
        ),
    ]
