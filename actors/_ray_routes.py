"""Where a call goes on a Ray cluster: the shard hosts by name, which host owns which
shard, and what a client does after a routed call failed.

A shard host advertises its Ray actor as its runtime's `address` (`ray:<namespace>/<name>`),
so the `NotOwner` raised by a host that does not serve a group names the actor to ask
instead, and `owner_of` answers with it. A client keeps the owner of each shard it has
met (`ShardRoutes`) and learns again after a failure: what it does then is decided by
`recourse`, a pure function of the error.

Example:
    >>> host_address("sleeptime", "shard-host-0")
    'ray:sleeptime/shard-host-0'
    >>> recourse(NotOwner("group-1", 7, "pid 9 on b", "ray:sleeptime/shard-host-1"))
    <Recourse.GO_TO_OWNER: 'go to the owner it names'>
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from messages import NotOwner, RuntimeStopped, ShardLost, SleeptimeError
from persistence._leases import shard_of

ADDRESS_SCHEME = "ray:"
HOST_PREFIX = "shard-host-"
"""Shard hosts are the actors of their namespace whose names start with this."""
DEFAULT_NAMESPACE = "sleeptime"
FAILED_HOST_S = 2.0
"""How long a host whose call failed is passed over when any host will do."""
FIRST_PAUSE_S = 0.05
MAX_PAUSE_S = 1.0


def host_address(namespace: str, name: str) -> str:
    """The address a shard host advertises: its actor's namespace and name."""
    return f"{ADDRESS_SCHEME}{namespace}/{name}"


def parse_address(address: str | None) -> tuple[str, str] | None:
    """(namespace, name) of a shard host's address; None for anything else.

    >>> parse_address("ray:sleeptime/shard-host-2"), parse_address("10.0.0.7:8000")
    (('sleeptime', 'shard-host-2'), None)
    """
    if address is None or not address.startswith(ADDRESS_SCHEME):
        return None
    namespace, _, name = address[len(ADDRESS_SCHEME) :].partition("/")
    return (namespace, name) if namespace and name else None


@dataclass(frozen=True)
class HostInfo:
    """A shard host as it describes itself (`ShardHost.info`)."""

    name: str
    address: str
    pid: int
    node: str
    """The machine it runs on (its host name)."""
    url: str
    """The database it serves (password hidden)."""
    shards: int
    """The database's shard count."""
    held: list[int]
    """The shards it holds now."""
    started_at: float
    """When this incarnation started (`time.time()`): it changes when Ray restarts it."""
    stopped: bool


class Recourse(enum.Enum):
    """What a client does after a routed call failed."""

    GO_TO_OWNER = "go to the owner it names"
    WAIT = "wait, then look the owner up again"
    GIVE_UP = "raise the error to the caller"


def recourse(error: BaseException) -> Recourse:
    """The client's next move after a call failed with `error` (already unwrapped from
    Ray's `RayTaskError`).

    - `NotOwner` naming a shard host: the shard is there; go at once.
    - `NotOwner` naming none (the shard is moving), `ShardLost` (taken over mid-turn:
      nothing was written), `RuntimeStopped` (the host is stopping and handing its
      shards over), a host that died or is restarting (`RayActorError`), or an actor
      that no longer exists: wait a little, ask who owns the shard now, and retry. A
      turn is retried with its request id, so one that did commit is answered from the
      store, never recorded twice.
    - Anything else is the call's own answer (the same errors as `Runtime`'s).

    >>> recourse(ShardLost(3)).name, recourse(ValueError("bad")).name
    ('WAIT', 'GIVE_UP')
    """
    if isinstance(error, NotOwner):
        return Recourse.GO_TO_OWNER if parse_address(error.address) else Recourse.WAIT
    if isinstance(error, ShardLost | RuntimeStopped | RayActorError | HostGone):
        return Recourse.WAIT
    return Recourse.GIVE_UP


def unwrap(error: BaseException) -> BaseException:
    """The error a host raised, out of Ray's wrapper (a failed host stays as it is)."""
    if isinstance(error, RayTaskError):
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return error


class HostGone(SleeptimeError):
    """A shard host that does not exist (any more: removed, or out of restarts), or no
    shard host at all in a namespace."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__(f"the shard host {address} does not exist (any more)")


@dataclass
class Backoff:
    """Pauses between retries, doubling from `FIRST_PAUSE_S` to `MAX_PAUSE_S`, until
    `deadline` (`time.monotonic()`)."""

    deadline: float
    pause: float = FIRST_PAUSE_S

    @classmethod
    def within(cls, seconds: float) -> Backoff:
        return cls(time.monotonic() + seconds)

    def next_pause(self) -> float | None:
        """How long to wait before the next try; None once the deadline has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        pause = min(self.pause, left)
        self.pause = min(2 * self.pause, MAX_PAUSE_S)
        return pause

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class ShardRoutes:
    """The owner of each shard, as last learned: `{shard: address}`. Thread-safe."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self._lock = threading.Lock()
        self._owners: dict[int, str] = {}

    def shard_of(self, group_id: str) -> int:
        return shard_of(group_id, self.shards)

    def owner(self, group_id: str) -> str | None:
        with self._lock:
            return self._owners.get(self.shard_of(group_id))

    def learn(self, group_id: str, address: str) -> None:
        with self._lock:
            self._owners[self.shard_of(group_id)] = address

    def forget(self, group_id: str) -> None:
        with self._lock:
            self._owners.pop(self.shard_of(group_id), None)

    def forget_host(self, address: str) -> None:
        """Every shard learned at `address` (the host failed)."""
        with self._lock:
            for shard in [s for s, a in self._owners.items() if a == address]:
                del self._owners[shard]


class HostDirectory:
    """The shard hosts of one Ray namespace, found by name; their handles kept.

    `any()` picks a host for a call any host can answer (reads), round robin, passing
    over those that failed in the last `FAILED_HOST_S` seconds.
    """

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._handles: dict[str, ActorHandle[Any]] = {}
        self._names: list[str] = []
        self._failed: dict[str, float] = {}
        self._turn = itertools.count()

    def address(self, name: str) -> str:
        return host_address(self.namespace, name)

    def refresh(self) -> list[str]:
        """The hosts' names, as Ray lists the namespace's named actors now."""
        listed = ray.util.list_named_actors(all_namespaces=True)
        names = sorted(
            str(entry["name"])
            for entry in listed
            if isinstance(entry, dict)
            and entry.get("namespace") == self.namespace
            and str(entry.get("name", "")).startswith(HOST_PREFIX)
        )
        with self._lock:
            self._names = names
            for gone in set(self._handles) - {self.address(n) for n in names}:
                self._handles.pop(gone, None)
        return names

    def names(self) -> list[str]:
        with self._lock:
            names = list(self._names)
        return names or self.refresh()

    def cached(self, address: str) -> ActorHandle[Any] | None:
        """The actor at a host's address if its handle is at hand (nothing is looked up)."""
        with self._lock:
            return self._handles.get(address)

    def handle(self, address: str) -> ActorHandle[Any]:
        """The actor at a host's address; HostGone if there is none."""
        with self._lock:
            found = self._handles.get(address)
        if found is not None:
            return found
        parsed = parse_address(address)
        if parsed is None:
            raise HostGone(address)
        namespace, name = parsed
        try:
            found = ray.get_actor(name, namespace=namespace)
        except ValueError:
            raise HostGone(address) from None
        with self._lock:
            self._handles[address] = found
        return found

    def any(self) -> str:
        """The address of a host to ask something any host can answer."""
        names = self.names()
        if not names:
            names = self.refresh()
        if not names:
            raise HostGone(host_address(self.namespace, HOST_PREFIX + "*"))
        now = time.monotonic()
        with self._lock:
            healthy = [n for n in names if self._failed.get(self.address(n), 0.0) <= now]
            pool = healthy or names
            return self.address(pool[next(self._turn) % len(pool)])

    def failed(self, address: str) -> None:
        """A call to the host at `address` failed: pass it over for a while, and look
        its handle up again next time (Ray may have restarted it, or it is gone)."""
        with self._lock:
            self._failed[address] = time.monotonic() + FAILED_HOST_S
            self._handles.pop(address, None)
        self.refresh()
