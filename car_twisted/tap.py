"""
``twistd car``: the command-line options, and the composition root that
builds every part of the daemon from them and wires the parts together.
"""

import gc
import os
import resource
import socket
import sys
from dataclasses import dataclass
from typing import Optional

from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from car_twisted import __version__
from car_twisted.access import AccessPolicy
from car_twisted.auth import HOST_TOKEN_FILE, SECRET_ENV, SECRET_FILE, Authenticator, TokenFileError
from car_twisted.data_dir import default_data_dir
from car_twisted.export.otlp import RunExporter, otlp_exporter, traces_endpoint
from car_twisted.fanout import TraceFanout
from car_twisted.handshake import handshake
from car_twisted.interfaces import ISharedRunStore
from car_twisted.jsonrpc import Dispatcher
from car_twisted.limits import WireLimits
from car_twisted.metrics import DaemonMetrics
from car_twisted.protocol import RunTracingFactory
from car_twisted.reads import RunReader
from car_twisted.retention import Retention
from car_twisted.runs import DEFAULT_GRACE, RunService
from car_twisted.service import CannotStart, DaemonService, SharedStoreService
from car_twisted.shared import SharedRuns
from car_twisted.store.file import CHECKPOINT_BYTES, DURABILITIES, FileRunStore
from car_twisted.store.memory import MemoryRunStore
from car_twisted.store.postgresql import DEFAULT_LEASE, DSN_ENV, PostgresRunStore, redacted
from car_twisted.store.postgresql import RunDatabaseError as SharedDatabaseError
from car_twisted.store.sqlite import RunDatabaseError, SQLiteRunStore
from car_twisted.web.health import DaemonHealth
from car_twisted.web.live import DashboardFactory, read_methods
from car_twisted.web.login import DashboardLogin
from car_twisted.web.site import dashboard_site

log = Logger()

DEFAULT_LISTEN = "tcp:9100:interface=127.0.0.1"
#: The HTTP side (dashboard, health, metrics): the WebSocket port + 1.
DEFAULT_HTTP = "tcp:9101:interface=127.0.0.1"

#: --store name -> f(reactor, options) returning the (not yet open) store.
STORES = {
    "file": lambda reactor, options: FileRunStore(
        reactor, options["data-dir"], options["durability"], options["journal-bytes"]
    ),
    "memory": lambda reactor, options: MemoryRunStore(),
    "sqlite": lambda reactor, options: SQLiteRunStore(options["data-dir"], reactor),
    "postgresql": lambda reactor, options: PostgresRunStore(
        reactor,
        options["dsn"],
        name=f"{socket.gethostname()}:{options['data-dir']}",
        lease=options["lease"],
    ),
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
    "max-unsent-bytes": ("max_unsent_bytes", int, 64 * 1024, "Bytes of answers and events one session has not yet been sent; past it the daemon stops reading that client until they drain."),
    "auth-timeout": ("auth_timeout", float, 1, "Seconds a client has, with auth on, to succeed at session.auth after connecting; then it is closed with 4001."),
}


class Options(usage.Options):
    synopsis = (
        "[--listen ENDPOINT]... [--http ENDPOINT|none] [--store file|memory|sqlite|postgresql] "
        "[--durability fsync|none] [--data-dir DIR] [--dsn DSN] [--lease SECONDS] [--grace SECONDS] "
        "[--no-auth] [--retain-days N] [--otlp-endpoint URL [--otlp-content]] [LIMIT OPTIONS]"
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
        ["dsn", None, None, f"The PostgreSQL database of --store postgresql (a libpq DSN or URL) [default: ${DSN_ENV}]."],
        ["lease", None, DEFAULT_LEASE, "With --store postgresql: seconds a daemon that stopped heartbeating stays alive in its peers' eyes; then a peer ends its open runs incomplete.", float],
        ["journal-bytes", None, CHECKPOINT_BYTES, "How large the file store's journal grows before a checkpoint syncs the run files and drops it.", int],
        ["http", None, DEFAULT_HTTP, "Endpoint of the dashboard, /healthz and /metrics (none: no HTTP side)."],
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

    def parseOptions(self, options=None):
        """
        Parse the command line; a bad option ends the process with one line
        naming it (twistd would print its whole help first) and status 1.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"car-twisted: {e} (twistd car --help lists the options)")

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
        if self["journal-bytes"] < 1:
            raise usage.UsageError("--journal-bytes must be 1 or more")
        if self["grace"] < 0:
            raise usage.UsageError("--grace must be zero or more seconds")
        if self["lease"] <= 0:
            raise usage.UsageError("--lease must be more than zero seconds")
        self["dsn"] = self["dsn"] or os.environ.get(DSN_ENV)
        if self["store"] == "postgresql" and not self["dsn"]:
            raise usage.UsageError(f"--store postgresql needs --dsn DSN or ${DSN_ENV}")
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


def wire_methods(authenticator, runs, reader, retention) -> dict:
    """The JSON-RPC method table: wire name -> method, from their owners."""
    return {
        "session.auth": authenticator.authenticate,
        "server.handshake": handshake,
        **runs.methods(),
        **reader.methods(),
        **retention.methods(),
    }


def _authenticator(options, environ) -> Authenticator:
    """
    The daemon's authenticator; the secrets are made at first start. Logs
    where the tokens are, never the tokens.
    """
    if options["no-auth"]:
        log.warn("car-twisted: auth is OFF (--no-auth): every session is accepted")
        return Authenticator.disabled()
    data_dir = options["data-dir"]
    authenticator = Authenticator.from_data_dir(data_dir, environ)
    log.info(
        "car-twisted: auth on; agent tokens derive from {secret}, the host token is in {host}",
        secret=f"${SECRET_ENV}" if environ.get(SECRET_ENV) else os.path.join(data_dir, SECRET_FILE),
        host=os.path.join(data_dir, HOST_TOKEN_FILE),
    )
    return authenticator


@dataclass(frozen=True)
class Daemon:
    """The parts of one daemon, wired."""

    store: object
    fanout: TraceFanout
    runs: RunService
    reader: RunReader
    #: The JSON-RPC method table the dispatcher serves.
    methods: dict
    dispatcher: Dispatcher
    factory: RunTracingFactory
    metrics: DaemonMetrics
    #: The dashboard's WebSocket sessions (``/ws``): the host, reading.
    dashboard: DashboardFactory
    #: Prunes old ended runs (``--retain-days``, ``runs.prune``).
    retention: Retention
    #: Exports each run as it ends (``--otlp-endpoint``), if on.
    exporter: Optional[RunExporter] = None


def assemble(
    store,
    clock,
    authenticator: Authenticator,
    limits: WireLimits = WireLimits(),
    grace: float = DEFAULT_GRACE,
    environ=os.environ,
    exporter: Optional[RunExporter] = None,
    retain_days: Optional[int] = None,
) -> Daemon:
    """
    Wire a daemon's parts around C{store}: the run service and the reader
    share the followers and the access policy, the dispatcher serves their
    methods, the retention's and C{authenticator}'s, the factory serves the
    dispatcher; the dashboard's factory serves a dispatcher of the read
    methods only. All count in one L{DaemonMetrics}. C{environ} is where
    C{CAR_AGENT_ID} is looked up. C{exporter} (if any) is told of each run
    that ends; C{retain_days} (if any) prunes in the background. A store
    several daemons share (L{ISharedRunStore}) gets the L{SharedRuns} that
    writes to, and follows, the runs other daemons produce.
    """
    metrics = DaemonMetrics()
    if hasattr(store, "on_commit"):
        # The file, SQLite and PostgreSQL stores report each commit's size and time.
        store.on_commit = metrics.commit
    fanout = TraceFanout()
    policy = AccessPolicy(authenticator.enabled)
    observers = ()
    if exporter is not None:
        metrics.watch_export(exporter)
        observers = (exporter.run_ended,)
    shared = SharedRuns(store, fanout, policy) if ISharedRunStore.providedBy(store) else None
    runs = RunService(
        store, fanout, policy, clock, grace, environ, metrics=metrics,
        run_ended_observers=observers, shared=shared,
    )  # fmt: skip
    metrics.watch(runs)
    reader = RunReader(store, fanout, policy, on_followed=runs.run_changed if shared else None)
    retention = Retention(store, clock, policy, days=retain_days)
    methods = wire_methods(authenticator, runs, reader, retention)
    dispatcher = Dispatcher(methods, authenticator.admit, limits, metrics.error)
    factory = RunTracingFactory(
        dispatcher, runs, limits, clock, authenticator.enabled, metrics=metrics
    )
    dashboard = DashboardFactory(
        Dispatcher(read_methods(methods), limits=limits, on_error=metrics.error),
        runs,
        limits,
        clock,
        metrics=metrics,
    )
    return Daemon(
        store, fanout, runs, reader, methods, dispatcher, factory, metrics, dashboard, retention, exporter
    )


def build_daemon(options, reactor, environ=os.environ) -> DaemonService:
    """
    The composition root: the daemon's service tree, from its options.
    C{environ} is where C{CAR_AUTH_TOKEN} and C{CAR_AGENT_ID} are looked up.
    """
    authenticator = _authenticator(options, environ)
    store = STORES[options["store"]](reactor, options)
    exporter = None
    if options["otlp-traces-endpoint"] is not None:
        exporter = RunExporter(
            reactor, store, otlp_exporter(options["otlp-traces-endpoint"]), options["otlp-content"]
        )
    parts = assemble(
        store,
        reactor,
        authenticator,
        options["limits"],
        options["grace"],
        environ,
        exporter,
        options["retain-days"],
    )
    daemon = DaemonService(parts.store, parts.runs)
    if ISharedRunStore.providedBy(parts.store):
        daemon.share(SharedStoreService(parts.store, parts.runs))
    daemon.maintain(parts.retention)
    if exporter is not None:
        daemon.export(exporter)
        log.info(
            "car-twisted: runs are exported to {endpoint} as they end",
            endpoint=options["otlp-traces-endpoint"],
        )
    for description, endpoint in zip(options["listen"], options["endpoints"]):
        daemon.listen(description, endpoint, parts.factory)
    if options["http-endpoint"] is not None:
        health = DaemonHealth(parts.runs, options["store"], lambda: daemon.stopping)
        site = dashboard_site(
            DashboardLogin(authenticator.host_token), health, parts.metrics, parts.dashboard
        )
        daemon.serve_http(options["http"], options["http-endpoint"], site, parts.dashboard)
    log.info(
        "car-twisted {version}: {store} store, data in {data_dir}, auth {auth}",
        version=__version__,
        store=options["store"],
        data_dir=redacted(options["dsn"]) if options["store"] == "postgresql" else options["data-dir"],
        auth="off" if options["no-auth"] else "on",
    )
    return daemon


#: Open files the daemon needs besides one per WebSocket connection: its
#: listeners, log, store files (the file store keeps up to 192 open between
#: writes and reads, besides its journal and lock) and the HTTP side's
#: connections (at most 128, L{car_twisted.limits.MAX_HTTP_CONNECTIONS}).
FD_HEADROOM = 384


def raise_open_file_limit(max_connections: int, limits=resource) -> int:
    """
    Raise this process's soft open-file limit to what C{max_connections}
    needs (one descriptor per connection, plus L{FD_HEADROOM}), at most to
    the hard limit: supervisors commonly start services with a soft limit of
    1,024 (docs/deploy.md). Warns when even that is too low for the cap,
    not the kernel, to be what refuses connections. C{limits} is the
    C{resource} module or a stand-in. Returns the soft limit now in force.
    """
    wanted = max_connections + FD_HEADROOM
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    unlimited = limits.RLIM_INFINITY
    if soft != unlimited and soft < wanted:
        soft = wanted if hard == unlimited else min(wanted, hard)
        limits.setrlimit(limits.RLIMIT_NOFILE, (soft, hard))
    if soft != unlimited and soft < wanted:
        log.warn(
            "car-twisted: the open-file limit is {limit}, below --max-connections {connections}"
            " + {headroom}: connections past it fail in the kernel, not with HTTP 503",
            limit=soft,
            connections=max_connections,
            headroom=FD_HEADROOM,
        )
    return soft


def makeService(options):
    """
    The daemon twistd runs. A daemon that cannot start says why in one line
    on stderr and exits 1, whether it fails here (the secrets) or once
    started (the store, recovery, a listener). Its open-file limit is
    raised first (L{raise_open_file_limit}); once it serves, what it built
    at start-up is kept out of garbage collection (L{freeze_start_up}).
    """
    from twisted.internet import reactor

    raise_open_file_limit(options["limits"].max_connections)
    try:
        daemon = build_daemon(options, reactor, os.environ)
    except EXPLAINED_START_FAILURES as e:
        raise SystemExit(f"car-twisted could not start: {_one_line(Failure(e))}")
    daemon.start_failed = lambda failure: exit_process(reactor, failure)
    daemon.serving = freeze_start_up
    return daemon


def freeze_start_up() -> None:
    """
    Move every object alive once the daemon serves (modules, the store's
    start-up state) out of the collector's reach: a full collection then
    walks only what was made since, not the whole heap again (2-20 us per
    request; docs/performance.md). For the daemon process only: an embedder
    owns its own process's collector.
    """
    gc.collect()
    gc.freeze()


#: Start failures whose message says all there is to say: no traceback.
EXPLAINED_START_FAILURES = (
    OSError,
    RuntimeError,
    TokenFileError,
    RunDatabaseError,
    SharedDatabaseError,
    CannotStart,
)


def _one_line(failure) -> str:
    return " ".join(failure.getErrorMessage().split()) or failure.type.__name__


def exit_process(reactor, failure) -> None:
    """
    End a daemon that could not start, so a supervisor sees it: one line on
    the process's stderr (twistd sends C{sys.stderr} to the log), a clean
    stop once the reactor runs (a stop before it runs would hang), then exit
    status 1 (twistd exits 0 after any stop).
    """
    reason = _one_line(failure)
    if not failure.check(*EXPLAINED_START_FAILURES):
        log.failure("car-twisted could not start", failure)
    log.error("car-twisted could not start: {reason}", reason=reason)
    sys.__stderr__.write(f"car-twisted could not start: {reason}\n")
    sys.__stderr__.flush()
    reactor.addSystemEventTrigger("after", "shutdown", _exit, 1)
    reactor.callWhenRunning(_stop_reactor, reactor)


def _stop_reactor(reactor) -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping: the shutdown trigger still exits


def _exit(status: int) -> None:
    """Exit now, the log written out: the services have stopped."""
    for stream in (sys.__stdout__, sys.__stderr__):
        stream.flush()
    os._exit(status)
