"""
Incomplete-on-drop: the grace window's edge cases, driven on a Clock; in
process, but for what only a socket shows (a TCP drop, a half handshake).
"""

import socket

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial import unittest

from car_twisted.records import ended_record
from car_twisted.runs import RECOVERY_BATCH
from car_twisted.store.memory import MemoryRunStore
from tests.store_conformance import started as started_record
from tests.support import SUCCESS_OUTCOME, HeldStore, in_process, serve, wait_for

START = {"agent_id": "agent-a", "intent": "do it"}


async def status(daemon, run_id):
    return (await daemon.store.get_run(run_id)).status


class GraceWindowTests(unittest.TestCase):
    async def test_abrupt_drop_is_a_close(self):
        """A TCP drop without a close frame ends open runs incomplete after
        the grace window, like a clean close."""
        daemon = await serve(self)
        ws = await daemon.connect()
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.drop()
        await daemon.wait_closed()
        self.assertEqual(await status(daemon, run_id), "in_progress")
        daemon.clock.advance(0.25)
        self.assertEqual(await status(daemon, run_id), "incomplete")
        self.assertEqual(daemon.clock.getDelayedCalls(), [])

    async def test_complete_recorded_within_window_wins(self):
        """A complete that arrived before the drop but is still being
        written when the window ends wins: the run ends success, never
        incomplete."""
        store = HeldStore(MemoryRunStore())
        daemon = in_process(self, store=store)
        ws = await daemon.connect()
        ws.request("runs.start", START)
        await wait_for(lambda: len(store.held) == 1, "the start write")
        store.release()
        run_id = (await ws.receive())["result"]["run_id"]
        ws.request("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        await wait_for(lambda: len(store.held) == 1, "the complete write")
        await ws.drop()
        await daemon.wait_closed()
        daemon.clock.advance(1)
        store.release()
        summary = await store.get_run(run_id)
        self.assertEqual((summary.status, summary.outcome_status), ("completed", "success"))
        self.assertEqual(daemon.clock.getDelayedCalls(), [])

    async def test_agent_session_completes_within_window(self):
        """Another session bound to the run's agent completes the run inside
        the window: success stands and the window's timer is cancelled."""
        daemon = in_process(self)
        producer = await daemon.connect()
        run_id = (await producer.call("runs.start", START))["run_id"]
        await producer.close()
        await wait_for(lambda: not daemon.runs.sessions, "the producer to close")
        self.assertEqual(len(daemon.clock.getDelayedCalls()), 1)
        peer = await daemon.connect()
        daemon.only_session().agent_id = "agent-a"
        daemon.clock.advance(0.2)
        ack = await peer.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertEqual(ack, {"ok": True, "run_id": run_id})
        self.assertEqual(daemon.clock.getDelayedCalls(), [])
        daemon.clock.advance(1)
        self.assertEqual(await status(daemon, run_id), "completed")

    async def test_only_open_runs_are_ended(self):
        """Of a session's runs, the completed ones stay completed and every
        open one ends incomplete."""
        daemon = in_process(self)
        ws = await daemon.connect()
        done = (await ws.call("runs.start", START))["run_id"]
        await ws.call("runs.complete", {"run_id": done, "outcome": SUCCESS_OUTCOME})
        open_ids = [(await ws.call("runs.start", START))["run_id"] for _ in range(3)]
        await ws.close()
        await daemon.wait_closed()
        daemon.clock.advance(0.25)
        self.assertEqual(await status(daemon, done), "completed")
        for run_id in open_ids:
            self.assertEqual(await status(daemon, run_id), "incomplete")

    async def test_many_sessions_drop_at_once(self):
        """Fifty producers dropping together: every open run ends incomplete
        after one grace window, and no timer is left."""
        daemon = in_process(self)
        clients = await gatherResults([ensureDeferred(daemon.connect()) for _ in range(50)])
        run_ids = await gatherResults(
            [
                ensureDeferred(ws.call("runs.start", dict(START, agent_id=f"agent-{n}")))
                for n, ws in enumerate(clients)
            ]
        )
        await gatherResults([ensureDeferred(ws.drop()) for ws in clients])
        await daemon.wait_closed()
        self.assertEqual(len(daemon.clock.getDelayedCalls()), 50)
        daemon.clock.advance(0.25)
        for started in run_ids:
            self.assertEqual(await status(daemon, started["run_id"]), "incomplete")
        self.assertEqual(daemon.clock.getDelayedCalls(), [])

    async def test_connection_that_never_finished_handshake(self):
        """A TCP client that closes mid-handshake leaves no session, logs no
        error, and the daemon keeps serving."""
        daemon = await serve(self)
        raw = socket.create_connection(("127.0.0.1", daemon.port.getHost().port))
        raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        raw.close()
        ws = await daemon.connect()
        self.assertIn("run_id", await ws.call("runs.start", START))
        self.assertEqual(len(daemon.runs.sessions), 1)

    async def test_stop_leaves_open_runs_for_recovery(self):
        """Stopping the run service cancels pending windows (no timer outlives
        it) and leaves those runs open for restart recovery."""
        daemon = in_process(self)
        ws = await daemon.connect()
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.close()
        await daemon.wait_closed()
        await daemon.runs.stop()
        self.assertEqual(daemon.clock.getDelayedCalls(), [])
        self.assertEqual(await status(daemon, run_id), "in_progress")


class RecoveryTests(unittest.TestCase):
    def test_recovery_ends_every_open_run_in_batches(self):
        """Restart recovery ends every run a dead daemon left open, however
        many, a batch at a time (never more ends in flight than a batch),
        and leaves the ended runs alone."""
        memory = MemoryRunStore()
        store = HeldStore(memory, "end_run")
        daemon = in_process(self, store=store)
        open_ids = [f"open-{n}" for n in range(RECOVERY_BATCH + 5)]
        for run_id in open_ids + ["done"]:
            self.successResultOf(memory.start_run(started_record(run_id=run_id)))
        self.successResultOf(memory.end_run("done", ended_record("incomplete", reason="earlier")))
        recovered = ensureDeferred(daemon.runs.recover())
        self.assertEqual(len(store.held), RECOVERY_BATCH)
        store.release()
        self.assertEqual(len(store.held), 5)
        store.release()
        self.assertEqual(self.successResultOf(recovered), RECOVERY_BATCH + 5)
        for run_id in open_ids:
            self.assertEqual(self.successResultOf(store.get_run(run_id)).status, "incomplete")
        records, _ = self.successResultOf(store.read_records("done", 0, 5))
        self.assertEqual(records[-1]["reason"], "earlier")
