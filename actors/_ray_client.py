"""RayRuntime: the Runtime's calls (SPEC 11) on a Ray cluster of shard hosts (SPEC 16).

Each call about a group goes to the host that owns the group's shard: the client keeps
the owner of each shard it has met (`ShardRoutes`), asks any host `owner_of` for a
shard it has not, and learns again when a host answers `NotOwner` (naming the owner's
actor) or fails. What it does after a failure is `recourse`'s decision
(`actors._ray_routes`): go to the owner named, or wait a little (`Backoff`) and look
again, or raise the error as `Runtime` would.

A turn (`step`, `record_turn`, `stream`) sent over Ray always carries a request id (the
caller's, or a new one), so when a host dies mid-turn the retry at the shard's next owner
is answered from the store if the turn had committed: never recorded twice.
`wait_for_runs` asks each owner for its own runs, all at once. Reads go to any host
(the database answers them), `create_group` places the group on the hosts in turn.

Inside a shard host (`ShardHost.call`), a client made with `local=` serves the host's own
groups through its runtime directly, with no Ray call, and routes the others.

Example:
    >>> rt = RayRuntime.connect("sleeptime")                  # the hosts of a namespace
    >>> group = rt.create_group(primary={"kind": "scripted"}, sleeptime=[{"kind": "memory"}])
    >>> result = rt.step(group.id, [MessageCreate(role="user", content="hi")])
    >>> rt.wait_for_runs(result.run_ids, timeout=30)
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import ray
import structlog
from ray.exceptions import GetTimeoutError, RayActorError

from actors._arguments import REQUEST_ID, TURN_TIMEOUT, RunWait
from actors._invariants import InvariantReport
from actors._ray_routes import (
    DEFAULT_NAMESPACE,
    Backoff,
    HostDirectory,
    HostGone,
    HostInfo,
    Recourse,
    ShardRoutes,
    parse_address,
    recourse,
    unwrap,
)
from actors.kinds._registry import _Registration
from actors.runtime import _MESSAGES, DEFAULT_PRUNE_BATCH, Runtime, TurnStream
from actors.sdk import AGENT_ROLES, AgentFactory, AgentRole
from messages import (
    DEFAULT_BLOCK_LIMIT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RUN_TIMEOUT,
    Agent,
    AgentNotFound,
    AgentSpec,
    Block,
    BlockCreate,
    Blocks,
    BlockVersion,
    Group,
    GroupNotFound,
    GroupOwner,
    Message,
    MessageCreate,
    NotOwner,
    PruneReport,
    PruneSettings,
    Run,
    RunEvent,
    RunNotFound,
    RunStatus,
    RunsTimeout,
    RuntimeStopped,
    TurnResult,
    TurnTimeout,
)
from messages._blocks import view_not_found
from messages._ids import new_id
from messages._text import check_id

if TYPE_CHECKING:
    from actors.metrics import RuntimeMetrics

log = structlog.get_logger("sleeptime.ray")

T = TypeVar("T")

DEFAULT_RETRY_S = 60.0
"""How long a call without a timeout of its own goes on retrying after hosts failed or
shards moved (a dead host's shards wait for its leases to expire: `lease_s`)."""
RESULT_GRACE_S = 5.0
"""How much longer than a turn's `timeout` a client waits for the host's answer (the
host raises TurnTimeout itself at `timeout`)."""
MAX_REDIRECTS = 8
"""NotOwner answers followed in a row before the client waits instead."""
LOCAL = "local"
"""The target of a call served by the client's own runtime (inside a shard host)."""
_UNSET: Any = object()


def new_request_id() -> str:
    """A request id for a turn whose caller gave none (36 characters; at most 64 allowed)."""
    return f"ray-{uuid.uuid4()}"


@dataclass
class _TurnCall:
    """One turn call, checked: what is sent, and when its caller stops waiting."""

    mode: str
    group_id: str
    messages: list[MessageCreate]
    timeout: float | None
    deadline: float | None
    request_id: str | None
    sent_before: bool = False

    def remaining(self) -> float | None:
        """Seconds left of the caller's timeout (None: no timeout); TurnTimeout if none."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            assert self.timeout is not None
            raise TurnTimeout(self.group_id, self.timeout)
        return left

    def remote_id(self) -> tuple[str, bool]:
        """The request id the turn is sent over Ray with (the caller's, or a new one, the
        same for every retry), and whether it is new: made here and never sent before, so
        the host need not look it up."""
        new = self.request_id is None
        if new:
            self.request_id = new_request_id()
        assert self.request_id is not None
        fresh = new and not self.sent_before
        self.sent_before = True
        return self.request_id, fresh


class RayAgentKinds:
    """The agent kinds of a cluster: `register` reaches every host now, and hosts that
    start later (or restart) get it from a running peer. Pass the kinds a cluster always
    needs to `start_hosts(kinds=...)`: those survive a restart of every host."""

    def __init__(self, client: RayRuntime) -> None:
        self._client = client

    def register(
        self, kind: str, factory: AgentFactory, roles: Sequence[AgentRole] | None = None
    ) -> None:
        """Register (or replace) a kind on every host; a bad name, factory or role raises
        pydantic's ValidationError (the factory must pickle: Ray sends it to the hosts)."""
        _Registration(
            kind=kind,
            factory=factory,
            roles=getattr(factory, "agent_roles", AGENT_ROLES) if roles is None else roles,
        )
        client = self._client
        refs = [
            client._handle(address).register_kind.remote(kind, factory, roles)
            for address in client._host_addresses()
        ]
        for ref in refs:
            client._get(ref)

    def names(self) -> list[str]:
        names: list[str] = self._client._any_host("kind_names")
        return names

    def __contains__(self, kind: object) -> bool:
        return kind in self.names()


class RayTurnStream(Iterator[Message]):
    """A streamed turn on a cluster: the primary agent's messages as its host produces
    them; `result` is the turn's `TurnResult`; `close()` stops listening (the turn runs
    to its end anyway). Like `Runtime.stream`'s, with one more guarantee: if the host dies
    mid-stream, the turn is sent again to the shard's next owner with the same request
    id, and the messages already yielded are not yielded again."""

    def __init__(self, client: RayRuntime, call: _TurnCall) -> None:
        self._client = client
        self._call = call
        self._backoff = client._backoff(call.deadline)
        self._seen: set[str] = set()
        self._local: TurnStream | None = None
        self._remote: Any = None  # Ray's ObjectRefGenerator of the host's stream
        self._result: TurnResult | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._closed = False
        self._open()

    def _open(self) -> None:
        """Send the turn to the owner of its group (again, after a failure); returns once
        the turn was sent, raising what kept it from being sent."""
        call, client = self._call, self._client

        def attempt(target: str) -> None:
            if target == LOCAL:
                assert client._local is not None
                self._local = client._local.stream(
                    call.group_id, call.messages, call.remaining(), request_id=call.request_id
                )
                self._remote = None
                return
            generator = client._handle(target).stream.remote(
                call.group_id, call.messages, call.remaining(), *call.remote_id()
            )
            client._get(next(generator))  # StreamSent, or what kept the turn from going
            self._local, self._remote = None, generator

        client._routed(call.group_id, attempt, self._backoff)

    def _next_item(self) -> Message | TurnResult:
        if self._local is not None:
            try:
                return next(self._local)
            except StopIteration:
                return self._local.result
        try:
            ref = next(self._remote)
        except StopIteration:
            raise RuntimeError("a shard host's stream ended without its result") from None
        item: Message | TurnResult = self._client._get(ref)
        return item

    def _advance(self) -> Message | None:
        """The next message not yielded yet; None at the end (the result is kept)."""
        while not self._ended:
            try:
                item = self._next_item()
            except BaseException as raised:
                error = unwrap(raised)
                if recourse(error) is Recourse.GIVE_UP or not self._retry(error):
                    self._ended, self._error = True, error
                    raise error from None
                continue
            if isinstance(item, TurnResult):
                self._ended, self._result = True, item
                return None
            if item.id not in self._seen:
                self._seen.add(item.id)
                return item
        return None

    def _retry(self, error: BaseException) -> bool:
        """After a failure mid-stream: send the turn again; False once out of time."""
        client = self._client
        if isinstance(error, NotOwner) and parse_address(error.address) is not None:
            client._routes.learn(self._call.group_id, str(error.address))
        else:
            client._routes.forget(self._call.group_id)
            pause = self._backoff.next_pause()
            if pause is None:
                return False
            time.sleep(pause)
        log.info("ray_stream_resent", group_id=self._call.group_id, error=type(error).__name__)
        self._open()
        return True

    def __next__(self) -> Message:
        if self._closed or self._ended:
            raise StopIteration
        message = self._advance()
        if message is None:
            raise StopIteration
        return message

    @property
    def result(self) -> TurnResult:
        """The whole turn's result, once it has ended (raises the turn's error)."""
        while not self._ended:
            self._advance()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Stop consuming; the turn still completes and is recorded."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RayRuntime:
    """The Runtime's calls on a Ray cluster of shard hosts: same arguments, results and
    errors, each call routed to the host that owns its group.

    Make one with `RayRuntime.connect(namespace)` (the hosts of that namespace on the
    Ray this process is connected to) or `RayCluster.client()`. `stop()` stops the client
    only: the hosts go on serving. Safe to call from many threads.

    `retry_timeout` bounds how long a call without a timeout of its own goes on retrying
    after a host failed or a shard moved; past it the last error is raised.
    """

    def __init__(
        self,
        directory: HostDirectory,
        shards: int,
        *,
        local: Runtime | None = None,
        retry_timeout: float = DEFAULT_RETRY_S,
    ) -> None:
        self._directory = directory
        self._routes = ShardRoutes(shards)
        self._local = local
        self.retry_timeout = retry_timeout
        self.agents = RayAgentKinds(self)
        self.read_only = False
        self.retries = 0
        """Calls sent again after a host failed or a shard moved (for monitoring)."""
        self._stopped = threading.Event()

    @classmethod
    def connect(
        cls, namespace: str = DEFAULT_NAMESPACE, *, retry_timeout: float = DEFAULT_RETRY_S
    ) -> RayRuntime:
        """A client of the shard hosts running in `namespace` (HostGone if there are none)."""
        directory = HostDirectory(namespace)
        if not directory.refresh():
            raise HostGone(f"ray:{namespace}/ (no shard host in this namespace)")
        client = cls(directory, shards=1, retry_timeout=retry_timeout)
        info: HostInfo = client._any_host("info")
        client._routes = ShardRoutes(info.shards)
        return client

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop this client (its calls raise RuntimeStopped); the hosts go on serving.
        `drain_timeout` is accepted for `Runtime`'s signature: there is nothing to drain."""
        self._stopped.set()

    def _check(self) -> None:
        if self._stopped.is_set():
            raise RuntimeStopped()

    def hosts(self) -> list[HostInfo]:
        """Every shard host of the namespace as it describes itself (those answering)."""
        refs = [self._handle(a).info.remote() for a in self._host_addresses()]
        found = []
        for ref in refs:
            try:
                found.append(self._get(ref))
            except (RayActorError, HostGone, GetTimeoutError):
                continue
        return found

    # -- calling hosts --------------------------------------------------------------------

    def _handle(self, address: str) -> Any:
        return self._directory.handle(address)

    def _host_addresses(self) -> list[str]:
        return [self._directory.address(name) for name in self._directory.refresh()]

    @staticmethod
    def _get(ref: Any, timeout: float | None = None) -> Any:
        """A host's answer; the error it raised, as it raised it."""
        try:
            return ray.get(ref, timeout=timeout)
        except BaseException as error:
            raise unwrap(error) from None

    def _call(self, address: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        return self._get(getattr(self._handle(address), method).remote(*args), timeout)

    def _backoff(self, deadline: float | None) -> Backoff:
        return Backoff(deadline) if deadline is not None else Backoff.within(self.retry_timeout)

    def _any_host(self, method: str, *args: Any) -> Any:
        """`method` on any host that answers (passing over failed ones)."""
        backoff = Backoff.within(self.retry_timeout)
        while True:
            address: str | None = None
            try:
                address = self._directory.any()
                return self._call(address, method, *args)
            except BaseException as raised:
                error = unwrap(raised)
                if not isinstance(error, RayActorError | HostGone | RuntimeStopped):
                    raise error from None
                if address is not None:
                    self._directory.failed(address)
                pause = backoff.next_pause()
                if pause is None:
                    raise error from None
                time.sleep(pause)

    def _read(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A call any host answers (it reads the database): here if this client has a
        runtime of its own, else on any host."""
        self._check()
        if self._local is not None and not self._local.stopped:
            return getattr(self._local, name)(*args, **kwargs)
        return self._any_host("read", name, args, kwargs)

    def _target(self, group_id: str) -> str:
        """Where a call about the group goes: LOCAL, or the owner's address."""
        if self._local is not None and self._local._store.serves(group_id):
            return LOCAL
        known = self._routes.owner(group_id)
        if known is not None:
            return known
        owner: GroupOwner = self._read("owner_of", group_id)
        if owner.address is None or parse_address(owner.address) is None:
            # Between owners (or served by a process that is not a shard host): wait.
            raise NotOwner(group_id, owner.shard, owner.owner, owner.address)
        self._routes.learn(group_id, owner.address)
        return owner.address

    def _routed(self, group_id: str, attempt: Callable[[str], T], backoff: Backoff) -> T:
        """`attempt(target)` at the owner of the group's shard; again, at the owner as
        learned then, after each failure that `recourse` says to retry, until `backoff`
        runs out (then the last error is raised)."""
        redirects = 0
        while True:
            target: str | None = None
            try:
                target = self._target(group_id)
                return attempt(target)
            except BaseException as raised:
                error = unwrap(raised)
                move = recourse(error)
                if move is Recourse.GIVE_UP:
                    raise error from None
                if move is Recourse.GO_TO_OWNER and redirects < MAX_REDIRECTS:
                    assert isinstance(error, NotOwner) and error.address is not None
                    redirects += 1
                    self.retries += 1
                    self._routes.learn(group_id, error.address)
                    continue
                self._routes.forget(group_id)
                if target not in (None, LOCAL) and isinstance(error, RayActorError | HostGone):
                    self._directory.failed(str(target))
                pause = backoff.next_pause()
                if pause is None:
                    raise error from None
                log.info("ray_call_retried", group_id=group_id, error=type(error).__name__)
                self.retries += 1
                redirects = 0
                time.sleep(pause)

    # -- turns ----------------------------------------------------------------------------

    def _prepare(
        self,
        mode: str,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None,
        request_id: str | None,
    ) -> _TurnCall:
        """Check a turn call as `Runtime` does (ValidationError, RuntimeStopped)."""
        group_id = check_id(group_id, "group_id")
        request_id = REQUEST_ID.validate_python(request_id)
        self._check()
        limit = TURN_TIMEOUT.validate_python(timeout)
        inputs = _MESSAGES.validate_python(messages)
        deadline = None if limit is None else time.monotonic() + limit
        return _TurnCall(mode, group_id, inputs, limit, deadline, request_id)

    def _turn(self, call: _TurnCall) -> TurnResult:
        def attempt(target: str) -> TurnResult:
            remaining = call.remaining()
            if target == LOCAL:
                assert self._local is not None
                method: Callable[..., TurnResult] = getattr(self._local, call.mode)
                return method(call.group_id, call.messages, remaining, request_id=call.request_id)
            wait = None if remaining is None else remaining + RESULT_GRACE_S
            try:
                result: TurnResult = self._call(
                    target,
                    call.mode,
                    call.group_id,
                    call.messages,
                    remaining,
                    *call.remote_id(),
                    timeout=wait,
                )
            except GetTimeoutError:
                assert call.timeout is not None
                raise TurnTimeout(call.group_id, call.timeout) from None
            return result

        return self._routed(call.group_id, attempt, self._backoff(call.deadline))

    def step(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult:
        """`Runtime.step` at the group's host: run the primary agent on `messages` and
        apply the sleeptime rules (SPEC 4-7). Retried at the shard's next owner if the
        host fails, with the same request id (a new one if none was given)."""
        return self._turn(self._prepare("step", group_id, messages, timeout, request_id))

    def record_turn(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> TurnResult:
        """`Runtime.record_turn` at the group's host (retried as `step` is)."""
        return self._turn(self._prepare("record_turn", group_id, messages, timeout, request_id))

    def stream(
        self,
        group_id: str,
        messages: Sequence[MessageCreate | Mapping[str, Any]],
        timeout: float | None = None,
        *,
        request_id: str | None = None,
    ) -> RayTurnStream:
        """`Runtime.stream` at the group's host: returns once the turn is sent (raising
        what kept it from being sent), then yields the messages as they are produced."""
        return RayTurnStream(self, self._prepare("stream", group_id, messages, timeout, request_id))

    # -- runs -----------------------------------------------------------------------------

    def wait_for_runs(self, run_ids: Sequence[str], timeout: float | None = None) -> list[Run]:
        """Wait until every run is terminal and return them, in the order asked: each
        owner is asked for its own runs, all at once. RunsTimeout names the runs still
        open (on every host) once `timeout` seconds passed."""
        asked = RunWait(run_ids=run_ids, timeout=timeout)
        ids, timeout = asked.run_ids, asked.timeout
        self._check()
        if not ids:
            return []
        backoff = self._backoff(None if timeout is None else time.monotonic() + timeout)
        wanted = list(dict.fromkeys(ids))
        stored = self._stored_runs(wanted)
        for run_id in wanted:
            if run_id not in stored:
                raise RunNotFound(run_id)
        done = {i: run for i, run in stored.items() if run.status.terminal}
        still_open: list[str] = []
        waiting = [i for i in wanted if i not in done]
        while waiting:
            ended, failed, timed_out = self._wait_at_owners(waiting, stored, backoff, timeout)
            done.update(ended)
            still_open += timed_out
            waiting = failed
            if waiting:
                pause = backoff.next_pause()
                if pause is None:
                    still_open += waiting
                    break
                time.sleep(pause)
        if still_open:
            order = {run_id: n for n, run_id in enumerate(ids)}
            raise RunsTimeout(sorted(set(still_open), key=order.__getitem__), timeout or 0.0)
        return [done[i] for i in ids]

    def _wait_at_owners(
        self,
        run_ids: list[str],
        stored: dict[str, Run],
        backoff: Backoff,
        timeout: float | None,
    ) -> tuple[dict[str, Run], list[str], list[str]]:
        """Ask each owner to wait for its runs, at once: (runs ended, ids to ask again
        (their host failed or moved them), ids still open when the time ran out)."""
        by_target: dict[str, list[str]] = {}
        failed: list[str] = []
        for run_id in run_ids:
            group_id = stored[run_id].group_id
            try:
                by_target.setdefault(self._target(group_id), []).append(run_id)
            except BaseException as raised:
                error = unwrap(raised)
                if recourse(error) is Recourse.GIVE_UP:
                    raise error from None
                failed.append(run_id)
        left = None if timeout is None else backoff.remaining()
        refs = {
            target: self._handle(target).wait_for_runs.remote(ids, left)
            for target, ids in by_target.items()
            if target != LOCAL
        }
        ended: dict[str, Run] = {}
        timed_out: list[str] = []

        def collect(target: str, wait: Callable[[], list[Run]]) -> None:
            try:
                ended.update((run.id, run) for run in wait())
            except BaseException as raised:
                error = unwrap(raised)
                if isinstance(error, RunsTimeout):
                    timed_out.extend(error.open_run_ids)
                    return
                if recourse(error) is Recourse.GIVE_UP:
                    raise error from None
                for run_id in by_target[target]:
                    self._routes.forget(stored[run_id].group_id)
                if target != LOCAL and isinstance(error, RayActorError | HostGone):
                    self._directory.failed(target)
                failed.extend(by_target[target])

        if LOCAL in by_target:
            local = self._local
            assert local is not None
            collect(LOCAL, lambda: local.wait_for_runs(by_target[LOCAL], left))
        for target, ref in refs.items():
            collect(target, functools.partial(self._get, ref))
        return ended, failed, timed_out

    def _stored_runs(self, run_ids: list[str]) -> dict[str, Run]:
        """The runs as stored, those that exist (here, or on any host)."""
        if self._local is not None and not self._local.stopped:
            return self._local._store.get_runs(run_ids)
        stored: dict[str, Run] = self._any_host("stored_runs", run_ids)
        return stored

    def get_run(self, run_id: str) -> Run:
        """The run as stored (any host answers)."""
        run: Run = self._read("get_run", check_id(run_id, "run_id"))
        return run

    def list_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        *,
        after: str | None = None,
    ) -> list[Run]:
        """Runs oldest first (or newest first), filtered by agent, group and status; a
        page of `limit` after the run `after` (see `Runtime.list_runs`)."""
        runs: list[Run] = self._read(
            "list_runs",
            agent_id=agent_id,
            group_id=group_id,
            statuses=None if statuses is None else list(statuses),
            limit=limit,
            newest_first=newest_first,
            after=after,
        )
        return runs

    def count_runs(
        self,
        agent_id: str | None = None,
        group_id: str | None = None,
        statuses: Sequence[RunStatus | str] | None = None,
    ) -> int:
        """How many runs `list_runs` would return with these filters."""
        count: int = self._read(
            "count_runs",
            agent_id=agent_id,
            group_id=group_id,
            statuses=None if statuses is None else list(statuses),
        )
        return count

    def run_events(
        self, run_id: str, *, limit: int | None = None, after: int | None = None
    ) -> list[RunEvent]:
        """Every status change of the run, oldest first (a page: see `Runtime.run_events`)."""
        events: list[RunEvent] = self._read(
            "run_events", check_id(run_id, "run_id"), limit=limit, after=after
        )
        return events

    def cancel_run(self, run_id: str) -> Run:
        """Cancel a run at its group's host (a terminal run is returned as it is)."""
        run = self.get_run(run_id)
        if run.status.terminal:
            return run

        def attempt(target: str) -> Run:
            if target == LOCAL:
                assert self._local is not None
                return self._local.cancel_run(run.id)
            cancelled: Run = self._call(target, "cancel_run", run.id)
            return cancelled

        return self._routed(run.group_id, attempt, self._backoff(None))

    # -- groups ---------------------------------------------------------------------------

    def create_group(
        self,
        primary: AgentSpec | Mapping[str, Any],
        sleeptime: Sequence[AgentSpec | Mapping[str, Any]],
        frequency: int | None = None,
        blocks: Mapping[str, str | BlockCreate | Mapping[str, Any]] | None = None,
        preamble: str | None = None,
        transcript_max_messages: int | None = None,
        run_timeout: float = DEFAULT_RUN_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Group:
        """`Runtime.create_group` on one of the hosts, in turn (in a shard it holds).

        A host that dies before it answers may have created the group: the call is made
        again on another host, and that group, which nobody was told of, stays empty."""
        self._check()
        arguments: dict[str, Any] = {
            "primary": primary,
            "sleeptime": list(sleeptime) if isinstance(sleeptime, Sequence) else sleeptime,
            "frequency": frequency,
            "blocks": blocks,
            "preamble": preamble,
            "transcript_max_messages": transcript_max_messages,
            "run_timeout": run_timeout,
            "max_attempts": max_attempts,
        }
        local = self._local
        if local is not None and not local.stopped and local._store.book.held():
            try:
                return local.create_group(**arguments)
            except NotOwner:
                pass  # its shards are all moving: another host takes it
        backoff = Backoff.within(self.retry_timeout)
        while True:
            address: str | None = None
            try:
                address = self._directory.any()
                group: Group = self._call(address, "create_group", arguments)
            except BaseException as raised:
                error = unwrap(raised)
                if recourse(error) is Recourse.GIVE_UP:
                    raise error from None
                if address is not None:
                    self._directory.failed(address)  # holds no shard now, or failed
                pause = backoff.next_pause()
                if pause is None:
                    raise error from None
                time.sleep(pause)
                continue
            self._routes.learn(group.id, address)
            return group

    def get_group(self, group_id: str) -> Group:
        """The group as stored (any host answers)."""
        group: Group = self._read("get_group", check_id(group_id, "group_id"))
        return group

    def list_groups(
        self,
        *,
        statuses: Sequence[str] | None = None,
        primary_kind: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Group]:
        """`Runtime.list_groups`: groups oldest first, filtered, a page at a time."""
        groups: list[Group] = self._read(
            "list_groups",
            statuses=None if statuses is None else list(statuses),
            primary_kind=primary_kind,
            limit=limit,
            after=after,
        )
        return groups

    def count_groups(self) -> int:
        """`Runtime.count_groups`: the groups stored (any host reads it)."""
        count: int = self._read("count_groups")
        return count

    @property
    def metrics(self) -> RuntimeMetrics | None:
        """The metrics of this client's own runtime, if it has one (a client inside a shard
        host); otherwise None: each shard host keeps its own, scrape each host."""
        return None if self._local is None else self._local.metrics

    def update_group(
        self,
        group_id: str,
        *,
        frequency: int | None = _UNSET,
        preamble: str | None = _UNSET,
        transcript_max_messages: int | None = _UNSET,
        run_timeout: float = _UNSET,
        max_attempts: int = _UNSET,
    ) -> Group:
        """`Runtime.update_group` at the group's host: the counter is kept."""
        group_id = check_id(group_id, "group_id")
        self._check()
        changes: dict[str, Any] = {
            name: value
            for name, value in {
                "frequency": frequency,
                "preamble": preamble,
                "transcript_max_messages": transcript_max_messages,
                "run_timeout": run_timeout,
                "max_attempts": max_attempts,
            }.items()
            if value is not _UNSET
        }

        def attempt(target: str) -> Group:
            if target == LOCAL:
                assert self._local is not None
                return self._local.update_group(group_id, **changes)
            updated: Group = self._call(target, "update_group", group_id, changes)
            return updated

        return self._routed(group_id, attempt, self._backoff(None))

    # -- groups over their life -----------------------------------------------------------

    def delete_group(self, group_id: str) -> None:
        """`Runtime.delete_group` at the group's host. A retry after the host failed
        mid-call that finds the group gone takes it as done (the first try deleted it)."""
        group_id = check_id(group_id, "group_id")
        self._check()
        tries = 0

        def attempt(target: str) -> None:
            nonlocal tries
            tries += 1
            try:
                if target == LOCAL:
                    assert self._local is not None
                    self._local.delete_group(group_id)
                else:
                    self._call(target, "delete_group", group_id)
            except BaseException as raised:
                if tries > 1 and isinstance(unwrap(raised), GroupNotFound):
                    return
                raise

        self._routed(group_id, attempt, self._backoff(None))

    def add_sleeptime_agent(
        self,
        group_id: str,
        spec: AgentSpec | Mapping[str, Any],
        *,
        backfill: bool = False,
        backfill_window: int | None = None,
    ) -> Agent:
        """`Runtime.add_sleeptime_agent` at the group's host. The agent's id is made here,
        before the first try: a retry after a host failed mid-call answers with the agent
        that try added, never a second one."""
        group_id = check_id(group_id, "group_id")
        self._check()
        agent_id = new_id("agent")

        def attempt(target: str) -> Agent:
            if target == LOCAL:
                assert self._local is not None
                return self._local._add_sleeptime_agent(
                    group_id, spec, backfill, backfill_window, agent_id
                )
            added: Agent = self._call(
                target, "add_sleeptime_agent", group_id, spec, backfill, backfill_window, agent_id
            )
            return added

        return self._routed(group_id, attempt, self._backoff(None))

    def remove_sleeptime_agent(self, group_id: str, agent_id: str) -> Agent:
        """`Runtime.remove_sleeptime_agent` at the group's host (a retry finds the agent
        removed and returns it as it is)."""
        group_id = check_id(group_id, "group_id")
        agent_id = check_id(agent_id, "agent_id")
        self._check()

        def attempt(target: str) -> Agent:
            if target == LOCAL:
                assert self._local is not None
                return self._local.remove_sleeptime_agent(group_id, agent_id)
            removed: Agent = self._call(target, "remove_sleeptime_agent", group_id, agent_id)
            return removed

        return self._routed(group_id, attempt, self._backoff(None))

    def owner_of(self, group_id: str) -> GroupOwner:
        """Who serves the group (SPEC 15); its `address` names the shard host's actor.
        `here` says whether the host that answered serves it."""
        owner: GroupOwner = self._read("owner_of", check_id(group_id, "group_id"))
        return owner

    # -- memory, history, checks ----------------------------------------------------------

    def get_agent(self, agent_id: str) -> Agent:
        agent: Agent = self._read("get_agent", check_id(agent_id, "agent_id"))
        return agent

    def get_blocks(self, agent_id: str) -> Blocks:
        """The memory blocks as the agent sees them, as committed (any host answers)."""
        blocks: Blocks = self._read("get_blocks", check_id(agent_id, "agent_id"))
        return blocks

    def list_messages(
        self, agent_id: str, *, limit: int | None = None, after: str | None = None
    ) -> list[Message]:
        """`Runtime.list_messages`: an agent's history, oldest first, a page at a time."""
        messages: list[Message] = self._read(
            "list_messages", check_id(agent_id, "agent_id"), limit=limit, after=after
        )
        return messages

    # -- memory blocks from the application (issue 19) -----------------------------------

    def get_block(self, agent_id: str, label: str) -> Block:
        """`Runtime.get_block`: the block as committed (any host answers)."""
        block: Block = self._read("get_block", check_id(agent_id, "agent_id"), label)
        return block

    def set_block(self, agent_id: str, label: str, value: str) -> Block:
        """`Runtime.set_block` at the host serving the block's group."""
        return self._block_write(agent_id, "set_block", label, value)

    def create_block(
        self,
        agent_id: str,
        label: str,
        value: str = "",
        *,
        limit: int = DEFAULT_BLOCK_LIMIT,
        read_only: bool = False,
        description: str | None = None,
    ) -> Block:
        """`Runtime.create_block` at the host serving the group."""
        options = {"limit": limit, "read_only": read_only, "description": description}
        return self._block_write(agent_id, "create_block", label, value, options)

    def delete_block(self, agent_id: str, label: str) -> Block:
        """`Runtime.delete_block` at the host serving the block's group."""
        return self._block_write(agent_id, "delete_block", label)

    def block_history(
        self, agent_id: str, label: str, limit: int | None = None, after: int | None = None
    ) -> list[BlockVersion]:
        """`Runtime.block_history` (any host reads it)."""
        versions: list[BlockVersion] = self._read(
            "block_history", check_id(agent_id, "agent_id"), label, limit, after
        )
        return versions

    def _block_write(self, agent_id: str, method: str, *args: Any) -> Block:
        """A block write at the owner of the group `agent_id` names (an agent's, or the
        group itself), found by reading the database."""
        agent_id = check_id(agent_id, "agent_id")
        self._check()
        try:
            group_id = self.get_agent(agent_id).group_id
        except AgentNotFound:
            try:
                group_id = self.get_group(agent_id).id
            except GroupNotFound:
                raise view_not_found(agent_id) from None

        def attempt(target: str) -> Block:
            if target == LOCAL:
                assert self._local is not None
                local: Callable[..., Block] = getattr(self._local, method)
                if method == "create_block":
                    *given, options = args
                    return local(agent_id, *given, **options)
                return local(agent_id, *args)
            block: Block = self._call(target, method, agent_id, *args)
            return block

        return self._routed(group_id, attempt, self._backoff(None))

    def check_invariants(self, group_ids: Sequence[str] | None = None) -> InvariantReport:
        """`Runtime.check_invariants` over what is stored (any host reads it)."""
        report: InvariantReport = self._read(
            "check_invariants", None if group_ids is None else list(group_ids)
        )
        return report

    # -- retention (issue 19) -------------------------------------------------------------

    def prune(
        self,
        *,
        before: datetime | None = None,
        keep_runs: int | None = None,
        messages: bool = False,
        keep_messages: int | None = None,
        keep_block_versions: int | None = None,
        group_ids: Sequence[str] | None = None,
        batch_size: int = DEFAULT_PRUNE_BATCH,
        dry_run: bool = False,
    ) -> PruneReport:
        """`Runtime.prune` on every host at once, each over the groups it serves; one
        report (a group is skipped only if no host served it)."""
        PruneSettings(
            before=before,
            keep_runs=keep_runs,
            messages=messages,
            keep_messages=keep_messages,
            keep_block_versions=keep_block_versions,
            batch_size=batch_size,
        )  # bad options are refused here, before any host is asked
        self._check()
        options = {
            "before": before,
            "keep_runs": keep_runs,
            "messages": messages,
            "keep_messages": keep_messages,
            "keep_block_versions": keep_block_versions,
            "group_ids": None if group_ids is None else list(group_ids),
            "batch_size": batch_size,
            "dry_run": dry_run,
        }
        refs = [self._handle(a).prune.remote(options) for a in self._host_addresses()]
        reports: list[PruneReport] = []
        for ref in refs:
            try:
                reports.append(self._get(ref))
            except BaseException as raised:
                error = unwrap(raised)
                if isinstance(error, RayActorError | HostGone | RuntimeStopped):
                    continue  # its groups are served elsewhere next: they show as skipped
                raise error from None
        return PruneReport.merged(reports)

    def stats(self) -> dict[str, int]:
        """Every host's `Runtime.stats()`, added up (hosts that do not answer left out)."""
        refs = [self._handle(a).stats.remote() for a in self._host_addresses()]
        total: dict[str, int] = {}
        for ref in refs:
            try:
                counts: dict[str, int] = self._get(ref)
            except (RayActorError, HostGone, RuntimeStopped):
                continue
            for name, value in counts.items():
                total[name] = total.get(name, 0) + value
        return total
