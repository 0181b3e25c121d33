"""runs.cancel and runs.resume, in process (capabilities set on the session
directly here, and negotiated through server.handshake at the end)."""

import hashlib

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial import unittest

from tests.support import SUCCESS_OUTCOME, AuthDaemon, in_process

START = {"agent_id": "agent-a", "intent": "do it"}


def newest_session(daemon):
    return list(daemon.runs.sessions.values())[-1]


class CancelTests(unittest.TestCase):
    async def setup_run(self):
        daemon = in_process(self)
        ws = await daemon.connect()
        newest_session(daemon).capabilities = frozenset({"runs.cancel.v1"})
        run_id = (await ws.call("runs.start", START))["run_id"]
        return daemon, ws, run_id

    async def test_cancel_and_repeat(self):
        """The owner cancels an open run; repeating the same call gives the
        same answer; a different call on the ended run says already_terminal."""
        daemon, ws, run_id = await self.setup_run()
        params = {"run_id": run_id, "idempotency_key": "k1", "reason": "user asked"}
        first = await ws.call("runs.cancel", params)
        self.assertEqual(
            first,
            {
                "run_id": run_id,
                "idempotency_key": "k1",
                "status": "cancelled_confirmed",
                "reason_digest": hashlib.sha256(b"user asked").hexdigest(),
            },
        )
        self.assertEqual(await ws.call("runs.cancel", params), first)
        other = await ws.call("runs.cancel", dict(params, idempotency_key="k2"))
        self.assertEqual(other["status"], "already_terminal")
        self.assertEqual((await daemon.store.get_run(run_id)).status, "cancelled")
        self.assertIsNone(newest_session(daemon).current_run_id)

    async def test_cancel_needs_capability(self):
        """Without runs.cancel.v1 negotiated, runs.cancel is -32008."""
        daemon = in_process(self)
        ws = await daemon.connect()
        answer = await ws.call_raw("runs.cancel", {"run_id": "x", "idempotency_key": "k"})
        self.assertEqual(answer["error"]["code"], -32008)

    async def test_cancel_vs_complete_first_terminal_wins(self):
        """A cancel and a complete sent together: the first applies, the
        loser gets a clear answer, the run keeps the winner's record."""
        daemon, ws, run_id = await self.setup_run()
        cancel_id = ws.request("runs.cancel", {"run_id": run_id, "idempotency_key": "k", "reason": ""})
        complete_id = ws.request("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        answers = {}
        for _ in range(2):
            answer = await ws.receive()
            answers[answer["id"]] = answer
        self.assertEqual(answers[cancel_id]["result"]["status"], "cancelled_confirmed")
        self.assertIn("already ended (cancelled)", answers[complete_id]["error"]["message"])
        self.assertEqual((await daemon.store.get_run(run_id)).status, "cancelled")

    async def test_stranger_cannot_cancel(self):
        """A session that neither produces the run nor is bound to its agent
        cannot cancel it (one that may read it is told why); a host can."""
        daemon, ws, run_id = await self.setup_run()
        stranger = await daemon.connect()
        session = newest_session(daemon)
        session.capabilities = frozenset({"runs.cancel.v1"})
        session.agent_id = "agent-b"
        params = {"run_id": run_id, "idempotency_key": "k"}
        refused = await stranger.call_raw("runs.cancel", params)
        self.assertEqual(refused["error"]["message"], f"unknown run {run_id!r}")
        session.agent_id = None
        reader = await stranger.call_raw("runs.cancel", params)
        self.assertIn("only by its producer, its agent or the host", reader["error"]["message"])
        session.role = "host"
        self.assertEqual((await stranger.call("runs.cancel", params))["status"], "cancelled_confirmed")


class ResumeTests(unittest.TestCase):
    async def producer_gone(self):
        """A run whose producer negotiated resume and dropped."""
        daemon = in_process(self)
        ws = await daemon.connect()
        producer = newest_session(daemon)
        producer.capabilities = frozenset({"runs.resume.v1"})
        producer.agent_id = "agent-a"
        run_id = (await ws.call("runs.start", START))["run_id"]
        await ws.drop()
        await daemon.wait_closed()
        return daemon, run_id, producer.client_id

    async def claimant(self, daemon, agent_id="agent-a"):
        ws = await daemon.connect()
        session = newest_session(daemon)
        session.capabilities = frozenset({"runs.resume.v1"})
        session.agent_id = agent_id
        return ws, session

    async def test_resume_within_lease(self):
        """The owning agent reclaims the run on a new connection within the
        10 s lease (past the 0.25 s grace), then completes it."""
        daemon, run_id, old_client = await self.producer_gone()
        daemon.clock.advance(9)
        ws, session = await self.claimant(daemon)
        resumed = await ws.call("runs.resume", {"run_id": run_id})
        self.assertEqual(
            resumed,
            {"run_id": run_id, "agent_id": "agent-a", "client_id": session.client_id, "resumed_from_client_id": old_client},
        )
        self.assertEqual(daemon.clock.getDelayedCalls(), [])
        self.assertEqual(session.current_run_id, run_id)
        await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertEqual((await daemon.store.get_run(run_id)).status, "completed")

    async def test_lease_expiry_ends_incomplete(self):
        """Unclaimed, the run ends incomplete when the lease runs out; a
        resume after that is refused and does not reopen it."""
        daemon, run_id, _ = await self.producer_gone()
        daemon.clock.advance(10)
        self.assertEqual((await daemon.store.get_run(run_id)).status, "incomplete")
        ws, _ = await self.claimant(daemon)
        refused = await ws.call_raw("runs.resume", {"run_id": run_id})
        self.assertIn("already ended (incomplete)", refused["error"]["message"])

    async def test_one_winner_among_claimants(self):
        """Two claimants at once: exactly one resumes the run."""
        daemon, run_id, _ = await self.producer_gone()
        (a, _), (b, _) = [await self.claimant(daemon) for _ in range(2)]
        answers = await gatherResults(
            [ensureDeferred(c.call_raw("runs.resume", {"run_id": run_id})) for c in (a, b)]
        )
        winners = [x for x in answers if "result" in x]
        losers = [x for x in answers if "error" in x]
        self.assertEqual((len(winners), len(losers)), (1, 1))
        self.assertIn("another session", losers[0]["error"]["message"])

    async def test_other_agent_cannot_resume(self):
        """A session bound to another agent gets the unknown-run answer."""
        daemon, run_id, _ = await self.producer_gone()
        ws, _ = await self.claimant(daemon, "agent-b")
        refused = await ws.call_raw("runs.resume", {"run_id": run_id})
        self.assertEqual(refused["error"]["message"], f"unknown run {run_id!r}")


class NegotiatedTests(unittest.TestCase):
    """The same features reached as a harness does: session.auth, then
    server.handshake, on a daemon with auth on."""

    async def negotiated(self, auth, agent_id, *capabilities):
        ws = await auth.agent(agent_id)
        answer = await ws.call(
            "server.handshake",
            {"protocol_version": 3, "client_version": "harness/1", "optional_capabilities": list(capabilities)},
        )
        self.assertEqual(answer["negotiated_capabilities"], sorted(capabilities))
        return ws

    async def test_resume_after_drop_then_complete(self):
        """An agent negotiates resume, drops mid-run, reconnects, resumes
        within the lease and completes: the run ends success."""
        auth = AuthDaemon.in_process(self)
        first = await self.negotiated(auth, "agent-A", "runs.resume.v1")
        run_id = (await first.call("runs.start", {"intent": "long job"}))["run_id"]
        await first.drop()
        await auth.daemon.wait_closed()
        auth.daemon.clock.advance(5)
        second = await self.negotiated(auth, "agent-A", "runs.resume.v1")
        resumed = await second.call("runs.resume", {"run_id": run_id})
        self.assertEqual(resumed["run_id"], run_id)
        await second.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertEqual((await auth.daemon.store.get_run(run_id)).status, "completed")

    async def test_host_cancels_after_handshake(self):
        """The host, having negotiated runs.cancel.v1, cancels an agent's
        open run; the agent's next turns are dropped as run_terminal."""
        auth = AuthDaemon.in_process(self)
        ws, run_id = await auth.start_run("agent-A")
        host = await auth.host()
        await host.call("server.handshake", {"protocol_version": 3, "required_capabilities": ["runs.cancel.v1"]})
        answer = await host.call("runs.cancel", {"run_id": run_id, "idempotency_key": "stop-1", "reason": "operator"})
        self.assertEqual(answer["status"], "cancelled_confirmed")
        dropped = await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        self.assertEqual(dropped["dropped"], "run_terminal")
