"""
The run lifecycle as CAR's run-lifecycle test pins it, re-told here: two
starts mint two distinct run ids; the session's current run is set and the
started record stored before the start is answered; a complete is
acknowledged, records the outcome and clears the current run; a run completed
before its connection closes stays a success; a run whose connection closes
without a complete ends incomplete once the grace window has passed, and not
before; a start whose agent cannot be resolved is refused, the daemon's
CAR_AGENT_ID comes before agent_name, and agent_name is slugged; a session
bound to an agent never records under another agent's name.

These run over a real WebSocket client on a loopback port, on purpose: they
are what an agent harness sees end to end, wire included, while the
semantics tests of each method run in process.
"""

from twisted.trial import unittest

from tests.support import SUCCESS_OUTCOME, serve


class RunLifecycleTests(unittest.TestCase):
    async def test_sequential_starts_get_distinct_ids(self):
        """Two starts on one session mint two distinct, non-empty run ids."""
        daemon = await serve(self)
        ws = await daemon.connect()
        r1 = await ws.call("runs.start", {"agent_id": "agent-a", "intent": "first goal"})
        r2 = await ws.call("runs.start", {"agent_id": "agent-a", "intent": "second goal"})
        self.assertTrue(r1["run_id"] and r2["run_id"])
        self.assertNotEqual(r1["run_id"], r2["run_id"])
        self.assertEqual(r1["agent_id"], "agent-a")

    async def test_current_run_id_set_before_start_replies(self):
        """By the time the runs.start reply arrives, the session's
        current_run_id names the new run, and its started record is stored."""
        daemon = await serve(self)
        ws = await daemon.connect()
        started = await ws.call("runs.start", {"agent_id": "agent-a", "intent": "do it"})
        self.assertEqual(daemon.only_session().current_run_id, started["run_id"])
        summary = await daemon.store.get_run(started["run_id"])
        self.assertEqual(summary.status, "in_progress")

    async def test_complete_records_terminal_outcome(self):
        """runs.complete acks, records the success outcome, and clears the
        session's current run."""
        daemon = await serve(self)
        ws = await daemon.connect()
        run_id = (await ws.call("runs.start", {"agent_id": "agent-a", "intent": "do it"}))["run_id"]
        ack = await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertEqual(ack, {"ok": True, "run_id": run_id})
        summary = await daemon.store.get_run(run_id)
        self.assertEqual((summary.status, summary.outcome_status), ("completed", "success"))
        self.assertIsNone(daemon.only_session().current_run_id)

    async def test_completed_then_closed_run_stays_success(self):
        """Closing after the complete ack leaves the success record alone,
        past the grace window."""
        daemon = await serve(self)
        ws = await daemon.connect()
        run_id = (await ws.call("runs.start", {"agent_id": "agent-a", "intent": "do it"}))["run_id"]
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        await ws.close()
        await daemon.wait_closed()
        self.assertEqual(daemon.clock.getDelayedCalls(), [])
        daemon.clock.advance(0.6)
        summary = await daemon.store.get_run(run_id)
        self.assertEqual((summary.status, summary.outcome_status), ("completed", "success"))

    async def test_mid_run_close_yields_incomplete(self):
        """A close without runs.complete ends the run incomplete once the
        grace window has passed, and not before."""
        daemon = await serve(self)
        ws = await daemon.connect()
        run_id = (await ws.call("runs.start", {"agent_id": "agent-a", "intent": "do it"}))["run_id"]
        await ws.close()
        await daemon.wait_closed()
        daemon.clock.advance(0.2)
        self.assertEqual((await daemon.store.get_run(run_id)).status, "in_progress")
        daemon.clock.advance(0.05)
        self.assertEqual((await daemon.store.get_run(run_id)).status, "incomplete")
        records, _ = await daemon.store.read_records(run_id, 0, 10)
        self.assertEqual(records[-1]["reason"], "connection closed")
        self.assertEqual(daemon.clock.getDelayedCalls(), [])

    async def test_unresolvable_agent_rejected_name_fallback_records(self):
        """With no agent_id, binding, CAR_AGENT_ID or usable agent_name, the
        start is rejected; agent_name "Bulldozer Agent" records as
        name:bulldozer-agent."""
        daemon = await serve(self, environ={})
        ws = await daemon.connect()
        rejected = await ws.call_raw("runs.start", {"intent": "orphan run"})
        self.assertEqual(rejected["error"]["code"], -32602)
        self.assertIn("runs.start requires a resolvable agent_id", rejected["error"]["message"])
        ok = await ws.call("runs.start", {"agent_name": "Bulldozer Agent", "intent": "one-shot run"})
        self.assertEqual(ok["agent_id"], "name:bulldozer-agent")
        self.assertTrue(ok["run_id"])

    async def test_daemon_environment_agent_id_is_used(self):
        """With no agent_id param and no binding, the daemon's CAR_AGENT_ID
        names the agent (before agent_name)."""
        daemon = await serve(self, environ={"CAR_AGENT_ID": "env-agent"})
        ws = await daemon.connect()
        ok = await ws.call("runs.start", {"agent_name": "Other", "intent": "x"})
        self.assertEqual(ok["agent_id"], "env-agent")

    async def test_bound_session_cannot_forge_run_under_other_agent(self):
        """A session bound to agent-A cannot start a run as agent-B (nothing
        is recorded under B); a matching or absent agent_id records under A."""
        daemon = await serve(self)
        ws = await daemon.connect()
        warm = await ws.call("runs.start", {"agent_id": "agent-A", "intent": "warm up"})
        self.assertEqual(warm["agent_id"], "agent-A")
        daemon.only_session().agent_id = "agent-A"

        forged = await ws.call_raw("runs.start", {"agent_id": "agent-B", "intent": "forge under B"})
        self.assertIn("error", forged)
        runs, _ = await daemon.store.list_runs("agent-B", None, 10, None)
        self.assertEqual(runs, [])

        matching = await ws.call("runs.start", {"agent_id": "agent-A", "intent": "legit, explicit"})
        self.assertEqual(matching["agent_id"], "agent-A")
        derived = await ws.call("runs.start", {"intent": "legit, derived"})
        self.assertEqual(derived["agent_id"], "agent-A")
