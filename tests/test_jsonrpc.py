"""
JSON-RPC 2.0 semantics of the dispatcher: the examples of section 7 of the
JSON-RPC 2.0 specification, adapted to our methods, plus the framing edge
cases docs/protocol.md names.
"""

import json

from twisted.internet.defer import fail
from twisted.trial import unittest

from car_twisted.interfaces import StoreWriteFailed
from car_twisted.jsonrpc import Dispatcher, Reply
from car_twisted.store.memory import MemoryRunStore
from tests.support import HeldStore, InProcessDaemon, serve, wait_for

START = {"agent_id": "agent-a", "intent": "goal"}
ANY_RUN_ID = object()


def result(id_, value=ANY_RUN_ID):
    return {"jsonrpc": "2.0", "result": value, "id": id_}


def error(id_, code):
    return {"jsonrpc": "2.0", "error": {"code": code}, "id": id_}


# (what the example shows, frame sent, expected answer: None for no frame,
# a dict, or a list of dicts in any order).
SECTION_7_EXAMPLES = [
    (
        "call with positional parameters: ours take named ones only",
        '{"jsonrpc": "2.0", "method": "runs.start", "params": ["goal", "agent-a"], "id": 1}',
        error(1, -32602),
    ),
    (
        "call with named parameters",
        json.dumps({"jsonrpc": "2.0", "method": "runs.start", "params": START, "id": 3}),
        result(3),
    ),
    (
        "a notification is never answered",
        json.dumps({"jsonrpc": "2.0", "method": "runs.start", "params": START}),
        None,
    ),
    (
        "a notification of a missing method is not answered either",
        '{"jsonrpc": "2.0", "method": "foobar"}',
        None,
    ),
    (
        "call of a non-existent method",
        '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
        error("1", -32601),
    ),
    (
        "call with invalid JSON",
        '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
        error(None, -32700),
    ),
    (
        "call with an invalid Request object",
        '{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
        error(None, -32600),
    ),
    (
        "batch, invalid JSON",
        '[{"jsonrpc": "2.0", "method": "runs.list", "params": {"agent_id": "a"}, "id": "1"},'
        '{"jsonrpc": "2.0", "method"]',
        error(None, -32700),
    ),
    ("call with an empty array", "[]", error(None, -32600)),
    ("an invalid batch, but not empty", "[1]", [error(None, -32600)]),
    ("an invalid batch", "[1,2,3]", [error(None, -32600)] * 3),
    (
        "a mixed batch",
        json.dumps(
            [
                {"jsonrpc": "2.0", "method": "runs.start", "params": START, "id": "1"},
                {"jsonrpc": "2.0", "method": "runs.start", "params": START},
                {"jsonrpc": "2.0", "method": "runs.get_trace", "params": {"run_id": "nope"}, "id": "2"},
                {"foo": "boo"},
                {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
                {"jsonrpc": "2.0", "method": "runs.list", "params": {"agent_id": "nobody"}, "id": "9"},
            ]
        ),
        [
            result("1"),
            result("2", {"run_id": "nope", "not_found": True}),
            error(None, -32600),
            error("5", -32601),
            result("9", {"agent_id": "nobody", "runs": [], "next_cursor": None}),
        ],
    ),
    (
        "a batch of notifications gets no frame at all",
        json.dumps(
            [
                {"jsonrpc": "2.0", "method": "runs.start", "params": START},
                {"jsonrpc": "2.0", "method": "nope"},
            ]
        ),
        None,
    ),
]

# Beyond section 7: the framing edges of docs/protocol.md, in the same form.
FRAMING_EDGES = [
    ('"jsonrpc" must be exactly "2.0"', '{"jsonrpc": "1.0", "method": "runs.list", "id": 7}', error(7, -32600)),
    ("params must be an object or array", '{"jsonrpc": "2.0", "method": "runs.list", "params": "x", "id": 8}', error(8, -32600)),
    ("an unreadable id is answered with id null", '{"jsonrpc": "2.0", "method": "runs.list", "id": {"a": 1}}', error(None, -32600)),
    ("a fractional id is unreadable", '{"jsonrpc": "2.0", "method": "runs.list", "id": 1.5}', error(None, -32600)),
    ("a null id is a request, answered with id null", '{"jsonrpc": "2.0", "method": "foobar", "id": null}', error(None, -32601)),
    ("NaN is not JSON", '{"jsonrpc": "2.0", "method": "runs.list", "params": {"limit": NaN}, "id": 1}', error(None, -32700)),
    ("deep nesting is a parse error, not a crash", "[" * 100_000 + "]" * 100_000, error(None, -32700)),
    ("a scalar frame is an invalid request", "42", error(None, -32600)),
    ("invalid params name the field", '{"jsonrpc": "2.0", "method": "runs.start", "params": {"agent_id": "a"}, "id": 4}', error(4, -32602)),
]


def matches(expected, actual):
    if expected is ANY_RUN_ID:
        return isinstance(actual, dict) and bool(actual.get("run_id"))
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and set(expected) <= set(actual)
            and all(matches(v, actual[k]) for k, v in expected.items())
        )
    return expected == actual


class DispatcherTests(unittest.TestCase):
    def setUp(self):
        daemon = InProcessDaemon()
        self.store = daemon.store
        self.dispatcher = daemon.dispatcher
        self.session = daemon.session()

    def assertAnswers(self, cases):
        """Each frame of C{cases} gets exactly the answer it expects."""
        for name, frame, expected in cases:
            with self.subTest(name):
                answered = self.successResultOf(self.dispatcher.dispatch(self.session, frame.encode())).frame
                if expected is None:
                    self.assertIsNone(answered, name)
                    continue
                answer = json.loads(answered)
                if isinstance(expected, list):
                    self.assertIsInstance(answer, list, name)
                    self.assertEqual(len(answer), len(expected), name)
                    unmatched = list(answer)
                    for want in expected:
                        hit = next((a for a in unmatched if matches(want, a)), None)
                        self.assertIsNotNone(hit, f"{name}: no answer matches {want} in {answer}")
                        unmatched.remove(hit)
                else:
                    self.assertTrue(matches(expected, answer), f"{name}: {answer}")
                    if "error" in answer:
                        self.assertIsInstance(answer["error"]["message"], str)

    def test_section_7_examples(self):
        """Each example of section 7 of the JSON-RPC 2.0 specification
        (adapted) gets exactly the answer the specification prescribes;
        batches answer in one array."""
        self.assertAnswers(SECTION_7_EXAMPLES)

    def test_framing_edges(self):
        """Each framing edge case of docs/protocol.md gets exactly the
        answer that page gives."""
        self.assertAnswers(FRAMING_EDGES)

    def test_notifications_take_effect(self):
        """A notification is not answered but its method still runs."""
        frame = json.dumps({"jsonrpc": "2.0", "method": "runs.start", "params": START})
        self.assertIsNone(self.successResultOf(self.dispatcher.dispatch(self.session, frame.encode())).frame)
        runs, _ = self.successResultOf(self.store.list_runs("agent-a", None, 10, None))
        self.assertEqual(len(runs), 1)

    def test_invalid_params_message_names_the_field(self):
        """-32602 messages say which field is wrong."""
        frame = b'{"jsonrpc": "2.0", "method": "runs.start", "params": {"agent_id": "a"}, "id": 1}'
        answer = json.loads(self.successResultOf(self.dispatcher.dispatch(self.session, frame)).frame)
        self.assertEqual(answer["error"]["message"], "invalid params: intent is required (a non-empty string)")

    def test_handler_failure_hides_the_traceback(self):
        """An unexpected exception in a method answers -32603 with a clean
        message (no traceback on the wire) and is logged."""

        def broken(session, params):
            raise ZeroDivisionError("secret internals")

        dispatcher = Dispatcher({"broken": broken})
        frame = b'{"jsonrpc": "2.0", "method": "broken", "id": 1}'
        answer = json.loads(self.successResultOf(dispatcher.dispatch(self.session, frame)).frame)
        self.assertEqual(answer["error"]["code"], -32603)
        self.assertNotIn("secret", answer["error"]["message"])
        self.assertNotIn("Traceback", answer["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class RefusingStore(MemoryRunStore):
    """A memory store whose next C{refusals} writes fail at once, as a full disk would."""

    refusals = 0

    def _refuse(self, write, *args):
        if self.refusals:
            self.refusals -= 1
            return fail(StoreWriteFailed("No space left on device"))
        return write(*args)

    def start_run(self, started):
        return self._refuse(super().start_run, started)

    def end_run(self, run_id, ended):
        return self._refuse(super().end_run, run_id, ended)


class FastPathTests(unittest.TestCase):
    """
    A request whose store has already answered (the memory store) is
    answered in the call that brought it: no coroutine, no Deferred.
    """

    def setUp(self):
        self.daemon = InProcessDaemon()
        self.session = self.daemon.session()

    def frame(self, *requests):
        body = [
            {"jsonrpc": "2.0", "id": n, "method": method, "params": params}
            for n, (method, params) in enumerate(requests, 1)
        ]
        return json.dumps(body if len(body) > 1 else body[0]).encode()

    def test_known_answers_come_in_the_call(self):
        """runs.start, record_turns, get_trace, list and complete on the
        memory store answer with the Reply itself, and the methods return
        plain values."""
        reply = self.daemon.dispatcher.answer(self.session, self.frame(("runs.start", START)))
        self.assertIsInstance(reply, Reply)
        run_id = json.loads(reply.frame)["result"]["run_id"]
        for method, params in [
            ("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "p"}]}),
            ("runs.get_trace", {"run_id": run_id}),
            ("runs.list", {"agent_id": "agent-a"}),
            ("runs.complete", {"run_id": run_id, "outcome": {"status": "done"}}),
        ]:
            reply = self.daemon.dispatcher.answer(self.session, self.frame((method, params)))
            self.assertIsInstance(reply, Reply, method)
            self.assertIn("result", json.loads(reply.frame), method)
        self.assertEqual(
            self.daemon.runs.start(self.session, {**START, "idempotency_key": "k"})["agent_id"], "agent-a"
        )

    def test_known_batch_comes_in_the_call(self):
        """A batch whose every answer is known is answered in the call, in
        array order."""
        reply = self.daemon.dispatcher.answer(
            self.session, self.frame(("runs.start", START), ("runs.list", {"agent_id": "agent-a"}))
        )
        answers = json.loads(reply.frame)
        self.assertEqual([a["id"] for a in answers], [1, 2])
        self.assertEqual(answers[1]["result"]["runs"][0]["run_id"], answers[0]["result"]["run_id"])

    def test_pending_store_answers_later(self):
        """With a store that has not answered, the call returns a Deferred
        that fires with the answer once the write is done; the start's
        effect (the live run) is there before."""
        store = HeldStore(MemoryRunStore())
        daemon = InProcessDaemon(store=store)
        session = daemon.session()
        d = daemon.dispatcher.answer(session, self.frame(("runs.start", START)))
        self.assertNoResult(d)
        self.assertIsNotNone(session.current_run_id)
        store.release()
        answer = json.loads(self.successResultOf(d).frame)
        self.assertEqual(answer["result"]["run_id"], session.current_run_id)

    def test_refused_writes_are_undone_in_the_call(self):
        """A store that refuses a write at once (its Deferred has already
        failed) gets store_unavailable answered in the call, with the
        in-memory change undone: the same start and complete succeed when
        retried."""
        store = RefusingStore()
        daemon = InProcessDaemon(store=store)
        session = daemon.session()
        start = self.frame(("runs.start", {**START, "idempotency_key": "k"}))
        store.refusals = 1
        refused = json.loads(daemon.dispatcher.answer(session, start).frame)
        self.assertEqual(refused["error"]["data"]["reason"], "store_unavailable")
        self.assertIsNone(session.current_run_id)
        run_id = json.loads(daemon.dispatcher.answer(session, start).frame)["result"]["run_id"]
        self.assertEqual(session.current_run_id, run_id)
        complete = self.frame(("runs.complete", {"run_id": run_id, "outcome": {"status": "done"}}))
        store.refusals = 1
        refused = json.loads(daemon.dispatcher.answer(session, complete).frame)
        self.assertEqual(refused["error"]["data"]["reason"], "store_unavailable")
        self.assertEqual((session.current_run_id, session.producing), (run_id, {run_id}))
        self.assertEqual(
            json.loads(daemon.dispatcher.answer(session, complete).frame)["result"], {"ok": True, "run_id": run_id}
        )
        self.assertEqual(self.successResultOf(store.get_run(run_id)).status, "completed")

    def test_known_failure_answers_internal_error_in_the_call(self):
        """A method whose Deferred has already failed unexpectedly is
        answered -32603 in the call, and the failure is logged."""
        dispatcher = Dispatcher({"broken": lambda session, params: fail(ZeroDivisionError("secret"))})
        reply = dispatcher.answer(self.session, b'{"jsonrpc": "2.0", "method": "broken", "id": 1}')
        self.assertEqual(json.loads(reply.frame)["error"]["code"], -32603)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class WireTests(unittest.TestCase):
    async def test_binary_frame_refused_session_stays_open(self):
        """A binary frame gets a -32600 answer and the session keeps working."""
        daemon = await serve(self)
        ws = await daemon.connect()
        ws.protocol.sendMessage(b'{"jsonrpc": "2.0"}', isBinary=True)
        answer = await ws.receive()
        self.assertEqual(answer["error"]["code"], -32600)
        self.assertIn("binary", answer["error"]["message"])
        self.assertEqual(await ws.call("runs.list", {"agent_id": "x"}), {"agent_id": "x", "runs": [], "next_cursor": None})

    async def test_complete_sent_before_start_is_acknowledged(self):
        """A runs.complete sent right after runs.start, before the start's
        reply (its write is still pending), sees the run: effects apply in
        arrival order, and both replies come back matched by id."""
        store = HeldStore(MemoryRunStore())
        daemon = await serve(self, store=store)
        ws = await daemon.connect()
        start_id = ws.request("runs.start", START)
        await wait_for(lambda: daemon.runs.sessions and daemon.only_session().current_run_id)
        run_id = daemon.only_session().current_run_id
        complete_id = ws.request("runs.complete", {"run_id": run_id, "outcome": {"status": "done"}})
        await wait_for(lambda: len(store.held) == 2, "both writes to reach the store")
        store.release()
        answers = {}
        for _ in range(2):
            answer = await ws.receive()
            answers[answer["id"]] = answer
        self.assertEqual(answers[start_id]["result"]["run_id"], run_id)
        self.assertEqual(answers[complete_id]["result"], {"ok": True, "run_id": run_id})
        summary = await store.get_run(run_id)
        self.assertEqual(summary.outcome_status, "done")
