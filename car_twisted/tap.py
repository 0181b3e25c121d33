"""
``twistd car``: command-line options and the service they build.
"""

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from car_twisted.protocol import RunTracingFactory
from car_twisted.registry import DEFAULT_GRACE, RunRegistry
from car_twisted.store.memory import MemoryRunStore
from car_twisted.store.sqlite import SQLiteRunStore

log = Logger()

DEFAULT_LISTEN = "tcp:9100:interface=127.0.0.1"

#: --store name -> f(data_dir) building the store.
STORES = {
    "memory": lambda data_dir: MemoryRunStore(),
    "sqlite": SQLiteRunStore,
}


def default_data_dir() -> str:
    return os.environ.get("CAR_HOME") or os.path.expanduser("~/.car")


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT]... [--store memory] [--data-dir DIR] [--grace SECONDS] [--no-auth]"
    longdesc = "Serve the CAR agent-run-tracing protocol (JSON-RPC 2.0 over WebSocket)."

    optFlags = [
        ["no-auth", None, "Accept every session without a token (local experiments only)."],
    ]
    optParameters = [
        ["data-dir", None, None, "Where runs and tokens are kept [default: $CAR_HOME or ~/.car]."],
        ["store", None, "memory", "Run store: " + ", ".join(sorted(STORES)) + "."],
        ["grace", None, DEFAULT_GRACE, "Seconds a dropped producer's open runs wait before they are ended incomplete.", float],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """Endpoint to listen on (repeatable) [default: tcp:9100:interface=127.0.0.1]."""
        self["listen"].append(description)

    def postOptions(self):
        if self["store"] not in STORES:
            raise usage.UsageError(
                f"--store must be one of {', '.join(sorted(STORES))}, not {self['store']!r}"
            )
        if self["grace"] < 0:
            raise usage.UsageError("--grace must be zero or more seconds")
        self["listen"] = self["listen"] or [DEFAULT_LISTEN]
        from twisted.internet import reactor

        endpoints = []
        for description in self["listen"]:
            try:
                endpoints.append(serverFromString(reactor, description))
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--listen {description!r} is not a server endpoint: {e}")
        self["endpoints"] = endpoints
        self["data-dir"] = os.path.abspath(self["data-dir"] or default_data_dir())


class DaemonService(Service):
    """Opens the store, then listens on every endpoint; undoes it on stop."""

    def __init__(self, options, reactor):
        self._options = options
        self._reactor = reactor
        self._ports = []
        self.registry = None
        self.ready = None

    def startService(self):
        super().startService()
        self.ready = Deferred.fromCoroutine(self._start())
        self.ready.addErrback(self._failed_to_start)

    async def _start(self):
        options = self._options
        store = STORES[options["store"]](options["data-dir"])
        self.registry = RunRegistry(store, self._reactor, options["grace"])
        factory = RunTracingFactory(self.registry)
        log.info(
            "car-twisted: {store} store, data in {data_dir}, auth {auth}",
            store=options["store"],
            data_dir=options["data-dir"],
            auth="off" if options["no-auth"] else "on",
        )
        for description, endpoint in zip(options["listen"], options["endpoints"]):
            port = await endpoint.listen(factory)
            self._ports.append(port)
            log.info("car-twisted listening on {endpoint} ({address})", endpoint=description, address=port.getHost())

    def _failed_to_start(self, failure):
        log.failure("car-twisted could not start", failure)
        self._reactor.stop()

    def stopService(self):
        super().stopService()
        stopping = [port.stopListening() for port in self._ports]
        self._ports = []
        if self.registry is not None:
            stopping.append(self.registry.stop())
        return gatherResults(stopping)


def makeService(options):
    from twisted.internet import reactor

    return DaemonService(options, reactor)
