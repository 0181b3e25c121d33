"""
Live OTLP export: runs that end reach a local OTLP/HTTP receiver as GenAI
spans; a receiver that is down costs counted spans, never the daemon.
"""

import threading

from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import StatusCode
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial import unittest

from car_twisted.access import AccessPolicy
from car_twisted.export.otlp import RunExporter, otlp_exporter, traces_endpoint
from car_twisted.export.spans import nanoseconds, run_spans
from car_twisted.fanout import TraceFanout
from car_twisted.records import started_record
from car_twisted.runs import RunService
from car_twisted.service import DaemonService
from car_twisted.store.file import FileRunStore
from car_twisted.store.memory import MemoryRunStore
from car_twisted.tap import Options, build_daemon
from tests.otlp_receiver import OTLPReceiver
from tests.support import SUCCESS_OUTCOME, HeldStore, RPCClient, serve, wait_for

START = {"agent_id": "agent-a", "intent": "fix the build"}
MODEL_TURN = {
    "model_id": "gpt-test",
    "assistant_text": "I will run the tests",
    "token_usage": {"prompt_tokens": 120, "completion_tokens": 34},
    "duration_ms": 250.0,
}
TOOL_TURNS = [
    {"tool": "shell", "parameters": {"cmd": "make test"}, "prompt": "run it", "output": "2 failed"},
    {"prompt": "thinking, no tool"},
    {"tool": "editor", "output": "patched"},
]
FAILED = dict(SUCCESS_OUTCOME, status="failure")


def attributes(span) -> dict:
    """A protobuf span's attributes as a plain dict."""
    values = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind)
    return values


class LiveExportTests(unittest.TestCase):
    async def setup_daemon(self, content=False, endpoint=None, timeout=10.0):
        self.receiver = await OTLPReceiver.listen(self)
        store = MemoryRunStore()
        url = endpoint or traces_endpoint(self.receiver.base_url, {})
        self.exporter = RunExporter(
            reactor, store, otlp_exporter(url, timeout), content=content,
            schedule_delay_millis=10,
        )  # fmt: skip
        self.exporter.startService()
        self.addCleanup(self.exporter.stopService)
        self.daemon = await serve(self, store=store, exporter=self.exporter)

    async def received(self, run_id: str, count: int) -> list:
        """The spans of a run, once C{count} of them arrived."""
        trace_id = bytes.fromhex(run_id.replace("-", ""))
        await wait_for(lambda: len(self.receiver.by_trace(trace_id)) >= count, f"{count} spans", 30)
        return self.receiver.by_trace(trace_id)

    async def records(self, run_id):
        return (await self.daemon.store.read_records(run_id, 0, 100))[0]

    async def test_completed_run_with_model_and_tool_turns(self):
        """A completed run is one invoke_agent span whose children are a
        chat span per model turn and an execute_tool span per turn with a
        tool, with the GenAI attributes, the recorded times and no text."""
        await self.setup_daemon()
        ws = await self.daemon.connect()
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.call("runs.record_model_turn", dict(MODEL_TURN, run_id=run_id))
        await ws.call("runs.record_turns", {"run_id": run_id, "turns": TOOL_TURNS})
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})

        spans = await self.received(run_id, 4)
        records = await self.records(run_id)
        started, model_turn, shell, _, editor, ended = records
        by_name = {span.name: span for span in spans}
        self.assertEqual(
            sorted(by_name),
            ["chat gpt-test", "execute_tool editor", "execute_tool shell", "invoke_agent agent-a"],
        )
        root = by_name["invoke_agent agent-a"]
        self.assertEqual(root.parent_span_id, b"")
        self.assertEqual(
            attributes(root),
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.id": "agent-a",
                "gen_ai.agent.name": "agent-a",
                "gen_ai.conversation.id": run_id,
                "car.run.status": "completed",
                "car.outcome.status": "success",
            },
        )
        self.assertEqual(root.status.code, StatusCode.OK.value)
        self.assertEqual(root.start_time_unix_nano, nanoseconds(started["started_at"]))
        self.assertEqual(root.end_time_unix_nano, nanoseconds(ended["ended_at"]))

        chat = by_name["chat gpt-test"]
        self.assertEqual(
            attributes(chat),
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "gpt-test",
                "gen_ai.usage.input_tokens": 120,
                "gen_ai.usage.output_tokens": 34,
                "car.turn.index": 0,
            },
        )
        chat_end = nanoseconds(model_turn["recorded_at"])
        self.assertEqual(chat.end_time_unix_nano, chat_end)
        self.assertEqual(
            chat.start_time_unix_nano,
            max(chat_end - 250_000_000, root.start_time_unix_nano),
        )

        tool = by_name["execute_tool shell"]
        self.assertEqual(
            attributes(tool),
            {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": "shell",
                "car.turn.index": 1,
                "car.turn.verifier_verdict": "not_run",
            },
        )
        self.assertEqual(tool.start_time_unix_nano, chat_end)
        self.assertEqual(tool.end_time_unix_nano, nanoseconds(shell["recorded_at"]))
        self.assertEqual(attributes(by_name["execute_tool editor"])["car.turn.index"], 3)
        self.assertEqual(
            by_name["execute_tool editor"].end_time_unix_nano, nanoseconds(editor["recorded_at"])
        )
        for child in spans:
            self.assertEqual(child.trace_id, root.trace_id)
            self.assertLessEqual(root.start_time_unix_nano, child.start_time_unix_nano)
            self.assertLessEqual(child.end_time_unix_nano, root.end_time_unix_nano)
            if child is not root:
                self.assertEqual(child.parent_span_id, root.span_id)
        self.assertEqual(len({span.span_id for span in spans}), 4)
        resource, scope, _ = self.receiver.spans[0]
        self.assertIn("car-twisted", str(resource.attributes))
        self.assertEqual(scope.name, "car_twisted.export")

    async def test_failed_outcome_is_an_error(self):
        """An outcome of failure: the run span is an error with error.type."""
        await self.setup_daemon()
        ws = await self.daemon.connect()
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.call("runs.complete", {"run_id": run_id, "outcome": FAILED})
        (root,) = await self.received(run_id, 1)
        self.assertEqual(root.status.code, StatusCode.ERROR.value)
        self.assertEqual(attributes(root)["error.type"], "failure")

    async def test_incomplete_run(self):
        """A run whose producer went away is exported when the grace window
        ends it: an error span with error.type incomplete, its turns below."""
        await self.setup_daemon()
        ws = await self.daemon.connect()
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.call("runs.record_turns", {"run_id": run_id, "turns": TOOL_TURNS[:1]})
        await ws.drop()
        await self.daemon.wait_closed()
        self.daemon.clock.advance(1)
        spans = await self.received(run_id, 2)
        root = next(span for span in spans if span.name == "invoke_agent agent-a")
        self.assertEqual(root.status.code, StatusCode.ERROR.value)
        self.assertEqual(attributes(root)["error.type"], "incomplete")
        self.assertEqual(attributes(root)["car.run.status"], "incomplete")
        self.assertIn("connection closed", root.status.message)
        (tool,) = [span for span in spans if span is not root]
        self.assertEqual(tool.parent_span_id, root.span_id)
        ended = (await self.records(run_id))[-1]
        self.assertEqual(root.end_time_unix_nano, nanoseconds(ended["ended_at"]))

    async def test_cancelled_run(self):
        """A cancelled run: status unset, no error.type, car.run.status cancelled."""
        await self.setup_daemon()
        ws = await self.daemon.connect()
        list(self.daemon.runs.sessions.values())[-1].capabilities = frozenset({"runs.cancel.v1"})
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.call("runs.record_model_turn", dict(MODEL_TURN, run_id=run_id, model_id=None))
        await ws.call("runs.cancel", {"run_id": run_id, "idempotency_key": "k", "reason": "stop"})
        spans = await self.received(run_id, 2)
        root = next(span for span in spans if span.name == "invoke_agent agent-a")
        self.assertEqual(root.status.code, StatusCode.UNSET.value)
        self.assertEqual(attributes(root)["car.run.status"], "cancelled")
        self.assertNotIn("error.type", attributes(root))
        (chat,) = [span for span in spans if span is not root]
        self.assertEqual(chat.name, "chat")
        self.assertNotIn("gen_ai.request.model", attributes(chat))

    async def test_content_only_when_asked(self):
        """With content on, prompts and outputs are in the spans as the
        conventions' messages and tool call attributes."""
        await self.setup_daemon(content=True)
        ws = await self.daemon.connect()
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.call("runs.record_model_turn", dict(MODEL_TURN, run_id=run_id))
        await ws.call("runs.record_turns", {"run_id": run_id, "turns": TOOL_TURNS[:1]})
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        spans = {span.name: attributes(span) for span in await self.received(run_id, 3)}
        self.assertIn("fix the build", spans["invoke_agent agent-a"]["gen_ai.input.messages"])
        self.assertIn("did the thing", spans["invoke_agent agent-a"]["gen_ai.output.messages"])
        self.assertIn("I will run the tests", spans["chat gpt-test"]["gen_ai.output.messages"])
        tool = spans["execute_tool shell"]
        self.assertEqual(tool["gen_ai.tool.call.arguments"], '{"cmd": "make test"}')
        self.assertEqual(tool["gen_ai.tool.call.result"], "2 failed")
        self.assertEqual(tool["car.turn.prompt"], "run it")

    async def test_receiver_down_daemon_serves_and_counts(self):
        """With nothing listening at the endpoint the daemon keeps answering
        and every span of every ended run is counted as dropped."""
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        closed = f"http://127.0.0.1:{port.getHost().port}/v1/traces"
        await port.stopListening()
        await self.setup_daemon(endpoint=closed, timeout=0.5)
        ws = await self.daemon.connect()
        for _ in range(3):
            run_id = (await ws.call("runs.start", START))["run_id"]
            await ws.call("runs.record_turns", {"run_id": run_id, "turns": TOOL_TURNS})
            await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        await wait_for(lambda: self.exporter.dropped_spans == 9, "9 dropped spans", 60)
        listing = await ws.call("runs.list", {"agent_id": "agent-a"})
        self.assertEqual(len(listing["runs"]), 3)
        self.assertEqual(self.exporter.exported_spans, 0)
        metrics = self.daemon.parts.metrics.exposition().decode()
        self.assertIn("\ncar_otlp_spans_dropped_total 9.0\n", metrics)
        self.assertIn("\ncar_otlp_spans_exported_total 0.0\n", metrics)


class _HeldExporter:
    """A span exporter that blocks in export until released."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported = []

    def export(self, spans):
        self.entered.set()
        self.release.wait(30)
        self.exported.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        self.release.set()

    def force_flush(self, timeout_millis=30000):
        return True


class QueueTests(unittest.TestCase):
    async def test_full_queue_drops_and_counts(self):
        """While the sender is stuck, spans past the queue's size are
        dropped and counted; the queued ones are sent once it recovers."""
        held = _HeldExporter()
        exporter = RunExporter(reactor, None, held, max_queue_size=2, schedule_delay_millis=5)
        exporter.startService()
        self.addCleanup(exporter.stopService)
        spans = run_spans(
            [
                {"record": "started", "run_id": "r", "agent_id": "a", "intent": "i", "started_at": "2026-01-01T00:00:00.000Z"},
                *[{"record": "turn", "tool": "t", "index": n, "recorded_at": "2026-01-01T00:00:01.000Z"} for n in range(5)],
                {"record": "ended", "termination": "cancelled", "ended_at": "2026-01-01T00:00:02.000Z"},
            ]
        )  # fmt: skip
        exporter.submit(spans[:1])
        await wait_for(held.entered.is_set, "the sender to take the first span")
        exporter.submit(spans[1:])
        self.assertEqual(exporter.dropped_spans, 3)
        held.release.set()
        await wait_for(lambda: exporter.exported_spans == 3, "the queued spans to be sent")
        self.assertEqual([span.name for span in held.exported], ["invoke_agent a"] + ["execute_tool t"] * 2)
        self.assertEqual(exporter.dropped_spans, 3)

    async def test_stop_waits_for_runs_being_read(self):
        """A run that ended just before the exporter stops is still read
        and its spans sent before the stop fires."""
        held = _HeldExporter()
        held.release.set()
        store = HeldStore(MemoryRunStore(), "read_records")
        records = [
            started_record("0190a000-0000-7000-8000-000000000002", "a", "c", "i", None),
            {"record": "ended", "termination": "cancelled", "ended_at": "2026-01-01T00:00:02.000Z"},
        ]
        await store.start_run(records[0])
        await store.end_run(records[0]["run_id"], records[1])
        exporter = RunExporter(reactor, store, held, schedule_delay_millis=5)
        exporter.startService()
        exporter.run_ended(records[0]["run_id"])
        stopped = exporter.stopService()
        self.assertFalse(stopped.called)
        store.release()
        await stopped
        self.assertEqual([span.name for span in held.exported], ["invoke_agent a"])
        self.assertEqual((exporter.exported_spans, exporter.dropped_spans), (1, 0))


class EndpointTests(unittest.TestCase):
    def test_endpoint_from_option_and_environment(self):
        """--otlp-endpoint is a base URL; the OTEL variables work too; off by default."""
        base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
        traces = dict(base, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://tempo:4318/custom")
        self.assertIsNone(traces_endpoint(None, {}))
        self.assertEqual(traces_endpoint("http://c:4318", {}), "http://c:4318/v1/traces")
        self.assertEqual(traces_endpoint(None, base), "http://collector:4318/v1/traces")
        self.assertEqual(traces_endpoint(None, traces), "http://tempo:4318/custom")
        self.assertEqual(traces_endpoint("http://c:4318/", traces), "http://c:4318/v1/traces")

    def test_bad_endpoint_is_a_usage_error(self):
        """An --otlp-endpoint that is not http(s) stops twistd with one line naming it."""
        options = Options()
        with self.assertRaises(SystemExit) as raised:
            options.parseOptions(["--otlp-endpoint", "collector:4318"])
        self.assertIn("--otlp-endpoint", raised.exception.code)


class DaemonExportTests(unittest.TestCase):
    async def test_twistd_car_exports_runs_as_they_end(self):
        """``twistd car --otlp-endpoint URL`` exports the runs the last
        daemon left open (ended incomplete at start) and each run that ends
        while it serves."""
        receiver = await OTLPReceiver.listen(self)
        data_dir = self.mktemp()
        store = FileRunStore(reactor, data_dir)
        await store.open()
        left_open = started_record("0190a000-0000-7000-8000-000000000001", "agent-b", "c", "old", None)
        await store.start_run(left_open)
        await store.close()
        options = Options()
        options.parseOptions([
            "--listen", "tcp:0:interface=127.0.0.1", "--http", "none", "--no-auth",
            "--data-dir", data_dir, "--otlp-endpoint", receiver.base_url,
        ])  # fmt: skip
        service = build_daemon(options, reactor, {})
        service.startService()
        self.addCleanup(service.stopService)
        (port,) = await service.ready
        ws = await RPCClient.connect(port.getHost().port)
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        await ws.close()
        await wait_for(lambda: len(receiver.spans) == 2, "both runs' spans", 30)
        names = sorted(span.name for _, _, span in receiver.spans)
        self.assertEqual(names, ["invoke_agent agent-a", "invoke_agent agent-b"])
        recovered = receiver.by_trace(bytes.fromhex(left_open["run_id"].replace("-", "")))
        self.assertEqual(attributes(recovered[0])["error.type"], "incomplete")
        (exporter,) = service.exporters
        self.assertEqual(exporter.dropped_spans, 0)


class SpanMappingTests(unittest.TestCase):
    RUN = [
        {"record": "started", "run_id": "my-key", "agent_id": "a", "intent": "i", "started_at": "2026-01-01T00:00:00.000Z"},
        {"record": "turn", "tool": "t", "index": 0, "recorded_at": "not a time"},
        {"record": "model_turn", "model_id": "m", "index": 1, "duration_ms": 5000.0, "recorded_at": "2026-01-01T00:00:01.000Z"},
        {"record": "ended", "termination": "outcome", "outcome": {"status": "give_up"}, "ended_at": "2026-01-01T00:00:02.000Z"},
    ]  # fmt: skip

    def test_same_run_same_spans(self):
        """Mapping a run twice gives the same ids, so a re-export is not a
        second copy; a run id that is not a UUID is hashed into a trace id."""
        first, second = run_spans(self.RUN), run_spans(self.RUN)
        self.assertEqual(
            [(s.context.trace_id, s.context.span_id) for s in first],
            [(s.context.trace_id, s.context.span_id) for s in second],
        )
        self.assertNotEqual(first[0].context.trace_id, 0)
        self.assertEqual(len({s.context.span_id for s in first}), 3)

    def test_times_stay_inside_the_run(self):
        """An unreadable time takes the previous record's; a duration longer
        than the run is cut at its start; give_up is an error."""
        root, tool, chat = run_spans(self.RUN)
        self.assertEqual((tool.start_time, tool.end_time), (root.start_time, root.start_time))
        self.assertEqual(chat.start_time, root.start_time)
        self.assertEqual(chat.end_time, root.start_time + 1_000_000_000)
        self.assertEqual(root.status.status_code, StatusCode.ERROR)
        self.assertEqual(root.attributes["error.type"], "give_up")

    def test_an_open_run_does_not_map(self):
        """Only a run with its ended record becomes spans."""
        with self.assertRaises(ValueError):
            run_spans(self.RUN[:-1])


class _Recorded(Service):
    """A service that notes when it starts and stops."""

    def __init__(self, name, events):
        self._name, self._events = name, events

    def startService(self):
        super().startService()
        self._events.append(f"{self._name} started")

    def stopService(self):
        super().stopService()
        self._events.append(f"{self._name} stopped")


class _RecordingStore:
    """A memory store that notes its open, the recovery's read and its close."""

    def __init__(self, events):
        self._store, self._events = MemoryRunStore(), events

    def __getattr__(self, name):
        return getattr(self._store, name)

    def open(self):
        self._events.append("store opened")
        return self._store.open()

    def open_runs(self):
        self._events.append("recovery")
        return self._store.open_runs()

    def close(self):
        self._events.append("store closed")
        return self._store.close()


class ServiceTreeTests(unittest.TestCase):
    async def test_exporter_and_retention_order(self):
        """The exporter runs from before the recovery (the runs it ends are
        exported) until before the store closes; the retention from after
        the recovery until the first thing the stop does."""
        events = []
        store = _RecordingStore(events)
        runs = RunService(store, TraceFanout(), AccessPolicy(False), Clock())
        daemon = DaemonService(store, runs)
        daemon.export(_Recorded("exporter", events))
        daemon.maintain(_Recorded("retention", events))
        daemon.startService()
        await daemon.ready
        await daemon.stopService()
        self.assertEqual(
            events,
            [
                "store opened",
                "exporter started",
                "recovery",
                "retention started",
                "retention stopped",
                "exporter stopped",
                "store closed",
            ],
        )
