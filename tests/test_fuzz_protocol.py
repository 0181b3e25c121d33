"""
Hostile traffic over a real loopback WebSocket: arbitrary bytes and invalid
UTF-8 as text frames, binary frames, deep nesting, huge numbers and
interleaved batches from several clients. Whatever one session sends, the
daemon answers it or closes that session only, another session keeps
working, and every acknowledged run is in the store.

Hypothesis draws the cases; each is then played against the daemon (the
reactor cannot run inside a Hypothesis example), so a failure names the
case rather than a shrunk one.
"""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.trial import unittest

from tests.support import serve
from tests.test_fuzz import json_values

KNOWN_CODES = {-32700, -32600, -32601, -32602, -32603, -32001, -32006, -32008}


def draw(strategy, count: int) -> list:
    """C{count} cases drawn by Hypothesis."""
    cases = []

    @settings(
        max_examples=count, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(strategy)
    def collect(case):
        cases.append(case)

    collect()
    return cases[:count]


hostile_frames = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(19, 400).map(lambda n: b'{"jsonrpc":"2.0","id":%s,"method":"runs.list"}' % (b"9" * n)),
    st.integers(300, 400).map(lambda n: b"[1e%d]" % n),
)


def timed(d: Deferred, timeout: float = 5.0) -> Deferred:
    d.addTimeout(timeout, reactor)
    return d


class ProtocolFuzzTests(unittest.TestCase):
    async def acknowledged_start(self, client, n: int, agent_id: str):
        """Send runs.start after the hostile frame: its run id, or None if
        the session is closed."""
        if client.protocol.closed.called:
            return None
        client.request("runs.start", {"agent_id": agent_id, "intent": f"after case {n}"}, id_=f"start-{n}")
        while True:
            receiving = client.receive()
            closing = Deferred()
            client.protocol.closed.addBoth(lambda r: (closing.called or closing.callback(None), r)[1])
            frame = await timed(Deferred.fromCoroutine(_first(receiving, closing)))
            if frame is None:
                receiving.addErrback(lambda f: f.trap(CancelledError))
                receiving.cancel()
                return None
            for response in frame if isinstance(frame, list) else [frame]:
                self.assertEqual(response.get("jsonrpc"), "2.0", response)
                if "error" in response:
                    self.assertIn(response["error"]["code"], KNOWN_CODES, response)
                    self.assertNotIn("internal error", response["error"]["message"])
                if response.get("id") == f"start-{n}":
                    return response["result"]["run_id"]

    async def test_hostile_text_frames(self):
        """Each hostile text frame (invalid UTF-8 included) on its own
        session is answered or closes that session (1007 for invalid
        UTF-8); a bystander session keeps working; every acknowledged run
        is in the store."""
        daemon = await serve(self)
        bystander = await daemon.connect()
        acknowledged = []
        for n, frame in enumerate(draw(hostile_frames, 80)):
            client = await daemon.connect()
            client.send_text(frame)
            run_id = await self.acknowledged_start(client, n, "fuzz")
            try:
                frame.decode("utf-8")
            except UnicodeDecodeError:
                self.assertIsNone(run_id, frame)
                self.assertEqual(await client.closed_by_daemon(), 1007)
            else:
                self.assertIsNotNone(run_id, frame)
                acknowledged.append(run_id)
            await bystander.call("runs.list", {"agent_id": "fuzz", "limit": 1})
        await self.assert_stored(daemon, "fuzz", acknowledged)

    async def test_binary_frames_are_refused_and_the_session_stays(self):
        """Binary frames of any content get -32600 and the session goes on."""
        daemon = await serve(self)
        client = await daemon.connect()
        acknowledged = []
        for n, payload in enumerate(draw(st.binary(max_size=300), 30)):
            client.protocol.sendMessage(payload, isBinary=True)
            refused = await timed(client.receive())
            self.assertEqual((refused["id"], refused["error"]["code"]), (None, -32600))
            acknowledged.append(await self.acknowledged_start(client, n, "binary"))
        await self.assert_stored(daemon, "binary", acknowledged)

    async def test_interleaved_batches_from_several_clients(self):
        """Several clients send batches mixing starts with garbage requests
        at once: each gets exactly the answers to its own requests and
        every start it saw acknowledged is stored under its agent."""
        daemon = await serve(self)
        clients = [await daemon.connect() for _ in range(4)]
        garbage = draw(json_values, 40)

        async def play(k, client):
            acknowledged = []
            for round_ in range(10):
                batch = []
                for g in garbage[round_ * 4 : round_ * 4 + 4]:
                    batch.append({"jsonrpc": "2.0", "id": f"g-{k}-{len(batch)}-{round_}", "method": "runs.start", "params": {"intent": g}})
                    batch.append(g)
                    batch.append({"jsonrpc": "2.0", "id": f"s-{k}-{len(batch)}-{round_}", "method": "runs.start", "params": {"agent_id": f"agent-{k}", "intent": "batched"}})
                client.send(batch)
                ours = [m["id"] for m in batch[0::3] + batch[2::3]]
                answers = await timed(client.receive())
                got = [a["id"] for a in answers if a["id"] in ours]
                self.assertEqual(sorted(got), sorted(ours))
                for a in answers:
                    if isinstance(a["id"], str) and a["id"].startswith("s-"):
                        acknowledged.append(a["result"]["run_id"])
            return acknowledged

        results = await gatherResults([Deferred.fromCoroutine(play(k, c)) for k, c in enumerate(clients)])
        for k, acknowledged in enumerate(results):
            self.assertEqual(len(acknowledged), 40)
            await self.assert_stored(daemon, f"agent-{k}", acknowledged)

    async def assert_stored(self, daemon, agent_id, acknowledged):
        runs, _ = await daemon.store.list_runs(agent_id, None, 500, None)
        self.assertEqual(sorted(r.run_id for r in runs), sorted(acknowledged))


async def _first(receiving: Deferred, closing: Deferred):
    """The next frame, or None if the connection closes first."""
    done = Deferred()
    receiving.addCallback(lambda frame: done.called or done.callback(frame))
    closing.addCallback(lambda _: done.called or done.callback(None))
    return await done
