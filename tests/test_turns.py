"""runs.record_turns, runs.record_model_turn and idempotent starts, in process."""

from twisted.internet import reactor
from twisted.trial import unittest

from car_twisted.limits import MAX_TEXT
from car_twisted.records import TRUNCATION_MARKER, keyed_run_id
from car_twisted.store.file import FileRunStore
from car_twisted.store.memory import MemoryRunStore
from car_twisted.store.sqlite import SQLiteRunStore
from tests.support import SUCCESS_OUTCOME, HeldStore, InProcessDaemon, in_process, private_dir

START = {"agent_id": "agent-a", "intent": "do it"}


class RecordTurnsTests(unittest.TestCase):
    async def started(self):
        daemon = in_process(self)
        ws = await daemon.connect()
        run_id = (await ws.call("runs.start", START))["run_id"]
        return daemon, ws, run_id

    async def test_indices_are_stamped_on_one_sequence(self):
        """Turns and model turns share one 0-based index sequence, stamped by
        the daemon (a client-sent index is ignored), and read back in order."""
        daemon, ws, run_id = await self.started()
        first = await ws.call(
            "runs.record_turns",
            {"run_id": run_id, "turns": [{"prompt": "a", "index": 99}, {"tool": "ls", "parameters": {"path": "."}}]},
        )
        self.assertEqual(first, {"run_id": run_id, "base_index": 0, "count": 2, "ok": True})
        model = await ws.call(
            "runs.record_model_turn",
            {"run_id": run_id, "turn_index": 1, "assistant_text": "hi", "model_id": "m", "duration_ms": 3},
        )
        self.assertEqual(model["base_index"], 2)
        trace = await ws.call("runs.get_trace", {"run_id": run_id})
        kinds = [(r["record"], r.get("index")) for r in trace["records"]]
        self.assertEqual(kinds, [("started", None), ("turn", 0), ("turn", 1), ("model_turn", 2)])
        self.assertEqual(trace["records"][1]["verifier_verdict"], "not_run")
        self.assertEqual(trace["records"][2]["parameters"], {"path": "."})
        self.assertEqual(trace["records"][3]["duration_ms"], 3.0)

    async def test_long_text_is_truncated_visibly(self):
        """Text over 16 KiB is cut and ends with the truncation marker."""
        daemon, ws, run_id = await self.started()
        await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{"output": "x" * 20000}]})
        trace = await ws.call("runs.get_trace", {"run_id": run_id})
        output = trace["records"][1]["output"]
        self.assertEqual(len(output), MAX_TEXT)
        self.assertTrue(output.endswith(TRUNCATION_MARKER))

    async def test_dropped_answers(self):
        """A run that cannot take turns answers ok: false with the reason,
        and records nothing."""
        daemon, ws, run_id = await self.started()
        huge = {"parameters": {"blob": ["y" * 1000] * 300}}
        self.assertEqual(
            await ws.call("runs.record_turns", {"run_id": run_id, "turns": [huge]}),
            {"run_id": run_id, "base_index": 0, "count": 0, "ok": False, "dropped": "turn_too_large"},
        )
        unknown = await ws.call("runs.record_turns", {"run_id": "nope", "turns": [{}]})
        self.assertEqual(unknown["dropped"], "run_not_found")
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        ended = await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        self.assertEqual(ended["dropped"], "run_terminal")
        self.assertEqual((await daemon.store.get_run(run_id)).turn_count, 0)

    async def test_turns_sent_after_complete_are_run_terminal(self):
        """Turns that arrive after the run's runs.complete, while its terminal
        record is still being written, are dropped as run_terminal."""
        store = HeldStore(MemoryRunStore(), "end_run")
        daemon = in_process(self, store=store)
        ws = await daemon.connect()
        run_id = (await ws.call("runs.start", START))["run_id"]
        complete_id = ws.request("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        late = await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        self.assertEqual(late["dropped"], "run_terminal")
        store.release()
        self.assertEqual((await ws.receive())["id"], complete_id)

    async def test_turn_limit_per_run(self):
        """Past 2000 turns a run answers run_turn_limit; the turns before
        the limit are all kept."""
        daemon, ws, run_id = await self.started()
        for _ in range(7):
            answer = await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{}] * 256})
            self.assertTrue(answer["ok"])
        answer = await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{}] * 256})
        self.assertEqual(answer["dropped"], "run_turn_limit")
        answer = await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{}] * (2000 - 7 * 256)})
        self.assertEqual(answer["base_index"], 7 * 256)
        self.assertEqual((await daemon.store.get_run(run_id)).turn_count, 2000)

    async def test_bad_turns_are_invalid_params(self):
        """Wrong shapes are -32602 naming the field; too many turns in one
        call too."""
        daemon, ws, run_id = await self.started()
        for turns, needle in [
            ("x", "turns must be a list"),
            ([1], "turns[0] must be an object"),
            ([{}, {"prompt": 5}], "turns[1].prompt"),
            ([{}] * 257, "at most 256"),
        ]:
            answer = await ws.call_raw("runs.record_turns", {"run_id": run_id, "turns": turns})
            self.assertEqual(answer["error"]["code"], -32602)
            self.assertIn(needle, answer["error"]["message"])
        bad_model = await ws.call_raw("runs.record_model_turn", {"run_id": run_id, "duration_ms": "slow"})
        self.assertIn("duration_ms", bad_model["error"]["message"])

    async def test_only_producer_or_agent_session_writes(self):
        """Another unbound session and a session bound to another agent get
        the unknown-run answer; a session bound to the run's agent may write."""
        daemon, ws, run_id = await self.started()
        other = await daemon.connect()
        answer = await other.call("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        self.assertEqual(answer["dropped"], "run_not_found")
        session = next(s for s in daemon.runs.sessions.values() if not s.producing)
        session.agent_id = "agent-b"
        answer = await other.call("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        self.assertEqual(answer["dropped"], "run_not_found")
        session.agent_id = "agent-a"
        answer = await other.call("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        self.assertTrue(answer["ok"])


class IdempotentStartTests(unittest.TestCase):
    async def test_retried_start_returns_the_same_run(self):
        """A start retried with the same idempotency_key (even on a new
        connection) returns the same run and makes it the current run."""
        daemon = in_process(self)
        ws = await daemon.connect()
        params = dict(START, idempotency_key="job-42")
        first = await ws.call("runs.start", params)
        self.assertEqual(first, {"run_id": keyed_run_id("agent-a", "job-42"), "agent_id": "agent-a"})
        await ws.call("runs.complete", {"run_id": first["run_id"], "outcome": SUCCESS_OUTCOME})
        again = await daemon.connect()
        self.assertEqual(await again.call("runs.start", params), first)
        runs, _ = await daemon.store.list_runs("agent-a", None, 10, None)
        self.assertEqual([r.run_id for r in runs], [first["run_id"]])
        self.assertEqual(runs[0].status, "completed")
        newest_session = list(daemon.runs.sessions.values())[-1]
        self.assertEqual(newest_session.current_run_id, first["run_id"])

    async def test_open_run_retry_on_same_session(self):
        """Retrying a start for an open run returns it without a new run."""
        daemon = in_process(self)
        ws = await daemon.connect()
        params = dict(START, idempotency_key="job-7")
        self.assertEqual(await ws.call("runs.start", params), await ws.call("runs.start", params))
        self.assertEqual(len((await daemon.store.list_runs("agent-a", None, 10, None))[0]), 1)

    async def test_keys_are_per_agent(self):
        """Another agent's idempotency_key tells nothing and takes nothing:
        agent B starting with A's key gets a run of its own (no error to
        learn A's keys from), and A's later start with a key B used first
        still makes A's run, which A's retry returns."""
        daemon = in_process(self)
        ws = await daemon.connect()
        a_first = await ws.call("runs.start", dict(START, idempotency_key="shared"))
        b_first = await ws.call("runs.start", dict(START, agent_id="agent-b", idempotency_key="shared"))
        self.assertEqual(b_first["agent_id"], "agent-b")
        self.assertNotEqual(b_first["run_id"], a_first["run_id"])
        b_next = await ws.call("runs.start", dict(START, agent_id="agent-b", idempotency_key="a-next"))
        a_next = await ws.call("runs.start", dict(START, idempotency_key="a-next"))
        self.assertEqual(a_next["agent_id"], "agent-a")
        self.assertNotEqual(a_next["run_id"], b_next["run_id"])
        self.assertEqual(await ws.call("runs.start", dict(START, idempotency_key="a-next")), a_next)
        for agent_id, started in (("agent-a", [a_next, a_first]), ("agent-b", [b_next, b_first])):
            runs, _ = await daemon.store.list_runs(agent_id, None, 10, None)
            self.assertEqual([r.run_id for r in runs], [s["run_id"] for s in started])


class DurableIdempotentStartTests(unittest.TestCase):
    """A keyed start retried after a restart returns the run the first
    start made, on each durable store."""

    async def retried_after_restart(self, make_store):
        data_dir = private_dir(self)
        store = make_store(data_dir)
        await store.open()
        first_daemon = InProcessDaemon(store=store)
        ws = await first_daemon.connect()
        first = await ws.call("runs.start", dict(START, idempotency_key="job-1"))
        await ws.call("runs.complete", {"run_id": first["run_id"], "outcome": SUCCESS_OUTCOME})
        await first_daemon.stop()
        await first_daemon.runs.stop()
        await store.close()
        store = make_store(data_dir)
        await store.open()
        self.addCleanup(store.close)
        daemon = in_process(self, store=store)
        again = await daemon.connect()
        self.assertEqual(await again.call("runs.start", dict(START, idempotency_key="job-1")), first)
        other = await again.call("runs.start", dict(START, agent_id="agent-b", idempotency_key="job-1"))
        self.assertNotEqual(other["run_id"], first["run_id"])
        runs, _ = await daemon.store.list_runs("agent-a", None, 10, None)
        self.assertEqual([(r.run_id, r.status) for r in runs], [(first["run_id"], "completed")])

    async def test_file_store(self):
        """The file store keeps a keyed run findable across a restart."""
        await self.retried_after_restart(lambda d: FileRunStore(reactor, d))

    async def test_sqlite_store(self):
        """The SQLite store keeps a keyed run findable across a restart."""
        await self.retried_after_restart(lambda d: SQLiteRunStore(d, reactor))
