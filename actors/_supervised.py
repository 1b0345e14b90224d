"""SupervisedActor, the base of the runtime's actors, and what its supervisor hands it.

An actor implements `receive(message)` (and may implement `started()`, `idle()`,
`snapshot()`); it never knows how it is restarted. A message with a `reply` future gets
the return value, or the exception, as its reply; an exception escaping a message without
one is a crash, reported through the `CrashReporter` to the supervisor, which hands the
messages this incarnation had not handled to the next one.

The wiring may put a `ReceiveWrapper` around an incarnation's receive (Akka's "behaviour
+ wrapper"): chaos crashes actors that way, and the actors themselves take no part in it.

Example:
    >>> class Counter(SupervisedActor):
    ...     def receive(self, message):
    ...         ...
    >>> supervisor.supervise(ChildSpec("counter", lambda reporter: Counter.start(reporter), ...))
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from actors._address import Address
from actors._passivation import Passivate
from actors._pykka import DispatchedActor, QuietActor, stop_now
from messages._errors import describe
from messages._futures import reject, resolve

ReceiveWrapper = Callable[[Any, Callable[[Any], Any]], Any]
"""Called with each message and the actor's own handling of it; returns what that returns.
Raising `CrashedBeforeReceive` instead of calling it crashes the actor, message unhandled."""


class ActorRaised(Exception):
    """An actor's code raised a BaseException that is no Exception (`SystemExit`, say).

    pykka answers those by stopping every actor of the process; here it is one actor's
    crash like any other, restarted by its supervisor."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        super().__init__(describe(error))


def contained(error: BaseException) -> Exception:
    """`error` as an Exception that fails only the actor, turn or run that raised it."""
    return error if isinstance(error, Exception) else ActorRaised(error)


class CrashedBeforeReceive(Exception):
    """Raised by a receive wrapper before the message reached the actor's code: the actor
    crashes, and the next incarnation gets the message, as if it had never been told."""


class _CrashHere:
    """Told to an actor whose message, handled on a sender's thread, raised: its own
    thread crashes with that error when it takes this (or any message before it)."""

    __slots__ = ()


class CrashReporter:
    """What the supervisor hands one incarnation: its address, where to report a crash or
    a passivation, and how it was started.

    `activation` says it was started again after a passivation, not a crash; `snapshot`
    is then the state the last instance left (exact, as nothing else changes it), so the
    new one need not read it back (None otherwise). `wrap` goes around its receive.
    """

    __slots__ = ("_on_crash", "_on_passivate", "activation", "address", "snapshot", "wrap")

    def __init__(
        self,
        address: Address,
        on_crash: Callable[[BaseException, Any, list[Any], bool], None],
        on_passivate: Callable[[Any, Any], bool],
        activation: bool = False,
        snapshot: Any = None,
        wrap: ReceiveWrapper | None = None,
    ) -> None:
        self.address = address
        self._on_crash = on_crash
        self._on_passivate = on_passivate
        self.activation = activation
        self.snapshot = snapshot
        self.wrap = wrap

    def crashed(
        self, error: BaseException, inbox: Any, unhandled: list[Any], progressed: bool = False
    ) -> None:
        """The incarnation died of `error`; `unhandled` and its `inbox` go to the next.
        `progressed`: it had handled a message (the restart policy may count that)."""
        self._on_crash(error, inbox, unhandled, progressed)

    def passivate(self, inbox: Any, snapshot: Any = None) -> bool:
        """Whether the idle instance may stop now (it must, if True); `snapshot` is
        handed to the next instance."""
        return self._on_passivate(inbox, snapshot)


class SupervisedActor(QuietActor):
    """Base of the runtime's actors: messages in, replies through futures, crashes reported.

    A subclass implements `receive(message)` (and may implement `started()`). A message
    with a `reply` future gets the return value, or the exception, as its reply; an
    exception from a message without one is a crash, reported to the supervisor, which
    redelivers the messages this incarnation had not handled to the next one.
    """

    use_daemon_thread = True
    serves_callers = False
    """Whether an idle incarnation handles a message on its sender's thread when the
    sender asks (`Address.serve_here`, `tell_here`), instead of waking its own thread."""

    def __init__(self, reporter: CrashReporter | None = None) -> None:
        super().__init__()
        self._reporter = reporter
        self._wrap = None if reporter is None else reporter.wrap
        self._unhandled: list[Any] = []
        self._progressed = False  # handled a message: this incarnation got work done
        # Held while a message is handled, on whichever thread: the actor's own, or a
        # sender's (`serve_here`). `_holder` is that thread; `_retired` is set, under it,
        # once this incarnation ends (stopped, passivated, crashed): no sender is served.
        self._serving = threading.Lock()
        self._holder: int | None = None
        self._retired = False
        # A message without a reply, handled on a sender's thread, raised: the actor's own
        # thread crashes with it at its next message (`_CrashHere` wakes it for that).
        self._raised_here: BaseException | None = None

    def started(self) -> None:
        """Load what the actor needs; runs in its own thread before any message."""

    def receive(self, message: Any) -> Any:
        raise NotImplementedError

    def idle(self) -> bool:
        """Whether the actor may be passivated now: nothing of its own under way that a
        new instance, started from the store, would not take over."""
        return True

    def snapshot(self) -> Any:
        """What the next instance may start from instead of reading the store (None:
        read it). Only state that nothing but this actor changes belongs here."""
        return None

    def on_start(self) -> None:
        try:
            self.started()
        except BaseException as error:
            failure = contained(error)
            self._report(failure)
            raise failure from error
        if self.serves_callers and self._reporter is not None and self._wrap is None:
            # (Chaos wraps the receive of the actor's own thread: a wrapped one serves none.)
            self._reporter.address.serve_locally(self)

    def on_receive(self, message: Any) -> Any:
        with self._serving:
            self._holder = threading.get_ident()
            try:
                if self._raised_here is not None:
                    raise self._crash_here(message)
                return self._on_receive(message)
            except BaseException as error:
                self._end_serving()  # a crash: this incarnation is done
                if isinstance(error, Exception):
                    raise
                # pykka would stop every actor of the process: make it this actor's crash.
                raise ActorRaised(error) from error
            finally:
                self._holder = None
                if self._reporter is not None:  # (so its address knows when it is idle)
                    self._reporter.address.handled(self.actor_ref)

    def serve_here(self, message: Any) -> bool:
        """Handle `message` on the calling thread, as this actor's own thread would,
        unless a message is being handled or this incarnation has ended: False (and
        nothing done) then. Its address calls this only once every message told to the
        incarnation is handled (`Address.serve_here`).

        A message with a reply gets what the handling raises there; one without is the
        actor's crash, as on its own thread: its thread is woken to crash with it, and
        nothing more is handled on a sender's thread."""
        if not self._serving.acquire(blocking=False):
            return False
        try:
            if self._retired:
                return False
            self._holder = threading.get_ident()
            try:
                self._handle(message)
            except BaseException as error:
                self._raised_here = error
                self._end_serving()
                assert self._reporter is not None  # (only a supervised actor serves)
                self._reporter.address.tell(_CrashHere())
                if not isinstance(error, Exception):
                    raise  # (KeyboardInterrupt, say: the sender's thread's to handle)
            else:
                self._progressed = True
            return True
        finally:
            self._holder = None
            self._serving.release()

    def _crash_here(self, message: Any) -> BaseException:
        """The error a message handled on a sender's thread raised, now this incarnation's
        crash; `message`, taken from the inbox but not handled, goes to the next one."""
        error, self._raised_here = self._raised_here, None
        assert error is not None
        if not isinstance(message, _CrashHere | Passivate):
            self._unhandled = [message]
        return contained(error)

    def on_stop(self) -> None:
        if self._holder == threading.get_ident():  # stopped from within a message
            self._end_serving()
            return
        with self._serving:  # a caller's message being handled ends first
            self._end_serving()

    def _end_serving(self) -> None:
        """This incarnation serves no caller any more (call with `_serving` held)."""
        self._retired = True
        if self._reporter is not None:
            self._reporter.address.stop_serving_locally(self)

    def _on_receive(self, message: Any) -> Any:
        if isinstance(message, Passivate):
            if (
                self._reporter is not None
                and self.idle()
                and self._reporter.passivate(self.actor_inbox, self.snapshot())
            ):
                stop_now(self)  # nothing else can reach this instance any more
            return None
        if self._wrap is None:
            outcome = self._handle(message)
        else:
            try:
                outcome = self._wrap(message, self._handle)
            except CrashedBeforeReceive:
                self._unhandled = [message]  # nothing of it ran: the next incarnation takes it
                raise
        self._progressed = True
        return outcome

    def _handle(self, message: Any) -> Any:
        reply = getattr(message, "reply", None)
        if not isinstance(reply, Future):
            return self.receive(message)
        try:
            outcome = self.receive(message)
        except BaseException as error:
            reject(reply, contained(error))
        else:
            resolve(reply, outcome)
        return None

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self._report(exception_value)

    def _report(self, error: BaseException) -> None:
        if self._reporter is not None:
            self._reporter.crashed(error, self.actor_inbox, self._unhandled, self._progressed)
            self._unhandled = []


class DispatchedSupervisedActor(SupervisedActor, DispatchedActor):
    """A `SupervisedActor` with no thread of its own: its messages run on the runtime's
    dispatcher threads (`actors._pykka.Dispatcher`), one at a time, in order. For actors
    whose handling never waits (each holds a shared thread while it handles a message);
    set `dispatcher` in `__init__`."""
