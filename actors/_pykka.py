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
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pykka
import pykka.messages

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
