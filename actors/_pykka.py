"""The one place that touches pykka's internals, and why each touch is needed.

pykka has no supervision (SPEC 9), so restarting an actor without losing its messages, and
passivating an idle one, need three things its public API does not give, and a fourth
keeps its logging in its place:

- taking back the messages a dead incarnation had not handled (`drain_inbox`): its inbox
  holds pykka's envelopes, and pykka would otherwise answer each with `ActorDeadError`
  (or drop it) once the actor thread ends; the supervisor hands them to the next one;
- recognising pykka's stop request among them (`_ActorStop`), to answer whoever asked the
  dead incarnation to stop instead of delivering it to the new one;
- stopping a passivated actor at once (`stop_now`, pykka's `Actor._stop()`): its address
  has already let go of it, so nothing may be handled by this instance any more;
- running an actor's messages on a few shared threads instead of a thread of its own
  (`DispatchedActor`, `Dispatcher`): pykka's loop, one envelope at a time, as
  `ThreadingActor` runs it, but started, resumed and ended by a dispatcher thread;
- ending a crashed actor without pykka's report (`QuietActor`, whose
  `_handle_failure` does what pykka's does, less its log): pykka logs every crash with its traceback
  at error on the `pykka` logger, which belongs to the host; the supervisor reports each
  crash itself (`actor_crashed`, with the traceback), so the runtime's actors end quietly
  and leave that logger, its level and its handlers as the host set them.

Tested on pykka 4.1 to 4.5, the range `pyproject.toml` pins (a newer pykka is let in once
the suite passed on it). `missing_internals()` says what a newer pykka no longer has;
`tests/test_pykka_internals.py` fails naming it.

Example:
    >>> messages = drain_inbox(actor.actor_inbox)   # in the dead actor's own thread
"""

from __future__ import annotations

import importlib
import queue
import sys
import threading
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pykka
import pykka.messages

from messages._log import get_logger

TESTED_PYKKA = ">=4.1,<4.6"
"""The pykka versions whose internals this module was tested on (pinned in pyproject)."""

_ActorStop: Any = getattr(pykka.messages, "_ActorStop", None)


def drain_inbox(inbox: Any) -> list[Any]:
    """Take every message waiting in a dead incarnation's inbox, oldest first.

    A pending stop request is answered (its asker is not left waiting) and not returned:
    it was meant for the dead incarnation, not for the one that takes its messages.
    """
    messages: list[Any] = []
    while not inbox.empty():
        envelope = inbox.get()
        if isinstance(envelope.message, _ActorStop):
            if envelope.reply_to is not None:
                envelope.reply_to.set(None)
            continue
        messages.append(envelope.message)
    return messages


def inbox_empty(inbox: Any) -> bool:
    """Whether nothing waits in the inbox (a passivating actor must have nothing left)."""
    return bool(inbox.empty())


def stop_now(actor: pykka.Actor) -> None:
    """Stop `actor`, from its own thread, before it takes another message.

    pykka's public `stop()` queues a stop request behind whatever is in the inbox; a
    passivated actor has been let go by its address already, so it stops here and now.
    """
    actor._stop()


class QuietActor(pykka.ThreadingActor):
    """A threading actor that ends without pykka's log when its code fails; whoever
    supervises it reports the failure. Its inbox is a `queue.SimpleQueue`: pykka only puts,
    gets and asks `empty()`, and the C queue does each without the Python-level lock and
    conditions of pykka's default `queue.Queue` (three per message, and a turn passes seven)."""

    @staticmethod
    def _create_actor_inbox() -> Any:
        return queue.SimpleQueue()

    def _handle_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        # pykka's own: unregister and stop, after logging the crash on the `pykka` logger.
        pykka.ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()


def missing_internals() -> list[str]:
    """The pykka internals this module relies on that the installed pykka lacks."""
    missing = []
    if not isinstance(getattr(pykka.messages, "_ActorStop", None), type):
        missing.append("pykka.messages._ActorStop (the stop request in an inbox)")
    if not callable(getattr(pykka.ThreadingActor, "_stop", None)):
        missing.append("pykka.Actor._stop() (stops an actor at once)")
    if not callable(getattr(pykka.ThreadingActor, "_handle_failure", None)):
        missing.append("pykka.Actor._handle_failure() (ends an actor whose code failed)")
    for name, why in (
        ("_actor_loop_setup", "starts an actor: on_start"),
        ("_handle_receive", "handles one message"),
        ("_actor_loop_teardown", "refuses what is left in a stopped actor's inbox"),
        ("_start_actor_loop", "starts an actor's loop: a dispatcher's instead of a thread"),
        ("_create_actor_inbox", "makes an actor's inbox"),
    ):
        if not callable(getattr(pykka.ThreadingActor, name, None)):
            missing.append(f"pykka.Actor.{name}() ({why}; `DispatchedActor` runs pykka's loop)")
    try:
        envelope = importlib.import_module("pykka._envelope").Envelope
    except (ImportError, AttributeError):
        missing.append("pykka._envelope.Envelope (what an inbox holds)")
    else:
        fields = set(getattr(envelope, "__slots__", ())) | set(
            getattr(envelope, "__annotations__", {})
        )
        missing += [
            f"pykka Envelope.{name}" for name in ("message", "reply_to") if name not in fields
        ]
    return missing


def check_pykka() -> None:
    """Raise ImportError naming what is missing if pykka lacks the internals used here."""
    missing = missing_internals()
    if missing:
        try:
            installed = version("pykka")
        except PackageNotFoundError:
            installed = "unknown"
        raise ImportError(
            f"sleeptime-runtime needs pykka{TESTED_PYKKA}, whose internals its supervision "
            f"relies on; the installed pykka {installed} lacks: {'; '.join(missing)}. "
            f"Install a pykka in that range (pip install 'pykka{TESTED_PYKKA}')."
        )


check_pykka()  # at import: a pykka without them fails here, saying what is missing


_log = get_logger("sleeptime.dispatcher")

DISPATCH_BATCH = 16
"""Messages an actor handles in a row on a dispatcher thread before the others' turn."""


class Dispatcher:
    """A few daemon threads that run the messages of many `DispatchedActor`s, each actor's
    one at a time and in order (Akka's dispatcher; pykka has none).

    An actor with messages waits in the ready queue once, however many it has; a thread
    takes it, handles up to `DISPATCH_BATCH` of them, and puts it back at the end of the
    queue if more came. Only for actors whose handling never waits long (a blocked handler
    holds one of the threads for as long).
    """

    def __init__(self, threads: int = 4, name: str = "sleeptime-dispatch") -> None:
        if threads < 1:
            raise ValueError("a dispatcher needs at least one thread")
        self._ready: queue.SimpleQueue[DispatchedActor | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{n + 1}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def schedule(self, actor: DispatchedActor) -> None:
        self._ready.put(actor)

    def close(self, timeout: float = 5.0) -> None:
        """Let the threads go once the actors scheduled before this have run."""
        for _ in self._threads:
            self._ready.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _work(self) -> None:
        while (actor := self._ready.get()) is not None:
            try:
                actor._run_some()  # (ends the actor as its own thread would, if it fails)
            except BaseException:  # never lose a thread that every actor shares
                _log.exception("dispatcher_run_failed", actor=type(actor).__name__)
            del actor


class _DispatchedInbox:
    """A dispatched actor's inbox: what pykka and the supervisor use of a queue (`put`,
    `get`, `empty`, `qsize`), and the actor scheduled on its dispatcher when a message
    comes while it is not."""

    __slots__ = ("_actor", "_items", "_lock", "_scheduled")

    def __init__(self, actor: DispatchedActor) -> None:
        self._actor = actor
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, envelope: Any, block: bool = True, timeout: float | None = None) -> None:
        self._items.append(envelope)
        self.schedule()

    def schedule(self) -> None:
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self._actor.dispatcher.schedule(self._actor)

    def take(self) -> Any | None:
        """The oldest envelope, or None if there is none."""
        try:
            return self._items.popleft()
        except IndexError:
            return None

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._items.popleft()  # (only after `empty()` said no, as pykka does)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def more(self) -> bool:
        """After a run of the actor: whether it must run again (messages came). If not,
        the next message schedules it (checked under the lock `schedule` takes, so no
        message is left waiting unscheduled)."""
        with self._lock:
            if self._items:
                return True
            self._scheduled = False
            return False


class DispatchedActor(QuietActor):
    """A `QuietActor` with no thread of its own: a `Dispatcher`'s threads start it, run
    its messages and end it, exactly as pykka's loop would on its own thread. `dispatcher`
    must be set (in `__init__`) before the actor is started."""

    dispatcher: Dispatcher

    def _create_actor_inbox(self) -> Any:  # type: ignore[override]
        self._starting = True
        self._inbox = _DispatchedInbox(self)
        return self._inbox

    def _start_actor_loop(self) -> None:
        self._inbox.schedule()  # its first run starts it (`on_start`)

    def _run_some(self) -> None:
        """Handle up to `DISPATCH_BATCH` messages (starting the actor first, the first
        time); end it if it stopped; else schedule it again if messages wait."""
        inbox = self._inbox
        if self._starting:
            self._starting = False
            self._actor_loop_setup()
        for _ in range(DISPATCH_BATCH):
            if self.actor_stopped.is_set():
                break
            envelope = inbox.take()
            if envelope is None:
                break
            self._handle_envelope(envelope)
        if self.actor_stopped.is_set():
            # What came meanwhile is refused, as pykka does; and what comes while it is
            # refused (told before the stop was seen), until none is left.
            self._actor_loop_teardown()
            while inbox.more():
                self._actor_loop_teardown()
            return
        if inbox.more():
            self.dispatcher.schedule(self)

    def _handle_envelope(self, envelope: Any) -> None:
        """pykka's loop body (`Actor._actor_loop_running`) for one envelope."""
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())
        except BaseException:  # (pykka stops every actor; one actor's end is enough here)
            self._handle_failure(*sys.exc_info())
