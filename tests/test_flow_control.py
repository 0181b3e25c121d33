"""
Per-session flow control and the graceful stop, on a loopback daemon whose
store answers only when a test releases it.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from car_twisted.limits import WireLimits
from car_twisted.store.memory import MemoryRunStore
from tests.support import HeldStore, serve, wait_for

CAP = 8
FLOOD = 200


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
