"""
Live OTLP export: every run that ends goes to an OpenTelemetry collector as
spans (L{car_twisted.export.spans}), over OTLP/HTTP protobuf.

The reactor never waits on the network: spans go into the queue of a
C{BatchSpanProcessor}, whose own thread sends them. When the queue is full
or a send fails the spans are dropped and counted in L{RunExporter.dropped_spans}.
"""

import os
import threading

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from car_twisted.export.spans import default_resource, run_spans

log = Logger()

TRACES_PATH = "/v1/traces"
#: Spans waiting to be sent at most (the SDK's default).
DEFAULT_QUEUE_SIZE = 2048
#: Spans sent in one request at most (the SDK's default).
EXPORT_BATCH = 512
#: Records read from the store per page when a run is exported.
READ_PAGE = 500


def traces_endpoint(base_url, environ=os.environ):
    """
    Where spans go: C{base_url}/v1/traces (C{--otlp-endpoint}), else
    C{$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT} as it is, else
    C{$OTEL_EXPORTER_OTLP_ENDPOINT}/v1/traces; None (export off) if none is set.

    @raise ValueError: the URL is not http(s).
    """
    if base_url:
        url = base_url.rstrip("/") + TRACES_PATH
    elif environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        url = environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    elif environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        url = environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + TRACES_PATH
    else:
        return None
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the OTLP endpoint must be an http:// or https:// URL, not {url!r}")
    return url


class _CountingExporter(SpanExporter):
    """Hands batches to the real exporter, counting what it took and lost."""

    def __init__(self, exporter, counts):
        self._exporter = exporter
        self._counts = counts

    def export(self, spans):
        self._counts.taken(len(spans))
        try:
            result = self._exporter.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
            log.failure("OTLP export: sending a batch of spans failed")
        self._counts.sent(len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self):
        self._exporter.shutdown()

    def force_flush(self, timeout_millis=30000):
        return self._exporter.force_flush(timeout_millis)


class SpanCounts:
    """
    Span counters shared by the reactor thread and the processor's thread.
    L{queued} is an upper bound on the processor's queue, so submitting only
    while it is under the queue's size means the processor never drops a
    span without it being counted here.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.submitted = 0
        self.exported = 0
        self.dropped = 0
        self._taken = 0

    def queued(self) -> int:
        with self._lock:
            return self.submitted - self._taken

    def submit(self, accepted: bool) -> None:
        with self._lock:
            if accepted:
                self.submitted += 1
            else:
                self.dropped += 1

    def taken(self, count: int) -> None:
        with self._lock:
            self._taken += count

    def sent(self, count: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self.exported += count
            else:
                self.dropped += count


class RunExporter(Service):
    """
    Exports each run that ends (L{run_ended}) as spans.

    @param store: where the ended run's records are read.
    @param exporter: the C{SpanExporter} that sends (L{otlp_exporter}).
    @param content: export prompt and output text too.
    @param schedule_delay_millis: how long the processor waits to fill a batch.
    """

    def __init__(self, reactor, store, exporter, content=False, max_queue_size=DEFAULT_QUEUE_SIZE,
                 schedule_delay_millis=1000):  # fmt: skip
        self._reactor = reactor
        self._store = store
        self._exporter = exporter
        self._content = content
        self._max_queue_size = max_queue_size
        self._schedule_delay_millis = schedule_delay_millis
        self._resource = default_resource()
        self._processor = None
        self._exports = set()  # Deferreds of the runs being read for export
        self.counts = SpanCounts()

    @property
    def dropped_spans(self) -> int:
        """Spans lost: the queue was full or the collector did not take them."""
        return self.counts.dropped

    @property
    def exported_spans(self) -> int:
        """Spans the collector acknowledged."""
        return self.counts.exported

    def startService(self):
        super().startService()
        self._processor = BatchSpanProcessor(
            _CountingExporter(self._exporter, self.counts),
            max_queue_size=self._max_queue_size,
            schedule_delay_millis=self._schedule_delay_millis,
            max_export_batch_size=min(EXPORT_BATCH, self._max_queue_size),
        )

    def stopService(self):
        """Finish reading the runs that ended, send what is queued (bounded
        by the exporter's timeout), then stop; the wait is on a thread of
        the reactor's pool."""
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        await DeferredList(list(self._exports))
        processor, self._processor = self._processor, None
        if processor is not None:
            pool = self._reactor.getThreadPool()
            await deferToThreadPool(self._reactor, pool, processor.shutdown)

    def run_ended(self, run_id: str) -> Deferred:
        """Export a run that just ended (its records are durable)."""
        d = Deferred.fromCoroutine(self._export(run_id))
        d.addErrback(lambda f: log.failure("OTLP export of run {run_id} failed", f, run_id=run_id))
        self._exports.add(d)
        d.addBoth(lambda _: self._exports.discard(d))
        return d

    async def _export(self, run_id: str) -> None:
        records, cursor = [], 0
        while True:
            page, cursor = await self._store.read_records(run_id, cursor, READ_PAGE)
            records.extend(page)
            if len(page) < READ_PAGE:
                break
        self.submit(run_spans(records, self._content, self._resource))

    def submit(self, spans) -> None:
        """Queue spans for sending, dropping (and counting) those past the queue's size."""
        for span in spans:
            accepted = self._processor is not None and self.counts.queued() < self._max_queue_size
            self.counts.submit(accepted)
            if accepted:
                self._processor.on_end(span)


def otlp_exporter(endpoint: str, timeout: float = 10.0) -> OTLPSpanExporter:
    """An OTLP/HTTP protobuf exporter sending to C{endpoint} (a full traces URL)."""
    return OTLPSpanExporter(endpoint=endpoint, timeout=timeout)


class SpanBatches:
    """
    Spans sent in batches, each send waited for: for ``car-twisted export``,
    which runs outside the reactor and would rather wait than drop.

    @ivar failed: spans the collector did not take.
    """

    def __init__(self, exporter, content=False):
        self._exporter = exporter
        self._content = content
        self._resource = default_resource()
        self._batch = []
        self.exported = 0
        self.failed = 0

    def write(self, records: list) -> None:
        self._batch.extend(run_spans(records, self._content, self._resource))
        if len(self._batch) >= EXPORT_BATCH:
            self._send()

    def _send(self) -> None:
        batch, self._batch = self._batch, []
        if self._exporter.export(batch) is SpanExportResult.SUCCESS:
            self.exported += len(batch)
        else:
            self.failed += len(batch)

    def close(self) -> None:
        if self._batch:
            self._send()
        self._exporter.shutdown()
