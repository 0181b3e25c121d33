"""
The daemon's Prometheus metrics, in a registry of its own.

Each daemon gets its own C{CollectorRegistry} (never the process-global
one), so several daemons in one process keep apart. Labels name kinds of
things (a JSON-RPC error code, a termination), never a run or an agent:
their number must stay bounded. The list and what each measures is in
docs/dashboard.md.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

#: Seconds: a commit that fsyncs lands in the low milliseconds.
WRITE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Writes per commit: one under light load, hundreds when writers share a flush.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class DaemonMetrics:
    """
    The counters and gauges one daemon updates, and their registry.

    Gauges of state the run service already holds (sessions, open runs,
    grace timers, a failing store) are read from it when scraped, once
    L{watch} is called. The counters moved on every request
    (C{frames_received}, C{frames_sent}, C{runs_started}) are plain integers
    the hot path adds to, read when scraped: a Prometheus counter takes a
    lock on each increment.
    """

    def __init__(self, registry: CollectorRegistry = None):
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.sessions = Gauge("car_sessions_connected", "WebSocket sessions open now.", registry=registry)
        self.frames_received = 0
        self.frames_sent = 0
        self.runs_started = 0
        registry.register(_HotCounters(self))
        self.errors = Counter("car_rpc_errors", "JSON-RPC error answers, by error code.", ["code"], registry=registry)
        self.runs_ended = Counter("car_runs_ended", "Runs ended, by termination.", ["termination"], registry=registry)
        self.open_runs = Gauge("car_open_runs", "Runs this daemon holds open now.", registry=registry)
        self.grace_timers = Gauge("car_grace_timers_pending", "Open runs whose producer left, waiting out the grace window.", registry=registry)
        self.write_seconds = Histogram("car_store_write_seconds", "Seconds from a store commit's start until it is durable.", buckets=WRITE_SECONDS_BUCKETS, registry=registry)
        self.commit_batch = Histogram("car_store_commit_batch_size", "Writes made durable by one store commit.", buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.events_dropped = Counter("car_follower_events_dropped", "Live trace events dropped for followers that did not read.", registry=registry)
        self.store_failing = Gauge("car_store_failing", "1 while the store's last write failed.", registry=registry)
        self.connections_refused = Counter("car_connections_refused", "Connections refused at the connection cap.", registry=registry)

    def watch(self, runs) -> None:
        """Read the session, open-run, grace-timer and store gauges from a L{RunService}."""
        self.sessions.set_function(lambda: len(runs.sessions))
        self.open_runs.set_function(lambda: runs.open_run_count)
        self.grace_timers.set_function(lambda: runs.grace_timer_count)
        self.store_failing.set_function(lambda: runs.store_failure is not None)

    def watch_export(self, exporter) -> None:
        """Read the OTLP span counters from a L{car_twisted.export.otlp.RunExporter}."""
        self.registry.register(_ExportCollector(exporter))

    def error(self, code: int) -> None:
        self.errors.labels(code=str(code)).inc()

    def run_ended(self, termination: str) -> None:
        self.runs_ended.labels(termination=termination).inc()

    def commit(self, size: int, seconds: float) -> None:
        """A store commit of C{size} writes took C{seconds}."""
        self.commit_batch.observe(size)
        self.write_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _HotCounters:
    """Exposes a L{DaemonMetrics}' integer counters when scraped."""

    def __init__(self, metrics: DaemonMetrics):
        self._metrics = metrics

    def collect(self):
        for name, help_text, value in (
            ("car_frames_received", "WebSocket messages received.", self._metrics.frames_received),
            ("car_frames_sent", "WebSocket messages sent (answers and events).", self._metrics.frames_sent),
            ("car_runs_started", "Runs started.", self._metrics.runs_started),
        ):
            yield CounterMetricFamily(name, help_text, value=value)


class _ExportCollector:
    """The exporter's span counts, read when scraped (they change on its sender thread)."""

    def __init__(self, exporter):
        self._exporter = exporter

    def collect(self):
        yield CounterMetricFamily(
            "car_otlp_spans_exported",
            "Spans the OTLP collector acknowledged.",
            value=self._exporter.exported_spans,
        )
        yield CounterMetricFamily(
            "car_otlp_spans_dropped",
            "Spans dropped: the export queue was full or the collector did not take them.",
            value=self._exporter.dropped_spans,
        )
