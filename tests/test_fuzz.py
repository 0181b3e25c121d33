"""
Property-based tests of the dispatcher and the run service behind it: whatever
a client sends, every answer is a well-formed JSON-RPC response, no method
fails with an internal error, and acknowledged records stay in the store.
"""

import json
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from car_twisted.outcomes import as_deferred
from tests.support import InProcessDaemon

KNOWN_CODES = {-32700, -32600, -32601, -32602, -32603, -32001, -32006, -32008}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

PARAM_NAMES = [
    "run_id", "agent_id", "agent_name", "intent", "outcome", "turns", "cursor",
    "limit", "status", "idempotency_key", "reason", "turn_index", "duration_ms",
    "outcome_description", "token", "host_token",
]

hostile_params = st.dictionaries(st.sampled_from(PARAM_NAMES), json_values, max_size=6)


def requests(methods):
    return st.fixed_dictionaries(
        {"jsonrpc": st.just("2.0"), "method": st.sampled_from(methods), "params": hostile_params},
        optional={"id": st.integers(0, 10**6) | st.text(max_size=8)},
    )


class DispatcherFuzzTests(unittest.TestCase):
    def setUp(self):
        self.daemon = InProcessDaemon()
        self.store = self.daemon.store
        self.runs = self.daemon.runs
        self.dispatcher = self.daemon.dispatcher
        self.methods = sorted(self.daemon.parts.methods) + ["no.such.method"]

    def answer(self, session, payload: bytes):
        """Dispatch and check the answer's shape; return the decoded answer."""
        frame = self.successResultOf(self.dispatcher.dispatch(session, payload)).frame
        if frame is None:
            return None
        answer = json.loads(frame)
        for response in answer if isinstance(answer, list) else [answer]:
            self.assertEqual(response["jsonrpc"], "2.0")
            self.assertIn("id", response)
            self.assertEqual(len({"result", "error"} & set(response)), 1, response)
            if "error" in response:
                self.assertIn(response["error"]["code"], KNOWN_CODES)
                self.assertNotIn("internal error", response["error"]["message"])
        return answer

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, payload):
        """Any bytes (invalid UTF-8 included) get a well-formed answer."""
        self.answer(self.daemon.session(), payload)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(json_values)
    def test_arbitrary_json(self, value):
        """Any JSON value as a frame gets a well-formed answer."""
        self.answer(self.daemon.session(), json.dumps(value).encode())

    @settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def test_hostile_params_never_crash_a_method(self, data):
        """Every method, fed arbitrary params (alone or in batches, often
        naming a live run), answers with a result or a deliberate error,
        never an internal error."""
        session = self.daemon.session()
        session.capabilities = frozenset({"runs.cancel.v1", "runs.resume.v1", "runs.pagination.v1"})
        session.agent_id = data.draw(st.sampled_from([None, "agent-a"]))
        live = self.successResultOf(
            as_deferred(self.runs.start(session, {"agent_id": "agent-a", "intent": "target"}))
        )
        batch = data.draw(st.lists(requests(self.methods), min_size=1, max_size=5))
        for request in batch:
            if data.draw(st.booleans()):
                request["params"]["run_id"] = live["run_id"]
        payload = batch if data.draw(st.booleans()) else batch[0]
        self.answer(session, json.dumps(payload).encode())

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(st.binary(max_size=50), json_values.map(lambda v: json.dumps(v).encode())), max_size=8))
    def test_acknowledged_runs_survive_garbage(self, garbage):
        """Starts acknowledged between garbage frames are all still there,
        open, and nothing else was recorded."""
        session = self.daemon.session()
        agent_id = uuid.uuid4().hex
        acknowledged = []
        for n, payload in enumerate(garbage):
            self.answer(session, payload)
            start = {"jsonrpc": "2.0", "id": n, "method": "runs.start",
                     "params": {"agent_id": agent_id, "intent": f"run {n}"}}
            acknowledged.append(self.answer(session, json.dumps(start).encode())["result"]["run_id"])
        for run_id in acknowledged:
            self.assertEqual(self.successResultOf(self.store.get_run(run_id)).status, "in_progress")
        runs, _ = self.successResultOf(self.store.list_runs(agent_id, None, 500, None))
        self.assertEqual(sorted(r.run_id for r in runs), sorted(acknowledged))
