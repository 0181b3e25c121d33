"""
Per-session flow control and the graceful stop, on a loopback daemon whose
store answers only when a test releases it.
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from car_twisted.limits import WireLimits
from car_twisted.protocol import MAX_PENDING_EVENT_BYTES, Outbox
from car_twisted.store.memory import MemoryRunStore
from tests.support import SUCCESS_OUTCOME, HeldStore, serve, wait_for

CAP = 8
FLOOD = 200
#: One turn's output: each answer or event that carries it is ~100 KB.
BIG = "z" * 100_000


def answer(client, timeout=10.0) -> Deferred:
    d = client.receive()
    d.addTimeout(timeout, reactor)
    return d


class FlowControlTests(unittest.TestCase):
    async def test_flooding_client_does_not_starve_another(self):
        """A client that sends far more requests than max_in_flight has at
        most that many handled at once and its socket is not read
        meanwhile; another client is answered; every flooded request is
        answered in the end, its effects in arrival order."""
        store = HeldStore(MemoryRunStore(), "start_run")
        daemon = await serve(self, store=store, limits=WireLimits(max_in_flight=CAP))
        flooder = await daemon.connect()
        (flooding,) = daemon.factory.connections
        other = await daemon.connect()
        pad = "p" * 2048  # more than one socket read's worth of frames
        for n in range(FLOOD):
            flooder.request("runs.start", {"agent_id": "flood", "intent": f"{n} {pad}"})
        await wait_for(lambda: len(store.held) == CAP, "the first requests to be held")
        listed = await other.call("runs.list", {"agent_id": "flood"})
        self.assertEqual(listed["runs"], [])
        self.assertEqual(len(store.held), CAP)
        self.assertEqual(flooding.in_flight, CAP)
        self.assertNotIn(flooding.transport, reactor.getReaders())

        answers = []
        while len(answers) < FLOOD:
            self.assertLessEqual(len(store.held), CAP)
            if store.held:
                store.release()
            answers.append(await answer(flooder))
        self.assertEqual(sorted(a["id"] for a in answers), list(range(1, FLOOD + 1)))
        self.assertIn(flooding.transport, reactor.getReaders())
        runs, _ = await store.list_runs("flood", None, 500, None)
        intents = [int(r.intent.split()[0]) for r in runs]
        self.assertEqual(intents, list(reversed(range(FLOOD))))


def connection_of(daemon, client):
    """The daemon-side protocol of C{client}'s connection."""
    port = client.protocol.transport.getHost().port
    (connection,) = [c for c in daemon.factory.connections if c.transport.getPeer().port == port]
    return connection


def stop_reading(daemon, client):
    """
    Make C{client} a client that never reads: it stops reading its socket,
    and the daemon's kernel buffers little for it, so what it is not sent
    piles up in the daemon. Returns the daemon-side protocol of its session.
    """
    connection = connection_of(daemon, client)
    set_send_buffer(connection, 4096)
    client.protocol.transport.pauseProducing()
    return connection


def read_again(client, connection):
    """Undo L{stop_reading}, with room for the backlog to flow quickly."""
    set_send_buffer(connection, 4 * 1024 * 1024)
    client.protocol.transport.resumeProducing()


def set_send_buffer(connection, size):
    connection.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def held_for(connection) -> int:
    """
    The bytes the daemon holds unsent for one session: the frames waiting in
    its outbox and what its TCP transport still buffers (read from the
    transport itself, so the outbox's own count is not trusted).
    """
    transport = connection.transport
    return connection.outbox.waiting_bytes + len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class OutboxTests(unittest.TestCase):
    def test_frames_keep_their_order(self):
        """While the transport is paused, answers and events wait in the
        order they came; on resume they are written in that order."""
        written = []
        outbox = Outbox(written.append, high_water=10)
        outbox.answer(b"a1")
        outbox.pauseProducing()
        outbox.event(b"e1")
        outbox.answer(b"a2")
        outbox.event(b"e2")
        self.assertEqual(written, [b"a1"])
        outbox.resumeProducing()
        self.assertEqual(written, [b"a1", b"e1", b"a2", b"e2"])

    def test_flush_writes_what_waits_though_paused(self):
        """A closing session's waiting frames are handed to the paused
        transport in order, so its close frame comes after them."""
        written = []
        outbox = Outbox(written.append, high_water=10)
        outbox.pauseProducing()
        outbox.answer(b"a1")
        outbox.event(b"e1")
        outbox.flush()
        self.assertEqual(written, [b"a1", b"e1"])
        self.assertEqual(outbox.waiting_bytes, 0)

    def test_event_cap_counts_what_the_transport_holds(self):
        """Waiting events are dropped oldest first once they and the bytes
        handed to the paused transport pass the cap; answers are kept and
        the session counts as over its unsent cap."""
        written = []
        outbox = Outbox(written.append, high_water=10, event_cap=100)
        outbox.answer(b"x" * 60)
        outbox.pauseProducing()
        for n in range(5):
            outbox.event(b"%d" % n * 20)
        outbox.answer(b"y" * 50)
        self.assertEqual(outbox.dropped, 3)
        self.assertEqual(outbox.unsent_bytes, 60 + 40 + 50)
        self.assertTrue(outbox.over(100))
        outbox.resumeProducing()
        self.assertEqual(written[1:], [b"3" * 20, b"4" * 20, b"y" * 50])
        self.assertFalse(outbox.over(0))


class UnsentBytesTests(unittest.TestCase):
    async def test_client_that_never_reads_answers_is_not_read(self):
        """A client that pipelines get_trace requests and never reads the
        answers: once its unsent answers pass max_unsent_bytes the daemon
        stops reading it and handles nothing more of it, so what the daemon
        holds for it stays under the cap plus one answer; once the client
        reads, every request is answered, in order."""
        unsent_cap = 256 * 1024
        daemon = await serve(self, limits=WireLimits(max_unsent_bytes=unsent_cap))
        producer = await daemon.connect()
        run_id = (await producer.call("runs.start", {"agent_id": "a", "intent": "big"}))["run_id"]
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{"output": BIG}]})
        reader = await daemon.connect()
        connection = stop_reading(daemon, reader)
        requests = 100
        for _ in range(requests):
            reader.request("runs.get_trace", {"run_id": run_id})
        await wait_for(lambda: connection.transport not in reactor.getReaders(), "the daemon to stop reading")
        self.assertLessEqual(held_for(connection), unsent_cap + len(BIG) + 1024)
        self.assertIn("result", await producer.call_raw("runs.list", {"agent_id": "a"}))

        read_again(reader, connection)
        answers = [await reader.receive() for _ in range(requests)]
        self.assertEqual([a["id"] for a in answers], list(range(1, requests + 1)))
        self.assertEqual({len(a["result"]["records"]) for a in answers}, {2})
        await wait_for(lambda: connection.transport in reactor.getReaders(), "the daemon to read again")

    async def test_follower_that_never_reads_costs_at_most_the_event_cap(self):
        """A follower that never reads while big turns are recorded: the
        event bytes the daemon holds for it, counting what its transport
        buffers, never pass the documented event cap; the oldest are
        dropped, and once it reads it gets the terminal event after a
        cursor jump."""
        daemon = await serve(self)
        producer = await daemon.connect()
        run_id = (await producer.call("runs.start", {"agent_id": "a", "intent": "followed"}))["run_id"]
        follower = await daemon.connect()
        await follower.call("runs.subscribe", {"run_id": run_id})
        connection = stop_reading(daemon, follower)
        turns = 120
        for _ in range(turns):
            recorded = await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{"output": BIG}]})
            self.assertTrue(recorded["ok"])
            self.assertLessEqual(held_for(connection), MAX_PENDING_EVENT_BYTES)
        await producer.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertGreater(connection.outbox.dropped, 0)

        read_again(follower, connection)
        events = [(await answer(follower))["params"]]
        while events[-1]["status"] == "in_progress":
            events.append((await answer(follower))["params"])
        self.assertEqual((events[-1]["cursor"], events[-1]["status"]), (turns, "completed"))
        self.assertLess(len(events), turns + 1)


class IdleSessionTests(unittest.TestCase):
    async def test_an_idle_session_has_no_outbox_until_its_first_request(self):
        """An idle session registers no producer with its transport (no
        outbox, no queues: docs/performance.md, RSS per idle session); the
        first request makes its outbox the transport's producer, which then
        paces it as before."""
        daemon = await serve(self)
        idle = await daemon.connect()
        used = await daemon.connect()
        await used.call("runs.list", {"agent_id": "a"})
        self.assertIsNone(connection_of(daemon, idle).transport.producer)
        connection = connection_of(daemon, used)
        self.assertIs(connection.transport.producer, connection.outbox)


class StopServingTests(unittest.TestCase):
    async def test_requests_in_flight_are_answered_before_the_close(self):
        """Stopping the factory handles no new frame, waits for the
        requests in flight, answers them, then closes with 1001; the
        run service's stop then leaves the run open and schedules nothing."""
        store = HeldStore(MemoryRunStore(), "start_run")
        daemon = await serve(self, store=store)
        client = await daemon.connect()
        client.request("runs.start", {"agent_id": "a", "intent": "in flight"})
        await wait_for(lambda: store.held, "the start to reach the store")
        stopped = daemon.factory.stop_serving()
        client.request("runs.start", {"agent_id": "a", "intent": "too late"})
        self.assertFalse(stopped.called)
        store.release()
        started = await answer(client)
        self.assertIn("result", started)
        self.assertEqual(await client.closed_by_daemon(), 1001)
        await stopped
        self.assertEqual(store.held, [])
        await daemon.runs.stop()
        await daemon.wait_closed()
        self.assertEqual((await store.get_run(started["result"]["run_id"])).status, "in_progress")
        self.assertEqual(daemon.clock.getDelayedCalls(), [])
        runs, _ = await store.list_runs("a", None, 10, None)
        self.assertEqual(len(runs), 1)
