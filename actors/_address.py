"""The Address: the stable handle of a supervised actor, valid across its incarnations.

Messages told while the actor restarts (or while it is passivated) wait in the address
and are delivered to the next incarnation, after the ones the dead incarnation had not
handled, so nothing is silently dropped. An address whose child was stopped or escalated
refuses every message: one carrying a `reply` future gets the refusal as its reply.

Senders use `tell`, `ask` and `tell_if_active`; the supervisor moves the address between
incarnations with `attach`, `detach`, `passivate`, `nudge` and `close`.

An incarnation may also let a sender handle a message on the sender's own thread while
it is idle (`serve_here`, `tell_here`; a group's actor does, for turns, and a sleeptime
agent's, for the runs it is handed and the steps that return): the same code, under the
lock its own thread takes for every message, with a hand-off fewer (two for a request:
there and back), each of which wakes a thread. Idle means that every message told to the
incarnation has been handled (the address counts them, `_owed`): a message handled here
never overtakes one told before it.

Example:
    >>> address.tell(AssignRun(run=run))
    >>> total = address.ask(Total(), timeout=10)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

import pykka

from actors._protocol import Ask
from actors._pykka import drain_inbox, inbox_empty
from messages._futures import reject


def _nothing() -> None:
    """What waking an address does until its supervisor says otherwise."""


R = TypeVar("R")


class Serving(Protocol):
    """An incarnation that handles a message on its sender's thread while it is idle."""

    def serve_here(self, message: Any) -> bool:
        """Handle `message` now, on this thread, unless it is handling one or has ended;
        False (nothing done) if so."""
        ...


class Address:
    """The stable handle of a supervised actor, valid across its restarts.

    A passivated child has no instance; the first message told to it starts one (in
    the teller's thread, through `on_wake`), and waits here until it is up, like during
    a restart.
    """

    __slots__ = (
        "_buffer",
        "_local",
        "_lock",
        "_on_wake",
        "_owed",
        "_passive",
        "_ref",
        "_refusal",
        "identity",
        "incarnation",
        "last_told",
    )

    def __init__(self, identity: str, on_wake: Callable[[], None] = _nothing) -> None:
        self.identity = identity
        self.incarnation = 0
        self.last_told = time.monotonic()
        self._lock = threading.Lock()
        self._ref: pykka.ActorRef[Any] | None = None
        self._buffer: deque[Any] = deque()
        self._refusal: Exception | None = None
        self._passive = False
        self._on_wake = on_wake
        self._local: Serving | None = None  # the incarnation serving callers on their thread
        # Messages put in the running incarnation's inbox and not yet handled (each
        # incarnation reports what it handled: `handled`).
        self._owed = 0

    # -- senders --------------------------------------------------------------------------

    def tell(self, message: Any) -> None:
        """Deliver now, or after the restart under way; refuse if the child is gone."""
        with self._lock:
            if self._refusal is not None:
                _refuse(message, self._refusal)
                return
            self.last_told = time.monotonic()
            if self._ref is not None and not self._buffer:
                try:
                    self._ref.tell(message)
                    self._owed += 1
                    return
                except pykka.ActorDeadError:
                    pass  # it just crashed: its report will restart it
            self._buffer.append(message)
            wake, self._passive = self._passive, False
        if wake:
            self._on_wake()

    def serve_here(self, message: Any) -> bool:
        """Have the running incarnation handle `message` on this thread, if it serves
        senders so and is idle (every message told to it handled, nothing waiting here,
        nothing being handled); False if not, and nothing was done: `tell` it then."""
        with self._lock:
            local = self._local
            if (
                local is None
                or self._owed
                or self._ref is None
                or self._buffer
                or self._refusal is not None
            ):
                return False
            self.last_told = time.monotonic()
        return local.serve_here(message)

    def tell_here(self, message: Any) -> None:
        """Handle `message` on this thread if the incarnation is idle and serves senders
        so (`serve_here`), else `tell` it. For a message the actor takes quickly and
        without waiting on anything: the sender waits while it is handled."""
        if not self.serve_here(message):
            self.tell(message)

    def handled(self, incarnation: pykka.ActorRef[Any]) -> None:
        """`incarnation` handled a message of its inbox."""
        with self._lock:
            if incarnation is self._ref and self._owed > 0:
                self._owed -= 1

    def tell_if_active(self, message: Any, on_passive: Callable[[], None] | None = None) -> bool:
        """Tell, unless the child is passivated or gone (then the message is dropped:
        for news that a new instance reads from the store anyway). `on_passive` runs
        when it is passivated, before anything can start it again."""
        with self._lock:
            if self._passive or self._refusal is not None:
                if self._passive and on_passive is not None:
                    on_passive()
                return False
        self.tell(message)
        return True

    def ask(self, message: Ask[R], timeout: float | None = None) -> R:
        """Tell a request, and wait for its reply (typed by the request: `Ask[R]` -> R)."""
        self.tell(message)
        return message.reply.result(timeout)

    @property
    def active(self) -> bool:
        """Whether an incarnation is running (not restarting, passivated or gone)."""
        with self._lock:
            return self._ref is not None

    @property
    def refused(self) -> bool:
        """Whether the child is gone for good: every message is refused."""
        with self._lock:
            return self._refusal is not None

    # -- the supervisor's side ------------------------------------------------------------

    def attach(self, ref: pykka.ActorRef[Any]) -> bool:
        """The new incarnation is up: hand it everything that waited, in order. False if
        the address was closed meanwhile (the supervisor then stops the incarnation)."""
        with self._lock:
            if self._refusal is not None:
                return False
            self._ref, self._owed = ref, 0
            while self._buffer:
                message = self._buffer.popleft()
                try:
                    ref.tell(message)
                    self._owed += 1
                except pykka.ActorDeadError:
                    self._buffer.appendleft(message)  # crashed already; the next one gets it
                    break
            return True

    def serve_locally(self, incarnation: Serving) -> None:
        """`incarnation` (started, running) serves callers on their threads from now on."""
        with self._lock:
            self._local = incarnation

    def stop_serving_locally(self, incarnation: Serving) -> None:
        """`incarnation` ends: no caller is served by it any more (nor is it kept alive)."""
        with self._lock:
            if self._local is incarnation:
                self._local = None

    def detach(self, inbox: Any | None, first: list[Any]) -> None:
        """The current incarnation died: keep what it had not handled, ahead of the rest.

        `first` are messages it took but did not handle; `inbox` is None when the
        incarnation never started (its start raised). A closed address refuses them."""
        with self._lock:
            self._ref, self._local, self._owed = None, None, 0
            pending = [*first, *(drain_inbox(inbox) if inbox is not None else [])]
            refusal = self._refusal
            if refusal is None:
                self._buffer.extendleft(reversed(pending))
        if refusal is not None:
            for message in pending:
                _refuse(message, refusal)

    def passivate(self, inbox: Any) -> bool:
        """Let go of the idle instance, unless a message is waiting for it; the next
        message wakes the child."""
        with self._lock:
            if self._ref is None or self._buffer or not inbox_empty(inbox):
                return False
            self._ref, self._local, self._owed = None, None, 0
            self._passive = True
            return True

    def nudge(self, message: Any) -> None:
        """Tell the running instance, if any, without counting as use or waking it."""
        with self._lock:
            if self._ref is None or self._buffer:
                return
            try:
                self._ref.tell(message)
                self._owed += 1
            except pykka.ActorDeadError:
                pass

    def close(self, refusal: Exception) -> pykka.ActorRef[Any] | None:
        """No incarnation will come: refuse what waits and what comes. Returns the
        running instance, if any, for the supervisor to stop."""
        with self._lock:
            self._refusal = refusal
            waiting = list(self._buffer)
            self._buffer.clear()
            ref, self._ref, self._local, self._owed = self._ref, None, None, 0
        for message in waiting:
            _refuse(message, refusal)
        return ref


def _refuse(message: Any, refusal: Exception) -> None:
    reply = getattr(message, "reply", None)
    if isinstance(reply, Future):
        reject(reply, refusal)
