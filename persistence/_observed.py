"""What the store tells about itself as it works: the batches it commits, its errors.

The store and its writer call a `StoreObserver` where these facts are decided; this base
does nothing with them, and the runtime's observer (`actors._observer.Observer`) extends
it for its logs, metrics and traces. Each method is called on the thread that found the
fact (the writer thread for batches, any caller's for errors), and must be
quick and must not raise.

Example:
    >>> store = Store("sqlite:///sleeptime.db", observer=my_observer)
"""

from __future__ import annotations


class StoreObserver:
    """Receives the store's facts; every method does nothing unless overridden."""

    __slots__ = ()

    def batch_committed(self, writes: int, seconds: float) -> None:
        """The writer committed one transaction of `writes` writes in `seconds`."""

    def store_error(self, error: Exception) -> None:
        """A call to the database failed: `StoreUnavailable` or `StoreRejected`."""


NO_STORE_OBSERVER = StoreObserver()
