"""The runtime's own exceptions; each message says what went wrong and what to do.

Malformed input raises pydantic's `ValidationError`; everything else raises a subclass
of `SleeptimeError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SleeptimeError(Exception):
    """Base class of every error the runtime raises on purpose.

    Every one pickles (and so crosses a process boundary: a Ray call, a process pool) as
    itself, with its message and its fields (`group_id`, `result`, ...), whatever its
    `__init__` takes.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds with `cls(*self.args)`, the message alone, which the
        # subclasses' own __init__ refuse.
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(
    cls: type[SleeptimeError], args: tuple[Any, ...], fields: dict[str, Any]
) -> SleeptimeError:
    """An unpickled SleeptimeError: its message and fields as they were, no __init__ run."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(fields)
    return error


class NotFoundError(SleeptimeError, LookupError):
    """An id that the database does not know."""

    kind = "object"

    def __init__(self, object_id: str) -> None:
        self.object_id = object_id
        super().__init__(f"no {self.kind} with id {object_id!r}: check the id, or list them first")


class GroupNotFound(NotFoundError):
    kind = "group"


class RunNotFound(NotFoundError):
    kind = "run"


class AgentNotFound(NotFoundError):
    kind = "agent"


class MessageNotFound(NotFoundError):
    """A message id (a paging cursor, `after=`) that names no message of the agent: a
    wrong id, or one removed by retention since (start again without `after`)."""

    kind = "message"


class RunEventNotFound(NotFoundError):
    """A run event id (a paging cursor, `after=`) that names no event of the run."""

    kind = "run event"


class BlockVersionNotFound(NotFoundError):
    """A block version id (a paging cursor of `block_history`, `after=`) that names no
    version of the block: a wrong id, or one removed by retention since (start again
    without `after`)."""

    kind = "block version"


class RuntimeStopped(SleeptimeError):
    """A call reached a runtime that was stopped (or is stopping)."""

    def __init__(self) -> None:
        super().__init__("the runtime is stopped: start a new one with Runtime.start(url)")


class ReadOnlyRuntime(SleeptimeError):
    """A call that would change the database reached a runtime opened read-only."""

    def __init__(self, action: str) -> None:
        super().__init__(
            f"cannot {action}: this runtime was opened with read_only=True (for inspection); "
            "start one with Runtime.start(url) to change anything"
        )


class TransitionRefused(SleeptimeError):
    """A run status change that the state machine does not allow, or one the store
    refused because the stored run is no longer at that status and `attempt` (a late
    write from an earlier attempt)."""

    def __init__(self, run_id: str, current: str, new: str, attempt: int | None = None) -> None:
        self.run_id, self.current, self.new, self.attempt = run_id, current, new, attempt
        if attempt is None:
            super().__init__(f"run {run_id} cannot go from {current!r} to {new!r}")
        else:
            super().__init__(
                f"run {run_id} cannot go from {current!r} at attempt {attempt} to {new!r}: "
                "the stored run has another status or a later attempt"
            )


class UnknownAgentKind(SleeptimeError):
    """An agent spec names a kind that no one registered with this runtime."""

    def __init__(self, kind: str, known: Sequence[str]) -> None:
        self.kind = kind
        super().__init__(
            f"agent kind {kind!r} is not registered; known kinds: {', '.join(sorted(known))}. "
            f"Register it with rt.agents.register({kind!r}, factory) or Runtime.start(url, "
            f"kinds={{{kind!r}: factory}})"
        )


class AgentConfigError(SleeptimeError):
    """An agent kind rejected its config."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(f"invalid config for agent kind {kind!r}: {detail}")


class PrimaryAgentError(SleeptimeError):
    """The primary agent failed during a turn.

    The turn was still recorded (input, what the agent produced before failing, the
    counter bump and any runs); `result` is that turn's `TurnResult`.
    """

    def __init__(self, group_id: str, detail: str, result: Any = None) -> None:
        self.group_id = group_id
        self.result = result
        super().__init__(f"primary agent of group {group_id} failed: {detail}")


class RunsTimeout(SleeptimeError, TimeoutError):
    """`wait_for_runs` ran out of time; `open_run_ids` are the runs not yet terminal."""

    def __init__(self, open_run_ids: Sequence[str], timeout: float) -> None:
        self.open_run_ids = list(open_run_ids)
        super().__init__(
            f"{len(self.open_run_ids)} run(s) still open after {timeout:g}s: "
            + ", ".join(self.open_run_ids)
        )


class StoreUnavailable(SleeptimeError):
    """The database could not be reached or refused the operation."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        super().__init__(f"database {url} is unavailable: {detail}")


class DatabaseInUse(SleeptimeError):
    """Another runtime owns this database; two runtimes never drive the same groups."""

    def __init__(self, url: str, holder: str) -> None:
        self.url, self.holder = url, holder
        super().__init__(
            f"database {url} is in use by another runtime ({holder}): stop that runtime "
            "first, or open this one with read_only=True to inspect"
        )


class OwnershipLost(SleeptimeError):
    """This runtime found its database owned by another one, and stopped writing to it.

    No longer raised: since revision 0004 PostgreSQL databases are shared under shard
    leases, and a process that lost a shard gets `ShardLost` (a call for a group owned
    elsewhere, `NotOwner`); a SQLite file stays locked by its owner for its whole life.
    Kept so that code catching it still imports.
    """

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        super().__init__(
            f"this runtime no longer owns database {url} and has stopped writing to it: "
            f"{detail}; stop it (another runtime owns the database now)"
        )


class TurnTimeout(SleeptimeError, TimeoutError):
    """A turn's caller stopped waiting after `timeout` seconds; the turn itself still
    completes and is recorded (read it back with `list_messages` or `get_group`)."""

    def __init__(self, group_id: str, timeout: float) -> None:
        self.group_id = group_id
        self.timeout = timeout
        super().__init__(
            f"the turn on group {group_id} did not end within {timeout:g}s; it still "
            "completes and is recorded: read the group back to see it"
        )


class GroupBusy(SleeptimeError):
    """The group already has `limit` turns queued (`max_queued_turns`): nothing was sent.

    A web service answers it with HTTP 429: the caller should retry a little later."""

    def __init__(self, group_id: str, limit: int) -> None:
        self.group_id = group_id
        self.limit = limit
        super().__init__(
            f"group {group_id} already has {limit} turn(s) queued (max_queued_turns={limit}); "
            "nothing was sent: retry later, or start the runtime with a larger max_queued_turns"
        )


class RuntimeBusy(SleeptimeError):
    """`limit` turns were in flight (`max_turns_in_flight`) and none ended within
    `waited` seconds of the call: nothing was sent.

    A web service answers it with HTTP 503 (or 429): the caller should retry later."""

    def __init__(self, limit: int, waited: float) -> None:
        self.limit = limit
        self.waited = waited
        super().__init__(
            f"the runtime has {limit} turn(s) in flight (max_turns_in_flight={limit}) and "
            f"none ended within {waited:g}s; nothing was sent: retry later, or start the "
            "runtime with a larger max_turns_in_flight or permit_timeout"
        )


class SchemaMismatch(SleeptimeError):
    """The database's schema is not the one this code uses."""


class StoreRejected(SleeptimeError):
    """The database refused a statement (a constraint, a bad value): retrying won't help."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        super().__init__(f"database {url} refused the write: {detail}")


class GroupFailed(SleeptimeError):
    """The group was stopped after repeated crashes; it takes no more turns."""

    def __init__(self, group_id: str, reason: str) -> None:
        self.group_id = group_id
        self.reason = reason
        super().__init__(f"group {group_id} has failed and takes no turns: {reason}")


class AgentRoleError(SleeptimeError):
    """An agent spec puts a kind in a role it cannot play (e.g. `memory` as the primary)."""

    def __init__(self, kind: str, role: str, supported: Sequence[str]) -> None:
        self.kind, self.role, self.supported = kind, role, list(supported)
        roles = " and ".join(f"{r!r}" for r in self.supported) or "no role"
        super().__init__(
            f"agent kind {kind!r} cannot be a {role} agent: it supports {roles} only; "
            f"use another kind for the {role} agent"
        )


class RuntimeFailed(SleeptimeError):
    """The runtime's run tracker crashed too often: the runtime takes no more work.

    What is stored stays as it is; runs still open are recovered by the next start."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"the runtime's run tracker failed ({reason}) and the runtime takes no more "
            "work: stop it and start a new process; open runs stay stored and are "
            "recovered by the next start"
        )


class ShardLost(SleeptimeError):
    """This process no longer holds the shard of a group it was writing for.

    Its lease expired (the process was paused, or could not reach the database) and
    another process took the shard over at a newer epoch; nothing was written. The
    group's work goes on at its new owner: ask `rt.owner_of(group_id)`.
    """

    def __init__(self, shard: int, detail: str = "taken over by another process") -> None:
        self.shard = shard
        super().__init__(
            f"shard {shard} is no longer held by this process ({detail}); nothing was "
            "written for it, and its groups are served by their new owner now"
        )


class NotOwner(SleeptimeError):
    """A call for a group whose shard another process owns (or nobody owns right now).

    `owner` names the owning process (pid and host) and `address` is where it said it
    can be reached, if it did; both are None while the shard is between owners.
    """

    def __init__(
        self, group_id: str, shard: int, owner: str | None = None, address: str | None = None
    ) -> None:
        self.group_id = group_id
        self.shard = shard
        self.owner = owner
        self.address = address
        where = "no process right now (it is moving; try again shortly)"
        if owner is not None:
            where = owner if address is None else f"{owner} at {address}"
        super().__init__(
            f"group {group_id} (shard {shard}) is served by {where}, not by this process"
        )


# -- memory blocks from the application (issue 19) ----------------------------------------


class BlockNotFound(NotFoundError):
    """No block with that label where it was looked for (an agent's view: its group's
    shared blocks and its own; a group's: the shared ones), or a block deleted meanwhile.

    `labels` are the labels there are (when known)."""

    kind = "block"

    def __init__(
        self,
        label: str | None,
        where: str,
        labels: Sequence[str] | None = None,
        block_id: str | None = None,
    ) -> None:
        self.object_id = label if label is not None else (block_id or "")
        self.label, self.where, self.block_id = label, where, block_id
        self.labels = None if labels is None else list(labels)
        if label is None:
            text = f"block {block_id} no longer exists: it was deleted"
        else:
            text = f"no block labelled {label!r} in {where}"
        if self.labels is not None:
            text += f"; labels there: {', '.join(self.labels) or 'none'}"
        SleeptimeError.__init__(self, text)


class BlockExists(SleeptimeError):
    """`create_block` with a label the agents concerned already see: nothing was written."""

    def __init__(self, label: str, where: str) -> None:
        self.label, self.where = label, where
        super().__init__(
            f"a block labelled {label!r} already exists in {where}: change it with "
            "set_block, delete it first, or choose another label"
        )


# -- groups over their life ---------------------------------------------------------------


class AgentNotInGroup(SleeptimeError, LookupError):
    """An agent named for a change of a group's sleeptime agents that is not one of them:
    the group's primary agent, or an agent of another group."""

    def __init__(self, agent_id: str, group_id: str, detail: str) -> None:
        self.agent_id = agent_id
        self.group_id = group_id
        super().__init__(
            f"agent {agent_id!r} is not a sleeptime agent of group {group_id!r}: {detail}"
        )


def text_of(error: BaseException) -> str:
    """`str(error)`, whatever its `__str__` does.

    Agent code may raise anything, even an exception whose `__str__` raises (itself, say):
    such an error is named as unprintable instead of raising again, so the run, turn or
    actor it failed still ends as a failure with its error recorded.
    """
    try:
        return str(error)
    except BaseException:
        return f"<unprintable {type(error).__name__} object>"


def describe(error: BaseException) -> str:
    """`error` as `Type: text` (see `text_of`)."""
    return f"{type(error).__name__}: {text_of(error)}"
