"""
runs.subscribe / runs.unsubscribe and the runs.trace.event stream, in
process; on a loopback port, a follower that stops reading its socket.
"""

from twisted.trial import unittest

from car_twisted.store.memory import MemoryRunStore
from tests.support import SUCCESS_OUTCOME, HeldStore, in_process, serve, wait_for

START = {"agent_id": "agent-a", "intent": "do it"}


class SubscribeTests(unittest.TestCase):
    async def test_snapshot_then_stream_until_terminal(self):
        """The snapshot holds the turns so far; each later record arrives
        once, each turn one cursor further, the end at the last turn's
        cursor, and the status flips on the end."""
        daemon = in_process(self)
        producer, follower = await daemon.connect(), await daemon.connect()
        run_id = (await producer.call("runs.start", START))["run_id"]
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "one"}]})
        snapshot = await follower.call("runs.subscribe", {"run_id": run_id})
        self.assertEqual(
            (snapshot["agent_id"], snapshot["cursor"], snapshot["status"]), ("agent-a", 1, "in_progress")
        )
        self.assertEqual([t["prompt"] for t in snapshot["turns_so_far"]], ["one"])
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "two"}, {"prompt": "three"}]})
        await producer.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        events = [await follower.receive() for _ in range(3)]
        self.assertEqual({e["method"] for e in events}, {"runs.trace.event"})
        params = [e["params"] for e in events]
        self.assertEqual([p["cursor"] for p in params], [2, 3, 3])
        self.assertEqual([p["record"].get("prompt") for p in params[:2]], ["two", "three"])
        self.assertEqual([p["status"] for p in params], ["in_progress", "in_progress", "completed"])
        self.assertEqual(params[2]["record"]["outcome"]["status"], "success")
        self.assertEqual(daemon.parts.fanout._followers, {})

    async def test_cursor_is_the_number_of_turns_held(self):
        """CAR's cursor rule: the snapshot's cursor is len(turns_so_far); a
        turn or model_turn event advances it by one, the ended event does
        not, so after every event the cursor equals the turns a client
        holds (the started record never counts)."""
        daemon = in_process(self)
        producer, follower = await daemon.connect(), await daemon.connect()
        run_id = (await producer.call("runs.start", START))["run_id"]
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "a"}, {"prompt": "b"}]})
        await producer.call("runs.record_model_turn", {"run_id": run_id, "turn_index": 1, "assistant_text": "c"})
        snapshot = await follower.call("runs.subscribe", {"run_id": run_id})
        held = snapshot["turns_so_far"]
        self.assertEqual((len(held), snapshot["cursor"]), (3, 3))
        await producer.call("runs.record_model_turn", {"run_id": run_id, "turn_index": 2, "assistant_text": "d"})
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "e"}]})
        await producer.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        kinds = []
        while not kinds or kinds[-1] != "ended":
            event = (await follower.receive())["params"]
            kinds.append(event["record"]["record"])
            if kinds[-1] != "ended":
                held.append(event["record"])
            self.assertEqual(event["cursor"], len(held), kinds)
        self.assertEqual(kinds, ["model_turn", "turn", "ended"])
        again = await follower.call("runs.subscribe", {"run_id": run_id})
        self.assertEqual((again["cursor"], len(again["turns_so_far"])), (5, 5))

    async def test_record_durable_during_snapshot_is_not_duplicated(self):
        """A turn that becomes durable while the snapshot is being read is
        in the snapshot exactly once and not streamed again."""
        store = HeldStore(MemoryRunStore(), "read_records")
        daemon = in_process(self, store=store)
        producer, follower = await daemon.connect(), await daemon.connect()
        run_id = (await producer.call("runs.start", START))["run_id"]
        follower.request("runs.subscribe", {"run_id": run_id})
        await wait_for(lambda: store.held, "the snapshot read")
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "during"}]})
        store.release()
        snapshot = (await follower.receive())["result"]
        self.assertEqual([t["prompt"] for t in snapshot["turns_so_far"]], ["during"])
        self.assertEqual(snapshot["cursor"], 1)
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "after"}]})
        event = (await follower.receive())["params"]
        self.assertEqual((event["record"]["prompt"], event["cursor"]), ("after", 2))

    async def test_record_pending_at_snapshot_is_streamed(self):
        """A turn still being written when the snapshot is read is not in
        it, and is streamed once it is durable: no gap."""
        store = HeldStore(MemoryRunStore(), "append_turns")
        daemon = in_process(self, store=store)
        producer, follower = await daemon.connect(), await daemon.connect()
        run_id = (await producer.call("runs.start", START))["run_id"]
        producer.request("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "pending"}]})
        await wait_for(lambda: store.held, "the turn write")
        snapshot = await follower.call("runs.subscribe", {"run_id": run_id})
        self.assertEqual((snapshot["turns_so_far"], snapshot["cursor"]), ([], 0))
        store.release()
        event = (await follower.receive())["params"]
        self.assertEqual((event["record"]["prompt"], event["cursor"]), ("pending", 1))

    async def test_unsubscribe_and_disconnect(self):
        """Unsubscribe stops the stream and says whether it removed one; a
        closing session's subscriptions go with it."""
        daemon = in_process(self)
        producer, follower = await daemon.connect(), await daemon.connect()
        run_id = (await producer.call("runs.start", START))["run_id"]
        await follower.call("runs.subscribe", {"run_id": run_id})
        self.assertEqual(await follower.call("runs.unsubscribe", {"run_id": run_id}), {"run_id": run_id, "removed": True})
        self.assertEqual(await follower.call("runs.unsubscribe", {"run_id": run_id}), {"run_id": run_id, "removed": False})
        await producer.call("runs.record_turns", {"run_id": run_id, "turns": [{}]})
        self.assertEqual(await follower.call("runs.list", {"agent_id": "none"}), {"agent_id": "none", "runs": [], "next_cursor": None})
        await follower.call("runs.subscribe", {"run_id": run_id})
        await follower.close()
        await wait_for(lambda: len(daemon.runs.sessions) == 1, "the follower to close")
        self.assertEqual(daemon.parts.fanout._followers, {})

    async def test_refusals(self):
        """Unknown runs, and runs of another agent for a bound session, are
        refused alike; a terminal run gives its snapshot and no stream."""
        daemon = in_process(self)
        producer, follower = await daemon.connect(), await daemon.connect()
        run_id = (await producer.call("runs.start", START))["run_id"]
        unknown = await follower.call_raw("runs.subscribe", {"run_id": "nope"})
        list(daemon.runs.sessions.values())[-1].agent_id = "agent-b"
        foreign = await follower.call_raw("runs.subscribe", {"run_id": run_id})
        self.assertEqual(unknown["error"]["code"], foreign["error"]["code"])
        self.assertEqual(
            unknown["error"]["message"].replace("nope", run_id), foreign["error"]["message"]
        )
        await producer.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        done = await producer.call("runs.subscribe", {"run_id": run_id})
        self.assertEqual((done["status"], done["cursor"]), ("completed", 0))
        self.assertEqual(daemon.parts.fanout._followers, {})


class SlowSubscriberTests(unittest.TestCase):
    async def test_subscriber_that_never_reads(self):
        """A follower that stops reading while a producer records thousands
        of big turns: the producer's calls all succeed, the follower's
        pending events stay under the byte cap, the oldest overflow is
        dropped, and the follower still gets the terminal event, after a
        cursor jump."""
        daemon = await serve(self)
        producer, follower = await daemon.connect(), await daemon.connect()
        run_id = (await producer.call("runs.start", START))["run_id"]
        await follower.call("runs.subscribe", {"run_id": run_id})
        follower.protocol.transport.pauseProducing()
        outbox = list(daemon.runs.sessions.values())[-1].notify.__self__.outbox
        turns = [{"output": "z" * 16000}] * 50
        for _ in range(40):
            answer = await producer.call("runs.record_turns", {"run_id": run_id, "turns": turns})
            self.assertTrue(answer["ok"])
            self.assertLessEqual(outbox.unsent_bytes, 1024 * 1024)
        await producer.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertGreater(outbox.dropped, 0)
        metrics = daemon.factory.metrics.registry
        self.assertEqual(metrics.get_sample_value("car_follower_events_dropped_total"), outbox.dropped)
        follower.protocol.transport.resumeProducing()
        events = [(await follower.receive())["params"]]
        while events[-1]["status"] == "in_progress":
            events.append((await follower.receive())["params"])
        cursors = [e["cursor"] for e in events]
        self.assertEqual((cursors[-1], events[-1]["status"]), (2000, "completed"))
        self.assertLess(len(cursors), 2001)
        self.assertTrue(any(b - a > 1 for a, b in zip(cursors, cursors[1:])))
