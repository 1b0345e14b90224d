"""The observer: what the runtime tells about its work, for metrics and traces.

The runtime wires one `Observer` into its parts, and each fact is told where it is decided:

- a turn, by the `GroupActor`: `turn()` gives a `TurnWatch`, entered for the whole turn,
  with `step()` around the primary agent and `commit()` around the transaction, and
  `recorded()` once it is committed (with the runs it created);
- a run's status change, once committed (the run tracker's write callback, on the writer
  thread): `run_committed()`, with the run as created and when its attempt started;
- a sleeptime step, on its step thread: `run_step()`, around the agent's step;
- a model request (the `openai` kind): `model_request()`, whose watch learns the outcome;
- a crash, restart, escalation, passivation or activation, by the `Supervisor`;
- a committed batch and a store error, by the store (`persistence.StoreObserver`).

This base does nothing, and its watches are shared no-op objects: with nothing configured a
fact costs a method call. `actors.metrics` (Prometheus) and `actors.tracing`
(OpenTelemetry) implement it; `Observers` tells several. The actors import only this
module, never prometheus_client or opentelemetry. Logs are not an observer: the runtime
logs its lifecycle events itself, where they happen, at all times.

Every method is called on the thread that found the fact and must be quick and not raise.

Example:
    >>> with observer.turn(group_id, agent_id, parent=None) as watch:
    ...     with watch.step():
    ...         produced = agent.step(context, messages)
    ...     with watch.commit():
    ...         store.record_turn(write).result()
    ...     watch.recorded(turn=7, fired=True, runs=runs, error=None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from messages import Run
from persistence import StoreObserver, Transition

W = TypeVar("W", bound="Watch")


class Watch:
    """A piece of work being observed: entered as it begins, exited as it ends.

    This one does nothing; `NO_WATCH` is the shared instance.
    """

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


class TurnWatch(Watch):
    """One turn of a group, from the moment its actor takes it to its reply."""

    __slots__ = ()

    def step(self) -> Watch:
        """Around the primary agent's step (a turn taken with `record_turn` has none)."""
        return NO_WATCH

    def commit(self) -> Watch:
        """Around the turn's transaction."""
        return NO_WATCH

    def recorded(
        self, turn: int, fired: bool, runs: Sequence[Run], error: BaseException | None
    ) -> None:
        """The turn is committed: its number, whether sleeptime fired, the runs it
        created, and the primary agent's error if it failed (the turn still counts)."""


class RequestWatch(Watch):
    """One request to a model server; it succeeded unless `failed` is called."""

    __slots__ = ()

    def failed(self, outcome: str, error: BaseException) -> None:
        """The request got no answer: `outcome` names why in a word (`timeout`,
        `http_429`, `unreachable`, ...), `error` says it in full."""


NO_WATCH = Watch()
NO_TURN = TurnWatch()
NO_REQUEST = RequestWatch()


@dataclass(frozen=True, slots=True)
class Load:
    """How busy the runtime is at one moment (sampled when metrics are scraped)."""

    active_groups: int
    active_agents: int
    open_runs: Mapping[str, int]
    """Runs this process follows that are not terminal, by status (`created`, `running`);
    empty when the run tracker could not be asked."""
    turns_in_flight: int
    turns_waiting: int
    writes_queued: int


class Observer(StoreObserver):
    """Receives the runtime's facts; every method does nothing unless overridden."""

    __slots__ = ()

    # -- turns ----------------------------------------------------------------------------

    def caller_context(self) -> Any:
        """Taken in the caller's thread as a turn is sent, and handed to `turn` as its
        `parent` (a trace's current span, say); None here."""
        return None

    def turn(self, group_id: str, agent_id: str, parent: Any) -> TurnWatch:
        """A turn of group `group_id` (primary agent `agent_id`) begins."""
        return NO_TURN

    # -- runs -----------------------------------------------------------------------------

    def runs_backfilled(self, runs: Sequence[Run]) -> None:
        """Runs committed outside a turn: those a sleeptime agent joining with backfill
        got (a turn's runs come with `TurnWatch.recorded`)."""

    def run_committed(self, run: Run, change: Transition, started_at: datetime | None) -> None:
        """A status change of `run` (as it was created) is committed; `started_at` is when
        its current attempt started running (None if it has not)."""

    def run_step(self, run: Run, attempt: int) -> Watch:
        """Around a sleeptime agent's step of `run`, on its step thread."""
        return NO_WATCH

    def runs_forgotten(self, run_ids: Sequence[str], why: str) -> None:
        """Runs no longer followed here before they ended: `deleted` with their group (or
        pruned), or `moved` to the process that took their shard over."""

    # -- agents ---------------------------------------------------------------------------

    def model_request(
        self, agent_id: str, group_id: str, run_id: str | None, model: str
    ) -> RequestWatch:
        """An agent sends a request to a model server (`run_id` None: a primary turn)."""
        return NO_REQUEST

    # -- supervision ----------------------------------------------------------------------

    def actor_crashed(self, identity: str, error: BaseException) -> None:
        """The actor `identity` (`group:<id>`, `agent:<id>`, `tracker`) crashed."""

    def actor_restarted(self, identity: str, incarnation: int) -> None:
        """Its supervisor started it again after a crash."""

    def actor_escalated(self, identity: str, reason: str) -> None:
        """It crashed too often: its supervisor gave up on it (the group failed)."""

    def actor_passivated(self, identity: str) -> None:
        """It was idle and gave its thread back."""

    def actor_activated(self, identity: str) -> None:
        """A message for it started it again after a passivation."""

    # -- the runtime ----------------------------------------------------------------------

    def observe_load(self, sample: Callable[[], Load]) -> None:
        """How to sample the runtime's load, for gauges; given once, at start."""

    def close(self) -> None:
        """The runtime stopped."""


NO_OBSERVER = Observer()


def actor_kind(identity: str) -> str:
    """`group`, `agent` or `tracker`: the kind of actor an identity names.

    >>> actor_kind("group:group-1"), actor_kind("tracker")
    ('group', 'tracker')
    """
    return identity.partition(":")[0]


class Observers(Observer):
    """Tells each of several observers every fact, in order."""

    __slots__ = ("_each",)

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._each = tuple(observers)

    def caller_context(self) -> Any:
        for observer in self._each:
            found = observer.caller_context()
            if found is not None:
                return found
        return None

    def turn(self, group_id: str, agent_id: str, parent: Any) -> TurnWatch:
        return _TurnWatches([o.turn(group_id, agent_id, parent) for o in self._each])

    def runs_backfilled(self, runs: Sequence[Run]) -> None:
        for observer in self._each:
            observer.runs_backfilled(runs)

    def run_committed(self, run: Run, change: Transition, started_at: datetime | None) -> None:
        for observer in self._each:
            observer.run_committed(run, change, started_at)

    def runs_forgotten(self, run_ids: Sequence[str], why: str) -> None:
        for observer in self._each:
            observer.runs_forgotten(run_ids, why)

    def run_step(self, run: Run, attempt: int) -> Watch:
        return _Watches([o.run_step(run, attempt) for o in self._each])

    def model_request(
        self, agent_id: str, group_id: str, run_id: str | None, model: str
    ) -> RequestWatch:
        return _RequestWatches(
            [o.model_request(agent_id, group_id, run_id, model) for o in self._each]
        )

    def actor_crashed(self, identity: str, error: BaseException) -> None:
        for observer in self._each:
            observer.actor_crashed(identity, error)

    def actor_restarted(self, identity: str, incarnation: int) -> None:
        for observer in self._each:
            observer.actor_restarted(identity, incarnation)

    def actor_escalated(self, identity: str, reason: str) -> None:
        for observer in self._each:
            observer.actor_escalated(identity, reason)

    def actor_passivated(self, identity: str) -> None:
        for observer in self._each:
            observer.actor_passivated(identity)

    def actor_activated(self, identity: str) -> None:
        for observer in self._each:
            observer.actor_activated(identity)

    def batch_committed(self, writes: int, seconds: float) -> None:
        for observer in self._each:
            observer.batch_committed(writes, seconds)

    def store_error(self, error: Exception) -> None:
        for observer in self._each:
            observer.store_error(error)

    def observe_load(self, sample: Callable[[], Load]) -> None:
        for observer in self._each:
            observer.observe_load(sample)

    def close(self) -> None:
        for observer in self._each:
            observer.close()


def combine(observers: Sequence[Observer]) -> Observer:
    """One observer telling all of `observers`: the no-op one if there are none."""
    if not observers:
        return NO_OBSERVER
    if len(observers) == 1:
        return observers[0]
    return Observers(observers)


class _Watches(Watch, Generic[W]):
    """Several watches as one: entered in order, left in reverse."""

    __slots__ = ("_each",)

    def __init__(self, watches: list[W]) -> None:
        self._each = watches

    def __enter__(self) -> Self:
        for watch in self._each:
            watch.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for watch in reversed(self._each):
            watch.__exit__(exc_type, exc, tb)


class _TurnWatches(_Watches[TurnWatch], TurnWatch):
    __slots__ = ()

    def step(self) -> Watch:
        return _Watches([watch.step() for watch in self._each])

    def commit(self) -> Watch:
        return _Watches([watch.commit() for watch in self._each])

    def recorded(
        self, turn: int, fired: bool, runs: Sequence[Run], error: BaseException | None
    ) -> None:
        for watch in self._each:
            watch.recorded(turn, fired, runs, error)


class _RequestWatches(_Watches[RequestWatch], RequestWatch):
    __slots__ = ()

    def failed(self, outcome: str, error: BaseException) -> None:
        for watch in self._each:
            watch.failed(outcome, error)
