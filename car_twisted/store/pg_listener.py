"""
LISTEN for run changes on a dedicated PostgreSQL connection watched by the
reactor (no thread waits on it).

Each write of L{car_twisted.store.postgresql} sends a NOTIFY whose payload is
a pointer, C{[run_id, cursor, origin]}: the run's records now end at
C{cursor}, written by daemon C{origin}. Listeners read the rows themselves.
When the connection drops, the listener connects again, LISTENs again, and
says so: whatever changed while it was away must be read from the tables.
"""

import json
import os

import psycopg
from psycopg import pq
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

#: Seconds between attempts to connect again.
RETRY = 1.0


def _connect(dsn: str, channel: str, name: str) -> psycopg.Connection:
    connection = psycopg.connect(dsn, autocommit=True, application_name=name)
    try:
        connection.execute(f"LISTEN {channel}")
    except BaseException:
        connection.close()
        raise
    return connection


@implementer(IReadDescriptor)
class RunChangeListener:
    """
    Calls C{on_change(run_id, cursor, origin)} for each run change committed
    by any daemon, and C{on_reconnect()} once listening again after the
    connection was lost (changes may have been missed).

    @param reactor: watches the socket, runs the (blocking) connect on its
        thread pool, and schedules retries.
    @param name: the connection's C{application_name}.
    """

    def __init__(self, reactor, dsn: str, channel: str, name: str, on_change, on_reconnect, retry=RETRY):
        self._reactor = reactor
        self._dsn = dsn
        self._name = name
        self._channel = channel
        self._on_change = on_change
        self._on_reconnect = on_reconnect
        self._retry = retry
        self._connection = None
        self._fileno = -1
        self._retry_call = None
        self._stopped = False
        #: Set once the first connection listens.
        self.listening = Deferred()

    def start(self) -> Deferred:
        """Connect and LISTEN; the Deferred fires once listening."""
        self._connect()
        return self.listening

    def _connect(self) -> None:
        self._retry_call = None
        d = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _connect, self._dsn, self._channel, self._name
        )
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, connection) -> None:
        if self._stopped:
            connection.close()
            return
        first = not self.listening.called
        self._connection = connection
        # libpq closes its socket when the connection breaks, before we can
        # take it out of the reactor: watch a duplicate we close ourselves.
        self._fileno = os.dup(connection.fileno())
        self._reactor.addReader(self)
        if first:
            log.info("car-twisted: listening for changes made by other daemons")
            self.listening.callback(None)
        else:
            log.info("car-twisted: listening again for other daemons' changes; catching up")
            self._on_reconnect()
        # Notifications may have arrived with the LISTEN's answer.
        self.doRead()

    def _failed(self, failure) -> None:
        if self._stopped:
            return
        log.warn(
            "car-twisted: cannot listen for other daemons' changes ({error}); retrying in {retry} s",
            error=str(failure.value).strip().splitlines()[0] if str(failure.value).strip() else failure.type.__name__,
            retry=self._retry,
        )
        self._retry_call = self._reactor.callLater(self._retry, self._connect)

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "RunChangeListener"

    def doRead(self):
        pgconn = self._connection.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError:
            return self.connectionLost(None)
        while (notify := pgconn.notifies()) is not None:
            self._notified(notify.extra)
        if pgconn.status != pq.ConnStatus.OK:
            return self.connectionLost(None)
        return None

    def _notified(self, payload: bytes) -> None:
        try:
            run_id, cursor, origin = json.loads(payload)
        except ValueError:
            log.warn("car-twisted: ignored an unreadable run change notice {payload!r}", payload=payload)
            return
        self._on_change(run_id, cursor, origin)

    def connectionLost(self, reason) -> None:
        """The connection dropped (or the reactor let go of it): start over."""
        if self._connection is None:
            return
        self._drop()
        if not self._stopped:
            log.warn("car-twisted: lost the connection listening for other daemons' changes")
            self._connect()

    def _drop(self) -> None:
        self._reactor.removeReader(self)
        os.close(self._fileno)
        self._fileno = -1
        connection, self._connection = self._connection, None
        connection.close()

    def stop(self) -> None:
        """Stop listening and close the connection (a connect in flight closes
        its connection when it lands)."""
        self._stopped = True
        if self._connection is not None:
            self._drop()
        if self._retry_call is not None:
            self._retry_call.cancel()
            self._retry_call = None
