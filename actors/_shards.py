"""The lease keeper: keeps this process's share of the shards, on a thread of its own.

Every `lease_s / 3` seconds it renews the membership and the leases it holds (a shard
it finds taken over is lost: `on_lost`), then looks at how many members are alive and how
many shards are free, and moves toward its fair share (`persistence._leases.rebalance`):
it acquires free or expired shards (`on_acquired`, which recovers their runs as a restart
would), or, when another member is short, hands over its excess cleanly (`on_hand_over`
stops taking work for those shards and finishes it; the leases are released after).

Renewal runs apart from the writer and from the actors, so a long batch of writes or a
busy actor never lets a lease lapse. A renewal that fails (the database is away) is
tried again at the next tick; leases that expire meanwhile are found lost, by renewal or
by the fencing of the next write, whichever comes first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from messages._log import get_logger
from persistence._leases import Leases, ShardBook, hand_over_first, rebalance

log = get_logger("sleeptime.shards")

Shards = dict[int, int]
"""{shard: epoch}"""


class ShardKeeper:
    """Holds a fair share of the shards for one runtime process.

    Example:
        >>> keeper = ShardKeeper(leases, book, on_acquired=recover, on_lost=drop,
        ...                      on_hand_over=finish)
        >>> keeper.start()        # joined, first share taken and recovered
        >>> keeper.stop()         # every shard handed over and released
    """

    def __init__(
        self,
        leases: Leases,
        book: ShardBook,
        *,
        on_acquired: Callable[[Shards], None],
        on_lost: Callable[[Shards], None],
        on_hand_over: Callable[[Shards], None],
        busy: Callable[[], set[int]] = set,
    ) -> None:
        self._leases = leases
        self._busy = busy
        self._book = book
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._on_hand_over = on_hand_over
        self._stopping = threading.Event()  # the thread ends
        self._leaving = False  # stop() is handing everything over: renew, take nothing
        self._handing: threading.Thread | None = None  # a rebalancing hand-over under way
        self._tick_lock = threading.Lock()  # one tick at a time (the thread, or a caller)
        self._thread = threading.Thread(target=self._loop, name="sleeptime-shards", daemon=True)
        self.interval = leases.lease_s / 3

    def start(self, settle_s: float = 0.0) -> None:
        """Join and take a first share; `keep()` then keeps it in the background.

        With `settle_s`, tick until this member holds its fair share or nothing more can
        come to it, for up to that many seconds: after a crash of the only process, its
        leases must expire before a new one can take them, and a newcomer waits for the
        others to hand it their excess.
        """
        self._book.shards = self._leases.setup(self._book.shards)
        deadline = time.monotonic() + settle_s
        while not self.tick() and time.monotonic() < deadline:
            self._stopping.wait(min(0.2, self.interval))

    def keep(self) -> None:
        """Renew and rebalance every `interval` seconds, on the keeper's own thread."""
        self._thread.start()

    def stop(self) -> None:
        """Hand every shard over cleanly (renewing the leases meanwhile), release them
        and leave."""
        self._leaving = True
        self.wait_for_hand_over()
        held = self._book.held()
        if held:
            self._hand_over(held)
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(max(5.0, 2 * self.interval))
        try:
            self._leases.leave()
        except Exception as error:  # its membership expires on its own
            log.warning("leave_failed", error=str(error))

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.tick()
            except Exception as error:  # the database is away: the next tick tries again
                log.warning("lease_tick_failed", error=str(error))

    def tick(self) -> bool:
        """Renew, then move toward the fair share (one step); True once this member
        holds at least `shards // members`."""
        with self._tick_lock:
            held = self._book.held()
            lost = self._leases.renew(held)
            dropped = self._book.drop(lost & self._book.held().keys())  # not handed over since
            if dropped:
                log.error("shards_lost", shards=len(dropped))
                self._on_lost(dropped)
            if self._leaving:
                return True
            if self._handing is not None and self._handing.is_alive():
                return False  # one hand-over at a time; the leases are renewed meanwhile
            members, free, fewest = self._leases.census()
            held = self._book.held()
            move = rebalance(len(held), members, free, self._book.shards, fewest)
            if move > 0:
                taken = self._leases.acquire(move)
                if taken:
                    self._book.add(taken)
                    log.info("shards_acquired", shards=len(taken), members=members)
                    self._on_acquired(taken)
                return len(held) + len(taken) >= self._book.shards // max(1, members)
            if move < 0:
                excess = self._excess(held, -move)
                # On a thread of its own: finishing their turns may take long, and this
                # thread must go on renewing every lease meanwhile, theirs included.
                self._handing = threading.Thread(
                    target=self._hand_over, args=(excess,), name="sleeptime-hand-over"
                )
                self._handing.start()
            return len(held) >= self._book.shards // max(1, members)

    def _excess(self, held: Shards, count: int) -> Shards:
        """The `count` shards to hand over (`hand_over_first`), by what runs here now."""
        try:
            busy = self._busy()
        except Exception as error:  # the database is away: the highest, as ever
            log.warning("busy_shards_unknown", error=str(error))
            busy = set()
        return hand_over_first(held, count, busy)

    def wait_for_hand_over(self, timeout: float | None = None) -> bool:
        """Wait for a rebalancing hand-over under way (if any); False if still going."""
        handing = self._handing
        if handing is None:
            return True
        handing.join(timeout)
        return not handing.is_alive()

    def _hand_over(self, shards: Shards) -> None:
        self._book.leave(shards)
        try:
            self._on_hand_over(shards)
        finally:
            self._book.drop(shards)
            try:
                self._leases.release(shards)
            except Exception as error:  # they expire on their own, after one lease
                log.warning("release_failed", shards=len(shards), error=str(error))
            else:
                log.info("shards_handed_over", shards=len(shards))
