"""A write a store has queued, shared by the stores that queue them."""

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class PendingWrite:
    """
    One write waiting for (or past) the disk: C{deferred} fires with its
    result once it is durable, or fails; reads issued after it wait for it
    with L{wait}, so they see it.
    """

    __slots__ = ("deferred", "settled", "_waiters")

    def __init__(self):
        self.deferred = Deferred()
        self.settled = False
        # Made only when a read waits: most writes are never waited on.
        self._waiters = None

    def settle(self, result) -> None:
        """The write is done: C{result} is its value, or a failure."""
        self.settled = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            waiter.callback(None)
        if isinstance(result, (BaseException, Failure)):
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)

    def wait(self) -> Deferred:
        """A Deferred that fires (with None) once this write is settled."""
        waiter = Deferred()
        if self.settled:
            waiter.callback(None)
        elif self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        return waiter
