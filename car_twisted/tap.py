"""
``twistd car``: command-line options and the service they build.
"""

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from car_twisted.auth import (
    HOST_TOKEN_FILE,
    SECRET_ENV,
    SECRET_FILE,
    Authenticator,
    TokenFileError,
)
from car_twisted.export.otlp import RunExporter, otlp_exporter, traces_endpoint
from car_twisted.limits import WireLimits
from car_twisted.protocol import RunTracingFactory
from car_twisted.registry import DEFAULT_GRACE, RunRegistry
from car_twisted.retention import Retention
from car_twisted.store.file import DURABILITIES, FileRunStore
from car_twisted.store.memory import MemoryRunStore
from car_twisted.store.sqlite import SQLiteRunStore

log = Logger()

DEFAULT_LISTEN = "tcp:9100:interface=127.0.0.1"

#: --store name -> f(reactor, options) returning the store, or a Deferred of it.
STORES = {
    "file": lambda reactor, options: FileRunStore.open(
        reactor, options["data-dir"], options["durability"]
    ),
    "memory": lambda reactor, options: MemoryRunStore(),
    "sqlite": lambda reactor, options: SQLiteRunStore(options["data-dir"], reactor),
}
DEFAULT_STORE = "file"

_DEFAULT_LIMITS = WireLimits()
#: The smallest --max-message-size: a 256 KiB turn record and its envelope
#: must fit in one answer.
MIN_MESSAGE_SIZE = 512 * 1024
#: The deepest --max-depth: what the daemon stores it must encode again
#: inside a few more levels of envelope.
MAX_DEPTH = 200

#: Option name -> (WireLimits field, type, lowest value, description).
LIMIT_OPTIONS = {
    "max-message-size": ("max_message_size", int, MIN_MESSAGE_SIZE, "Largest WebSocket frame or message in bytes, either way; a bigger one from a client closes its connection with 1009."),
    "ping-interval": ("auto_ping_interval", float, 0, "Seconds between keepalive pings (0: no pings)."),
    "ping-timeout": ("auto_ping_timeout", float, 0, "Seconds a pinged peer may stay silent before it is dropped (its runs then get the grace window)."),
    "open-handshake-timeout": ("open_handshake_timeout", float, 0, "Seconds a client has to complete the WebSocket upgrade."),
    "close-handshake-timeout": ("close_handshake_timeout", float, 0, "Seconds to wait for the peer's close frame before dropping it."),
    "max-connections": ("max_connections", int, 1, "Open connections past which new ones are refused with HTTP 503."),
    "max-batch": ("max_batch", int, 1, "Requests in one JSON-RPC batch; a longer batch gets one -32600 error and nothing runs."),
    "max-depth": ("max_depth", int, 2, f"Nesting of arrays and objects in one frame (at most {MAX_DEPTH}); deeper frames get -32600."),
    "max-in-flight": ("max_in_flight", int, 1, "Frames of one session handled at once; past it the daemon stops reading that client until answers drain."),
}


def default_data_dir(environ=os.environ) -> str:
    return environ.get("CAR_HOME") or os.path.expanduser("~/.car")


class Options(usage.Options):
    synopsis = (
        "[--listen ENDPOINT]... [--store file|memory|sqlite] [--durability fsync|none] "
        "[--data-dir DIR] [--grace SECONDS] [--no-auth] [--retain-days N] "
        "[--otlp-endpoint URL [--otlp-content]] [LIMIT OPTIONS]"
    )
    longdesc = "Serve the CAR agent-run-tracing protocol (JSON-RPC 2.0 over WebSocket)."

    optFlags = [
        ["no-auth", None, "Accept every session without a token (local experiments only)."],
        ["otlp-content", None, "Export prompt and output text in the OTLP spans too (it is sensitive)."],
    ]
    optParameters = [
        ["data-dir", None, None, "Where runs and tokens are kept [default: $CAR_HOME or ~/.car]."],
        ["store", None, DEFAULT_STORE, "Run store: " + ", ".join(sorted(STORES)) + "."],
        ["durability", None, "fsync", "When the file store acknowledges a write: fsync (on stable storage) or none (handed to the OS: survives a daemon crash, not a power cut)."],
        ["otlp-endpoint", None, None, "Export every run as it ends to this OpenTelemetry collector (base URL; spans go to URL/v1/traces) [default: $OTEL_EXPORTER_OTLP_ENDPOINT, else off]. See docs/export.md."],
        ["retain-days", None, None, "Prune ended runs older than this many days, in the background [default: keep forever].", int],
        ["grace", None, DEFAULT_GRACE, "Seconds a dropped producer's open runs wait before they are ended incomplete.", float],
    ] + [
        [name, None, getattr(_DEFAULT_LIMITS, field), description, kind]
        for name, (field, kind, _, description) in LIMIT_OPTIONS.items()
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """Endpoint to listen on (repeatable) [default: tcp:9100:interface=127.0.0.1]."""
        self["listen"].append(description)

    def postOptions(self):
        for name, choices in (("store", sorted(STORES)), ("durability", DURABILITIES)):
            if self[name] not in choices:
                raise usage.UsageError(
                    f"--{name} must be one of {', '.join(choices)}, not {self[name]!r}"
                )
        if self["retain-days"] is not None and self["retain-days"] < 1:
            raise usage.UsageError("--retain-days must be at least 1")
        if self["grace"] < 0:
            raise usage.UsageError("--grace must be zero or more seconds")
        self["limits"] = self._limits()
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
        try:
            self["otlp-traces-endpoint"] = traces_endpoint(self["otlp-endpoint"])
        except ValueError as e:
            raise usage.UsageError(f"--otlp-endpoint: {e}")

    def _limits(self) -> WireLimits:
        for name, (_, _, lowest, _) in LIMIT_OPTIONS.items():
            if self[name] < lowest:
                raise usage.UsageError(f"--{name} must be at least {lowest}, not {self[name]}")
        if self["max-depth"] > MAX_DEPTH:
            raise usage.UsageError(f"--max-depth must be at most {MAX_DEPTH}, not {self['max-depth']}")
        return WireLimits(**{field: self[name] for name, (field, _, _, _) in LIMIT_OPTIONS.items()})


class DaemonService(Service):
    """
    Loads the auth secrets, opens the store, ends the runs the last daemon
    left open, then listens on every endpoint; undoes it on stop. C{environ}
    is where C{CAR_AUTH_TOKEN} is looked up.
    """

    def __init__(self, options, reactor, environ=os.environ):
        self._options = options
        self._reactor = reactor
        self._environ = environ
        self._ports = []
        self.registry = None
        self.factory = None
        #: The L{RunExporter}, when OTLP export is on.
        self.exporter = None
        self.retention = None
        self.ready = None

    def startService(self):
        super().startService()
        self.ready = Deferred.fromCoroutine(self._start())
        self.ready.addErrback(self._failed_to_start)

    async def _start(self):
        options = self._options
        authenticator = self._authenticator()
        store = await maybeDeferred(STORES[options["store"]], self._reactor, options)
        self.registry = RunRegistry(
            store, self._reactor, options["grace"], authenticator=authenticator
        )
        self.retention = Retention(
            store, self._reactor, authenticator, days=options["retain-days"]
        )
        self.registry.extra_methods["runs.prune"] = self.retention.prune_method
        self.factory = factory = RunTracingFactory(self.registry, options["limits"])
        endpoint = options["otlp-traces-endpoint"]
        if endpoint is not None:
            self.exporter = RunExporter(
                self._reactor, store, otlp_exporter(endpoint), content=options["otlp-content"]
            )
            self.exporter.startService()
            self.registry.run_ended_observers.append(self.exporter.run_ended)
            log.info("car-twisted: runs are exported to {endpoint} as they end", endpoint=endpoint)
        log.info(
            "car-twisted: {store} store, data in {data_dir}, auth {auth}",
            store=options["store"],
            data_dir=options["data-dir"],
            auth="off" if options["no-auth"] else "on",
        )
        recovered = await self.registry.recover()
        log.info("car-twisted: {count} runs left open by the last daemon ended incomplete", count=recovered)
        self.retention.startService()
        for description, endpoint in zip(options["listen"], options["endpoints"]):
            port = await endpoint.listen(factory)
            self._ports.append(port)
            log.info("car-twisted listening on {endpoint} ({address})", endpoint=description, address=port.getHost())

    def _authenticator(self):
        """
        The daemon's authenticator; the secrets are made at first start.
        Logs where the tokens are, never the tokens.
        """
        if self._options["no-auth"]:
            log.warn("car-twisted: auth is OFF (--no-auth): every session is accepted")
            return Authenticator.disabled()
        data_dir = self._options["data-dir"]
        authenticator = Authenticator.from_data_dir(data_dir, self._environ)
        log.info(
            "car-twisted: auth on; agent tokens derive from {secret}, the host token is in {host}",
            secret=(
                f"${SECRET_ENV}"
                if self._environ.get(SECRET_ENV)
                else os.path.join(data_dir, SECRET_FILE)
            ),
            host=os.path.join(data_dir, HOST_TOKEN_FILE),
        )
        return authenticator

    def _failed_to_start(self, failure):
        if failure.check(TokenFileError):
            log.critical("car-twisted could not start: {error}", error=failure.value)
        else:
            log.failure("car-twisted could not start", failure)
        self._reactor.stop()

    def stopService(self):
        """
        Graceful stop (SIGTERM): stop accepting connections, answer every
        request in flight, close the connections, then flush and close the
        store. Runs still open stay open; the next start ends them
        incomplete.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self.ready is not None:
            await self.ready
        ports, self._ports = self._ports, []
        await gatherResults([port.stopListening() for port in ports])
        if self.factory is not None:
            log.info(
                "car-twisted stopping: answering the requests in flight on {count} connections",
                count=len(self.factory.connections),
            )
            await self.factory.stop_serving()
        if self.retention is not None:
            await self.retention.stopService()
        if self.registry is not None:
            await self.registry.stop()
        if self.exporter is not None:
            await self.exporter.stopService()
        log.info("car-twisted stopped: the store is closed")


def makeService(options):
    from twisted.internet import reactor

    return DaemonService(options, reactor, os.environ)
