"""
``twistd car``: command-line options and the service they build.
"""

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from car_twisted import __version__
from car_twisted.auth import (
    HOST_TOKEN_FILE,
    SECRET_ENV,
    SECRET_FILE,
    Authenticator,
    TokenFileError,
)
from car_twisted.limits import WireLimits
from car_twisted.metrics import DaemonMetrics
from car_twisted.protocol import RunTracingFactory
from car_twisted.registry import DEFAULT_GRACE, RunRegistry
from car_twisted.store.file import DURABILITIES, FileRunStore
from car_twisted.store.memory import MemoryRunStore
from car_twisted.store.sqlite import SQLiteRunStore
from car_twisted.web.health import DaemonHealth
from car_twisted.web.live import DashboardFactory
from car_twisted.web.login import DashboardLogin
from car_twisted.web.site import dashboard_site

log = Logger()

DEFAULT_LISTEN = "tcp:9100:interface=127.0.0.1"
#: The HTTP side (dashboard, health, metrics): the WebSocket port + 1.
DEFAULT_HTTP = "tcp:9101:interface=127.0.0.1"

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
        "[--data-dir DIR] [--grace SECONDS] [--no-auth] [LIMIT OPTIONS]"
    )
    longdesc = "Serve the CAR agent-run-tracing protocol (JSON-RPC 2.0 over WebSocket)."

    optFlags = [
        ["no-auth", None, "Accept every session without a token (local experiments only)."],
    ]
    optParameters = [
        ["data-dir", None, None, "Where runs and tokens are kept [default: $CAR_HOME or ~/.car]."],
        ["store", None, DEFAULT_STORE, "Run store: " + ", ".join(sorted(STORES)) + "."],
        ["durability", None, "fsync", "When the file store acknowledges a write: fsync (on stable storage) or none (handed to the OS: survives a daemon crash, not a power cut)."],
        ["http", None, DEFAULT_HTTP, "Endpoint of the dashboard, /healthz and /metrics (none: no HTTP side)."],
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
        if self["http"] == "none":
            self["http-endpoint"] = None
        else:
            try:
                self["http-endpoint"] = serverFromString(reactor, self["http"])
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--http {self['http']!r} is not a server endpoint (or none): {e}")
        self["data-dir"] = os.path.abspath(self["data-dir"] or default_data_dir())

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
        self.health = None
        self._http_port = None
        self._dashboard = None
        self.ready = None

    def startService(self):
        super().startService()
        self.ready = Deferred.fromCoroutine(self._start())
        self.ready.addErrback(self._failed_to_start)

    async def _start(self):
        options = self._options
        authenticator = self._authenticator()
        store = await maybeDeferred(STORES[options["store"]], self._reactor, options)
        metrics = DaemonMetrics()
        if hasattr(store, "on_commit"):
            store.on_commit = metrics.commit
        self.registry = RunRegistry(
            store, self._reactor, options["grace"], authenticator=authenticator, metrics=metrics
        )
        metrics.watch(self.registry)
        self.factory = factory = RunTracingFactory(self.registry, options["limits"], metrics=metrics)
        log.info(
            "car-twisted {version}: {store} store, data in {data_dir}, auth {auth}",
            version=__version__,
            store=options["store"],
            data_dir=options["data-dir"],
            auth="off" if options["no-auth"] else "on",
        )
        recovered = await self.registry.recover()
        log.info("car-twisted: {count} runs left open by the last daemon ended incomplete", count=recovered)
        for description, endpoint in zip(options["listen"], options["endpoints"]):
            port = await endpoint.listen(factory)
            self._ports.append(port)
            log.info("car-twisted listening on {endpoint} ({address})", endpoint=description, address=port.getHost())
        if options["http-endpoint"] is not None:
            await self._serve_http(authenticator, metrics)

    async def _serve_http(self, authenticator, metrics):
        """Serve the dashboard, /healthz and /metrics on the --http endpoint."""
        options = self._options
        self.health = DaemonHealth(self.registry, metrics, options["store"])
        self._dashboard = DashboardFactory(self.registry, options["limits"], metrics)
        site = dashboard_site(
            DashboardLogin(authenticator.host_token), self.health, metrics, self._dashboard
        )
        self._http_port = await options["http-endpoint"].listen(site)
        log.info(
            "car-twisted dashboard on {endpoint} ({address})",
            endpoint=options["http"],
            address=self._http_port.getHost(),
        )

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
        if self.health is not None:
            self.health.stopping = True
        ports, self._ports = self._ports, []
        await gatherResults([port.stopListening() for port in ports])
        if self.factory is not None:
            log.info(
                "car-twisted stopping: answering the requests in flight on {count} connections",
                count=len(self.factory.connections),
            )
            await self.factory.stop_serving()
        if self._dashboard is not None:
            await self._dashboard.stop_serving()
        if self.registry is not None:
            await self.registry.stop()
        if self._http_port is not None:
            # Last, so /healthz answers 503 while the daemon stops.
            await self._http_port.stopListening()
        log.info("car-twisted stopped: the store is closed")


def makeService(options):
    from twisted.internet import reactor

    return DaemonService(options, reactor, os.environ)
