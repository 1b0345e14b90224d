"""The checks of the Runtime's arguments that are not a domain model of their own.

Each is a pydantic model or TypeAdapter, so a bad argument is a `ValidationError` naming
it, raised before anything reaches an actor or the database, the same on every backend.

Example:
    >>> RunFilters(statuses=["created"], limit=10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, InstanceOf, StrictBool, TypeAdapter

from actors._chaos import Chaos
from actors._restart import RestartPolicy
from messages import RunStatus
from messages._text import INT32_MAX, Id, Kind, Text
from persistence import MAX_SHARDS

MAX_WORKERS = 1024
"""Step threads at most: the pool starts them all at once."""
MAX_WAIT_S = 1e9
"""The longest `wait_for_runs` timeout (about 30 years; None waits for ever)."""


MIN_LEASE_S = 0.2
MAX_LEASE_S = 3600.0


@runtime_checkable
class _Registry(Protocol):
    """What `metrics=` takes besides a bool: a prometheus_client `CollectorRegistry`."""

    def register(self, collector: Any) -> None: ...
    def unregister(self, collector: Any) -> None: ...
    def collect(self) -> Any: ...


@runtime_checkable
class _TracerProvider(Protocol):
    """What `tracing=` takes besides a bool: an OpenTelemetry `TracerProvider`."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any: ...


class StartOptions(BaseModel):
    """The options of `Runtime.start`, checked before the database is opened."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Runtime.start")
    url: Text
    kinds: dict[Kind, Callable[..., Any]] | None = None
    workers: int = Field(ge=1, le=MAX_WORKERS)
    read_only: StrictBool
    auto_upgrade: StrictBool
    chaos: InstanceOf[Chaos] | None = None
    restart_policy: InstanceOf[RestartPolicy] | None = None
    passivate_after: float | None = Field(gt=0, allow_inf_nan=False)
    max_active_groups: int | None = Field(ge=1, le=INT32_MAX)
    shards: int = Field(ge=1, le=MAX_SHARDS)
    lease_s: float = Field(ge=MIN_LEASE_S, le=MAX_LEASE_S, allow_inf_nan=False)
    address: Text | None = None
    max_turns_in_flight: int | None = Field(ge=1, le=INT32_MAX)
    max_queued_turns: int | None = Field(ge=1, le=INT32_MAX)
    permit_timeout: float | None = Field(gt=0, le=MAX_WAIT_S, allow_inf_nan=False)
    metrics: StrictBool | InstanceOf[_Registry] = False
    tracing: StrictBool | InstanceOf[_TracerProvider] = True


class RunFilters(BaseModel):
    """The filters of `list_runs` and `count_runs`."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="run filters")
    agent_id: Id | None = None
    group_id: Id | None = None
    statuses: list[RunStatus] | None = None
    limit: int | None = Field(default=None, ge=1, le=INT32_MAX)
    newest_first: StrictBool = False
    after: Id | None = None


class RunWait(BaseModel):
    """The arguments of `wait_for_runs`."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="wait_for_runs")
    run_ids: list[Id]
    timeout: float | None = Field(ge=0, le=MAX_WAIT_S, allow_inf_nan=False)


TURN_TIMEOUT: TypeAdapter[float | None] = TypeAdapter(
    Annotated[float, Field(gt=0, le=MAX_WAIT_S, allow_inf_nan=False)] | None,
    config=ConfigDict(title="timeout"),
)
"""The `timeout` of `step`, `record_turn` and `stream`: seconds above 0, or None."""

REQUEST_ID: TypeAdapter[str | None] = TypeAdapter(Id | None, config=ConfigDict(title="request_id"))
"""The `request_id` of `step`, `record_turn` and `stream`: an id (text of 1 to 64
characters, under the text rule), or None for a turn that is never retried."""

DRAIN_TIMEOUT: TypeAdapter[float] = TypeAdapter(
    Annotated[float, Field(ge=0, le=MAX_WAIT_S, allow_inf_nan=False)],
    config=ConfigDict(title="drain_timeout"),
)
"""The `drain_timeout` of `Runtime.stop`: seconds, 0 for none."""

GROUP_IDS: TypeAdapter[list[str] | None] = TypeAdapter(
    list[Id] | None, config=ConfigDict(title="group_ids")
)

MAX_BLOCKING_THREADS = 256
BLOCKING_THREADS: TypeAdapter[int] = TypeAdapter(
    Annotated[int, Field(strict=True, ge=1, le=MAX_BLOCKING_THREADS)],
    config=ConfigDict(title="blocking_threads"),
)
"""The `blocking_threads` of `AsyncRuntime.start` and `wrap`: its executor's threads."""


# -- memory blocks from the application (issue 19) ----------------------------------------


BlockLabel = Id
"""A label to look a block up by: storable text of 1 to 64 characters (one that is not a
valid label is simply not there)."""
BLOCK_LABEL: TypeAdapter[str] = TypeAdapter(BlockLabel, config=ConfigDict(title="label"))


class BlockHistoryPage(BaseModel):
    """The arguments of `block_history` besides the agent: a label, a page."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="block_history")
    label: BlockLabel
    limit: int | None = Field(default=None, ge=1, le=INT32_MAX)
    after: int | None = Field(default=None, ge=0, le=2**63 - 1)


BLOCK_HISTORY_PAGE: TypeAdapter[BlockHistoryPage] = TypeAdapter(BlockHistoryPage)
# -- paging (issue 19) ----------------------------------------------------------------------

PAGE_LIMIT = Field(default=None, ge=1, le=INT32_MAX)


class GroupFilters(BaseModel):
    """The filters and page of `list_groups`."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="list_groups")
    statuses: list[Literal["active", "failed"]] | None = None
    primary_kind: Kind | None = None
    limit: int | None = PAGE_LIMIT
    after: Id | None = None


class MessagePage(BaseModel):
    """The page of `list_messages`: `limit` messages after the message `after`."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="list_messages")
    limit: int | None = PAGE_LIMIT
    after: Id | None = None


class EventPage(BaseModel):
    """The page of `run_events`: `limit` events after the event with id `after`."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="run_events")
    limit: int | None = PAGE_LIMIT
    after: Annotated[int, Field(strict=True, ge=1, le=2**63 - 1)] | None = None
