"""
The daemon's service tree: the store, then the listeners.

::

    DaemonService (MultiService)
    ├── RunStoreService      opens the store; closes it
    ├── SharedStoreService   a store several daemons share: heartbeat, LISTEN
    ├── exporters (MultiService)
    │   └── RunExporter, if --otlp-endpoint is set
    ├── maintenance (MultiService)
    │   └── Retention
    ├── listeners (MultiService)
    │   └── StreamServerEndpointService, one per --listen endpoint
    └── http (MultiService)
        └── StreamServerEndpointService for --http, if any; stops last

The listeners start only once the store is open and the runs the last
daemon left open are ended (on a shared store: those of dead daemons), and
a shared store's heartbeat and change feed run, so no client ever sees a
half-recovered store.
The exporters start before that recovery (the runs it ends are exported)
and stop after the last write, before the store closes; the maintenance
starts after the recovery and stops first. The HTTP side stops after
everything else, so ``/healthz`` answers 503 while the daemon stops.
"""

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()


class CannotStart(Exception):
    """The daemon cannot start; the message says why."""


@implementer(IStreamServerEndpoint)
class AnnouncingEndpoint:
    """
    An endpoint that logs the address it listens on (tests and supervisors
    read the port from that line) and reports the outcome in C{listened}
    rather than to the service's log, so a start failure is one line.
    """

    def __init__(self, description: str, endpoint, label: str = "listening"):
        self._description = description
        self._endpoint = endpoint
        self._label = label
        #: Fires with the listening port, or fails if listening failed.
        self.listened = Deferred()

    def listen(self, factory):
        d = self._endpoint.listen(factory)
        d.addCallbacks(self._listening, self._failed)
        return d

    def _listening(self, port):
        log.info(
            "car-twisted {label} on {endpoint} ({address})",
            label=self._label,
            endpoint=self._description,
            address=port.getHost(),
        )
        self.listened.callback(port)
        return port

    def _failed(self, failure):
        self.listened.errback(
            CannotStart(f"cannot listen on {self._description}: {failure.getErrorMessage()}")
        )


class RunStoreService(Service):
    """
    Opens an L{IRunStore} when started and closes it when stopped, if it
    opened: a store whose open failed has released what it took.
    """

    def __init__(self, store):
        self.store = store
        self._opened = False

    def startService(self):
        super().startService()
        d = self.store.open()
        d.addCallback(self._open)
        return d

    def _open(self, _):
        self._opened = True

    def stopService(self):
        super().stopService()
        if not self._opened:
            return succeed(None)
        self._opened = False
        return self.store.close()


class SharedStoreService(Service):
    """
    Joins the daemons sharing a store (an L{ISharedRunStore}), once it is
    open and recovered: heartbeats (each beat also ends the runs of daemons
    whose lease expired) and passes the changes other daemons commit to the
    run service. Stopping leaves: no more beats, no more changes.
    """

    def __init__(self, store, runs):
        self.store = store
        self.runs = runs

    def startService(self):
        super().startService()
        self.store.start_heartbeat()
        d = self.store.watch(self.runs.run_changed, self.runs.runs_changed)
        d.addCallback(self._joined)
        return d

    def _joined(self, _):
        log.info(
            "car-twisted: daemon {daemon_id} joined the shared store (lease {lease} s)",
            daemon_id=self.store.daemon_id,
            lease=self.store.lease,
        )

    def stopService(self):
        super().stopService()
        return self.store.leave()


class DaemonService(MultiService):
    """
    The whole daemon. Starting it opens the store, ends the runs the last
    daemon left open (C{runs.recover()}), then starts the listeners;
    C{ready} fires when they listen. Stopping it is graceful (SIGTERM): stop
    listening, answer every request in flight, close the connections, wait
    for the writes, close the store. Runs still open stay open; the next
    start ends them incomplete. The HTTP side (L{serve_http}) closes last.

    @ivar runs: the L{RunService}.
    """

    def __init__(self, store, runs):
        super().__init__()
        self.runs = runs
        self._factories = []
        self._endpoints = []
        self.store_service = RunStoreService(store)
        self.store_service.setServiceParent(self)
        self.sharing = None
        self.exporters = MultiService()
        self.exporters.setServiceParent(self)
        self.maintenance = MultiService()
        self.maintenance.setServiceParent(self)
        self.listeners = MultiService()
        self.listeners.setServiceParent(self)
        self.http = MultiService()
        self.http.setServiceParent(self)
        #: True once the daemon is stopping.
        self.stopping = False
        #: Fires with the listening ports once the daemon serves, or fails.
        self.ready = None
        #: Called with the failure if the daemon cannot start (C{ready}
        #: fails too).
        self.start_failed = None
        #: Called once the daemon serves, before C{ready} fires.
        self.serving = None

    def share(self, sharing: SharedStoreService) -> None:
        """Join the other daemons of a shared store once it is recovered."""
        self.sharing = sharing
        sharing.setServiceParent(self)

    def listen(self, description: str, endpoint, factory) -> None:
        """Serve C{factory} on C{endpoint} once the store is ready."""
        announcing = AnnouncingEndpoint(description, endpoint)
        self._endpoints.append(announcing)
        if factory not in self._factories:
            self._factories.append(factory)
        StreamServerEndpointService(announcing, factory).setServiceParent(self.listeners)

    def export(self, service) -> None:
        """Run C{service}, fed by runs as they end, while the store is open."""
        service.setServiceParent(self.exporters)

    def maintain(self, service) -> None:
        """Run C{service}, working on the store in the background, once it is recovered."""
        service.setServiceParent(self.maintenance)

    def serve_http(self, description: str, endpoint, site, websockets) -> None:
        """
        Serve C{site} (the dashboard, health and metrics) on C{endpoint} once
        the store is ready; C{websockets} is the factory of its WebSocket
        sessions, closed with the others on stop.
        """
        announcing = AnnouncingEndpoint(description, endpoint, "dashboard")
        self._endpoints.append(announcing)
        self._factories.append(websockets)
        StreamServerEndpointService(announcing, site).setServiceParent(self.http)

    def privilegedStartService(self):
        # Nothing listens before the store is open and recovered.
        Service.privilegedStartService(self)

    def startService(self):
        # Not MultiService's: each child starts once the one before is ready.
        Service.startService(self)
        self.ready = Deferred.fromCoroutine(self._start())
        self.ready.addErrback(self._failed_to_start)
        return self.ready

    def _failed_to_start(self, failure):
        if self.start_failed is not None:
            self.start_failed(failure)
        return failure

    async def _start(self):
        await self.store_service.startService()
        self.exporters.startService()
        recovered = await self.runs.recover()
        log.info("car-twisted: {count} runs left open by the last daemon ended incomplete", count=recovered)
        if self.sharing is not None:
            await self.sharing.startService()
        self.maintenance.startService()
        self.listeners.startService()
        self.http.startService()
        try:
            ports = await gatherResults([e.listened for e in self._endpoints], consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()
        if self.serving is not None:
            self.serving()
        return ports

    def stopService(self):
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        self.stopping = True
        if self.ready is not None:
            # A start failure was reported when it happened.
            await self.ready.addErrback(lambda _: None)
        if self.listeners.running:
            await self.listeners.stopService()
        if self.maintenance.running:
            await self.maintenance.stopService()
        for factory in self._factories:
            log.info(
                "car-twisted stopping: answering the requests in flight on {count} connections",
                count=len(factory.connections),
            )
            await factory.stop_serving()
        await self.runs.stop()
        if self.sharing is not None and self.sharing.running:
            await self.sharing.stopService()
        if self.exporters.running:
            await self.exporters.stopService()
        await self.store_service.stopService()
        if self.http.running:
            await self.http.stopService()
        log.info("car-twisted stopped: the store is closed")
