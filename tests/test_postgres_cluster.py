"""
Several daemons (real processes) on one PostgreSQL database behave, to
every client, like one daemon: live follow across daemons, the races of
terminal records and idempotency keys, and a daemon's death (kill -9).
"""

import os
import re
import signal

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial import unittest

from car_twisted.handshake import PROTOCOL_VERSION
from car_twisted.records import keyed_run_id
from tests.daemon_process import DaemonProcess
from tests.postgres_server import fresh_database
from tests.support import SUCCESS_OUTCOME, RPCClient, wait_for

#: A short lease so a lost daemon is noticed quickly.
LEASE = 2.0


def turn(prompt):
    return {"prompt": prompt, "tool": None}


class Cluster:
    """Daemons sharing one fresh database, stopped when the test ends."""

    def __init__(self, case):
        self.case = case
        self.dsn = fresh_database(case)

    async def daemon(self, data_dir=None) -> DaemonProcess:
        data_dir = data_dir or self.case.mktemp()
        daemon = DaemonProcess(
            "postgresql", data_dir, "--dsn", self.dsn, "--lease", str(LEASE)
        )
        daemon.data_dir = data_dir
        self.case.addCleanup(daemon.kill)
        await daemon.start()
        return daemon

    async def client(self, daemon, agent_id=None, capabilities=()):
        """A client of C{daemon}, bound to C{agent_id} if given."""
        client = await RPCClient.connect(daemon.port)
        self.case.addCleanup(lambda: client.protocol.closed.called or client.drop())
        if agent_id is not None:
            await client.call("session.auth", {"agent_id": agent_id})
        if capabilities:
            await client.call(
                "server.handshake",
                {"protocol_version": PROTOCOL_VERSION, "optional_capabilities": list(capabilities)},
            )
        return client

    def sql(self, statement):
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            cursor = connection.execute(statement)
            return cursor.fetchall() if cursor.description else None


async def events_until_ended(follower):
    """The runs.trace.event notifications a follower receives up to ``ended``."""
    events = []
    while not events or events[-1]["record"]["record"] != "ended":
        frame = await follower.receive().addTimeout(30, reactor)
        assert frame.get("method") == "runs.trace.event", frame
        events.append(frame["params"])
    return events


class LiveFollowTests(unittest.TestCase):
    async def follow_across(self):
        """
        An agent starts a run on daemon A and records two turns; a follower
        on daemon B subscribes. Returns the cluster, B, the agent's client,
        the follower's and the run id.
        """
        cluster = Cluster(self)
        a, b = await cluster.daemon(), await cluster.daemon()
        agent = await cluster.client(a, "agent-x")
        run_id = (await agent.call("runs.start", {"intent": "cross"}))["run_id"]
        await agent.call("runs.record_turns", {"run_id": run_id, "turns": [turn("0"), turn("1")]})
        follower = await cluster.client(b)
        snapshot = await follower.call("runs.subscribe", {"run_id": run_id})
        self.assertEqual((snapshot["cursor"], len(snapshot["turns_so_far"])), (2, 2))
        return cluster, b, agent, follower, run_id

    async def finish(self, agent, run_id):
        """Four more turns and the outcome, through A."""
        for n in range(2, 6):
            await agent.call("runs.record_turns", {"run_id": run_id, "turns": [turn(str(n))]})
        await agent.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})

    def assert_every_event(self, events):
        """The follower got the four turns and the end, once each, in order
        (CAR's cursor: the turns so far)."""
        self.assertEqual([e["record"]["record"] for e in events], ["turn"] * 4 + ["ended"])
        self.assertEqual([e["cursor"] for e in events], [3, 4, 5, 6, 6])
        self.assertEqual([e["record"].get("prompt") for e in events[:-1]], ["2", "3", "4", "5"])
        self.assertEqual([e["status"] for e in events][-2:], ["in_progress", "completed"])

    async def test_follower_on_another_daemon_sees_every_event(self):
        """A follower on daemon B of a run produced through daemon A gets each
        later record live, in order, with no gap and no duplicate, then
        ``ended``; B's runs.list shows the run, in progress then completed."""
        _, _, agent, follower, run_id = await self.follow_across()
        listed = await follower.call("runs.list", {"agent_id": "agent-x"})
        self.assertEqual(
            [(r["run_id"], r["status"]) for r in listed["runs"]], [(run_id, "in_progress")]
        )
        await self.finish(agent, run_id)
        self.assert_every_event(await events_until_ended(follower))
        listed = await follower.call("runs.list", {"agent_id": "agent-x"})
        self.assertEqual(listed["runs"][0]["status"], "completed")

    async def test_long_catch_up_is_paged(self):
        """A follower on B of a run A records many turns into at once gets
        every one, in order, once (B reads them in pages)."""
        _, _, agent, follower, run_id = await self.follow_across()
        turns = [turn(str(n)) for n in range(2, 252)]
        await agent.call("runs.record_turns", {"run_id": run_id, "turns": turns})
        await agent.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        events = await events_until_ended(follower)
        self.assertEqual([e["cursor"] for e in events], [*range(3, 253), 252])
        self.assertEqual([e["record"].get("index") for e in events[:-1]], list(range(2, 252)))

    async def test_dsn_password_not_logged(self):
        """A daemon started with a password in its DSN never logs it."""
        cluster = Cluster(self)
        cluster.dsn = psycopg.conninfo.make_conninfo(cluster.dsn, password="sekrit-pw")
        daemon = await cluster.daemon()
        client = await cluster.client(daemon, "agent-p")
        await client.call("runs.start", {"intent": "logged?"})
        self.assertIn(b"postgresql store", daemon.output)
        self.assertNotIn(b"sekrit-pw", daemon.output)

    async def test_listen_connection_killed(self):
        """Daemon B's LISTEN connection is killed (pg_terminate_backend) and
        the whole rest of the run is written before B notices: B connects
        again, catches up from the tables, and its follower receives every
        later event, not silence."""
        cluster, b, agent, follower, run_id = await self.follow_across()
        (daemon_id,) = re.search(rb"daemon ([0-9a-f]+) joined", b.output).groups()
        os.kill(b.transport.pid, signal.SIGSTOP)
        try:
            killed = cluster.sql(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                f" WHERE application_name = 'car-twisted {daemon_id.decode()} listener'"
            )
            self.assertEqual(killed, [(True,)])
            await self.finish(agent, run_id)
        finally:
            os.kill(b.transport.pid, signal.SIGCONT)
        self.assert_every_event(await events_until_ended(follower))
        await wait_for(lambda: b"listening again" in b.output, "B to log its reconnection")


class RaceTests(unittest.TestCase):
    async def test_complete_and_cancel_through_two_daemons(self):
        """The agent completes through daemon A while the same agent cancels
        through daemon B, at once: exactly one wins; the loser answers
        "already ended" (complete) or already_terminal (cancel)."""
        cluster = Cluster(self)
        a, b = await cluster.daemon(), await cluster.daemon()
        producer = await cluster.client(a, "agent-r")
        canceller = await cluster.client(b, "agent-r", ["runs.cancel.v1"])
        winners = set()
        for n in range(6):
            run_id = (await producer.call("runs.start", {"intent": f"race {n}"}))["run_id"]
            producer.request("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
            canceller.request("runs.cancel", {"run_id": run_id, "idempotency_key": f"k{n}"})
            completed, cancelled = await gatherResults([producer.receive(), canceller.receive()])
            trace = await canceller.call("runs.get_trace", {"run_id": run_id})
            ended = [r for r in trace["records"] if r["record"] == "ended"]
            self.assertEqual(len(ended), 1)
            if ended[0]["termination"] == "outcome":
                self.assertEqual(completed["result"]["ok"], True)
                self.assertEqual(cancelled["result"]["status"], "already_terminal")
            else:
                self.assertEqual(ended[0]["termination"], "cancelled")
                self.assertEqual(cancelled["result"]["status"], "cancelled_confirmed")
                self.assertIn("already ended", completed["error"]["message"])
            winners.add(ended[0]["termination"])
        self.assertTrue(winners)

    async def test_cancel_through_another_daemon(self):
        """The run's agent cancels through daemon B a run produced through
        daemon A: confirmed, and A's producer is then told the run ended."""
        cluster = Cluster(self)
        a, b = await cluster.daemon(), await cluster.daemon()
        producer = await cluster.client(a, "agent-c")
        canceller = await cluster.client(b, "agent-c", ["runs.cancel.v1"])
        run_id = (await producer.call("runs.start", {"intent": "cancel me"}))["run_id"]
        answer = await canceller.call("runs.cancel", {"run_id": run_id, "idempotency_key": "k"})
        self.assertEqual(answer["status"], "cancelled_confirmed")
        dropped = await producer.call("runs.record_turns", {"run_id": run_id, "turns": [turn("late")]})
        self.assertEqual(dropped["dropped"], "run_terminal")
        refused = await producer.call_raw("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertIn("already ended", refused["error"]["message"])
        trace = await producer.call("runs.get_trace", {"run_id": run_id})
        self.assertEqual([r["record"] for r in trace["records"]], ["started", "ended"])
        self.assertEqual(trace["records"][-1]["termination"], "cancelled")

    async def test_same_agent_writes_through_another_daemon(self):
        """As on one daemon, another session of a run's agent may record
        turns and complete it, here through daemon B while the producer is
        on A; A's follower sees those turns and the end, and A's producer is
        then told the run ended."""
        cluster = Cluster(self)
        a, b = await cluster.daemon(), await cluster.daemon()
        producer = await cluster.client(a, "agent-w")
        run_id = (await producer.call("runs.start", {"intent": "shared"}))["run_id"]
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [turn("A")]})
        follower = await cluster.client(a)
        await follower.call("runs.subscribe", {"run_id": run_id})
        helper = await cluster.client(b, "agent-w")
        recorded = await helper.call("runs.record_turns", {"run_id": run_id, "turns": [turn("B")]})
        self.assertEqual((recorded["ok"], recorded["base_index"]), (True, 1))
        stranger = await cluster.client(b, "agent-other")
        refused = await stranger.call("runs.record_turns", {"run_id": run_id, "turns": [turn("x")]})
        self.assertFalse(refused["ok"])
        await helper.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        events = await events_until_ended(follower)
        self.assertEqual([(e["cursor"], e["record"]["record"], e["record"].get("prompt")) for e in events],
            [(2, "turn", "B"), (2, "ended", None)],
        )
        late = await producer.call("runs.record_turns", {"run_id": run_id, "turns": [turn("late")]})
        self.assertEqual(late["dropped"], "run_terminal")

    async def test_same_idempotency_key_on_two_daemons(self):
        """Two starts with one idempotency key through two daemons at once:
        one run exists and the agent gets its id from both; another agent's
        start with the same key is its own run (keys are per agent)."""
        cluster = Cluster(self)
        a, b = await cluster.daemon(), await cluster.daemon()
        first = await cluster.client(a, "agent-k")
        second = await cluster.client(b, "agent-k")
        start = {"intent": "once", "idempotency_key": "key-1"}
        first.request("runs.start", start)
        second.request("runs.start", start)
        answers = await gatherResults([first.receive(), second.receive()])
        run_id = keyed_run_id("agent-k", "key-1")
        self.assertEqual([a["result"]["run_id"] for a in answers], [run_id, run_id])
        self.assertEqual(cluster.sql("SELECT count(*) FROM car_runs"), [(1,)])
        other = await cluster.client(b, "agent-other")
        own = await other.call("runs.start", start)
        self.assertEqual(own["run_id"], keyed_run_id("agent-other", "key-1"))
        self.assertEqual(cluster.sql("SELECT count(*) FROM car_runs"), [(2,)])


class ResumeTests(unittest.TestCase):
    async def test_resume_through_another_daemon(self):
        """An agent whose connection to daemon A dropped resumes its run
        through daemon B within the lease and finishes it there; a follower
        on A sees B's records; A may no longer hand the run to anyone."""
        cluster = Cluster(self)
        a, b = await cluster.daemon(), await cluster.daemon()
        first = await cluster.client(a, "agent-m", ["runs.resume.v1"])
        run_id = (await first.call("runs.start", {"intent": "move"}))["run_id"]
        await first.call("runs.record_turns", {"run_id": run_id, "turns": [turn("on A")]})
        follower = await cluster.client(a)
        await follower.call("runs.subscribe", {"run_id": run_id})
        await first.drop()
        # A lets go of the run once it sees the drop (a client resuming
        # sooner is told the run is being recorded, and tries again).
        await wait_for(
            lambda: cluster.sql("SELECT detached FROM car_runs") == [(True,)],
            "A to release the run",
        )

        second = await cluster.client(b, "agent-m", ["runs.resume.v1"])
        resumed = await second.call("runs.resume", {"run_id": run_id})
        self.assertEqual(resumed["run_id"], run_id)
        recorded = await second.call("runs.record_turns", {"run_id": run_id, "turns": [turn("on B")]})
        self.assertEqual((recorded["ok"], recorded["base_index"]), (True, 1))
        # A let go of the run (its resume-window timer must not end it).
        await wait_for(
            lambda: f"run {run_id} is no longer produced through this daemon".encode() in a.output,
            "A to let go of the run",
        )
        third = await cluster.client(a, "agent-m", ["runs.resume.v1"])
        refused = await third.call_raw("runs.resume", {"run_id": run_id})
        self.assertIn("being recorded by another session", refused["error"]["message"])
        await second.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})

        events = await events_until_ended(follower)
        self.assertEqual([e["record"].get("prompt") for e in events], ["on B", None])
        trace = await second.call("runs.get_trace", {"run_id": run_id})
        self.assertEqual(
            [r.get("prompt", r["record"]) for r in trace["records"]],
            ["started", "on A", "on B", "ended"],
        )
        self.assertEqual(trace["records"][-1]["termination"], "outcome")


class DaemonLostTests(unittest.TestCase):
    async def test_kill_9(self):
        """kill -9 of daemon A with open runs: every acknowledged record is
        kept, daemon B ends A's runs incomplete ("daemon lost") within
        lease + 2 s, and A restarted leaves B's live run alone."""
        cluster = Cluster(self)
        a, b = await cluster.daemon(), await cluster.daemon()
        on_a = await cluster.client(a, "agent-a")
        runs = []
        for n in range(3):
            run_id = (await on_a.call("runs.start", {"intent": f"open {n}"}))["run_id"]
            await on_a.call("runs.record_turns", {"run_id": run_id, "turns": [turn("kept")] * (n + 1)})
            runs.append(run_id)
        on_b = await cluster.client(b, "agent-b")
        b_run = (await on_b.call("runs.start", {"intent": "live on B"}))["run_id"]
        reader = await cluster.client(b)

        await a.kill("KILL")
        # The promise under test is a deadline: B ends A's runs within lease + 2 s.
        deadline = reactor.seconds() + LEASE + 2
        while True:
            page = await reader.call("runs.list", {"agent_id": "agent-a"})
            if all(r["status"] == "incomplete" for r in page["runs"]):
                break
            self.assertLess(reactor.seconds(), deadline, "A's runs still open past lease + 2 s")
            await deferLater(reactor, 0.05, lambda: None)
        for n, run_id in enumerate(runs):
            trace = await reader.call("runs.get_trace", {"run_id": run_id})
            records = trace["records"]
            self.assertEqual([r.get("prompt") for r in records[1:-1]], ["kept"] * (n + 1))
            self.assertEqual(
                (records[-1]["termination"], records[-1]["reason"]), ("incomplete", "daemon lost")
            )

        await cluster.daemon(a.data_dir)
        summary = (await reader.call("runs.list", {"agent_id": "agent-b"}))["runs"][0]
        self.assertEqual((summary["run_id"], summary["status"]), (b_run, "in_progress"))
