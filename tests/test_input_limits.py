"""
The dispatcher's input limits and codec: batch length, nesting depth, id
length, numbers JSON cannot carry, and answers that never exceed a message.
"""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from car_twisted.jsonrpc import Dispatcher, decode, encode
from car_twisted.limits import MAX_ID_CHARS, WireLimits
from tests.support import InProcessDaemon

START = {"agent_id": "agent-a", "intent": "goal"}


def request(id_, method="runs.start", params=START):
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


def nested(depth: int, leaf=0):
    """A value with C{depth} levels of arrays and objects."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


class InputLimitTests(unittest.TestCase):
    def setUp(self):
        self.daemon = InProcessDaemon()
        self.store = self.daemon.store
        self.session = self.daemon.session()

    def dispatch(self, message, limits=WireLimits(), raw=None):
        dispatcher = Dispatcher(self.daemon.parts.methods, limits=limits)
        payload = raw if raw is not None else json.dumps(message).encode()
        frame = self.successResultOf(dispatcher.dispatch(self.session, payload)).frame
        return None if frame is None else json.loads(frame)

    def runs(self):
        runs, _ = self.successResultOf(self.store.list_runs("agent-a", None, 500, None))
        return runs

    def test_batch_at_the_limit_runs(self):
        """A batch of exactly max_batch requests is answered in full."""
        answer = self.dispatch([request(n) for n in range(5)], WireLimits(max_batch=5))
        self.assertEqual(sorted(r["id"] for r in answer), list(range(5)))
        self.assertEqual(len(self.runs()), 5)

    def test_batch_over_the_limit_runs_nothing(self):
        """A batch longer than max_batch gets one -32600 error with id
        null, and none of its requests runs."""
        answer = self.dispatch([request(n) for n in range(101)])
        self.assertEqual(answer["error"]["code"], -32600)
        self.assertIsNone(answer["id"])
        self.assertIn("at most 100 requests", answer["error"]["message"])
        self.assertEqual(self.runs(), [])

    def test_nesting_at_the_limit_is_read(self):
        """A request nested exactly max_depth levels deep is handled."""
        params = dict(START, parameters=nested(30))
        answer = self.dispatch(request(1, params=params), WireLimits(max_depth=32))
        self.assertIn("result", answer)

    def test_deeper_nesting_is_refused_with_its_id(self):
        """A request nested deeper than max_depth gets -32600 naming the
        limit, with its id, and does not run."""
        params = dict(START, intent="deep", parameters=nested(40))
        answer = self.dispatch(request(7, params=params))
        self.assertEqual((answer["id"], answer["error"]["code"]), (7, -32600))
        self.assertIn("deeper than 32 levels", answer["error"]["message"])
        self.assertEqual(self.runs(), [])

    def test_deep_batch_is_refused_whole(self):
        """A batch with one too-deep request gets one error and runs
        nothing."""
        batch = [request(1), request(2, params=dict(START, parameters=nested(40)))]
        answer = self.dispatch(batch)
        self.assertEqual((answer["id"], answer["error"]["code"]), (None, -32600))
        self.assertEqual(self.runs(), [])

    def test_deep_notification_is_not_answered(self):
        """A too-deep notification gets no answer and does not run."""
        message = {"jsonrpc": "2.0", "method": "runs.start", "params": dict(START, p=nested(40))}
        self.assertIsNone(self.dispatch(message))
        self.assertEqual(self.runs(), [])

    def test_brackets_inside_strings_are_not_nesting(self):
        """Brackets inside strings do not count as nesting."""
        params = dict(START, intent="[{" * 100)
        self.assertIn("result", self.dispatch(request(1, params=params)))

    def test_nesting_past_the_parser_limit_is_a_parse_error(self):
        """Nesting beyond what the parser reads is a -32700 parse error."""
        answer = self.dispatch(None, raw=b"[" * 5000 + b"]" * 5000)
        self.assertEqual((answer["id"], answer["error"]["code"]), (None, -32700))

    def test_long_string_id_is_unreadable(self):
        """A string id over 256 characters is answered with id null and
        -32600; one of exactly 256 is echoed."""
        answer = self.dispatch(request("i" * (MAX_ID_CHARS + 1)))
        self.assertEqual((answer["id"], answer["error"]["code"]), (None, -32600))
        self.assertEqual(self.runs(), [])
        answer = self.dispatch(request("i" * MAX_ID_CHARS))
        self.assertEqual(answer["id"], "i" * MAX_ID_CHARS)
        self.assertIn("result", answer)

    def test_numbers_json_cannot_carry(self):
        """NaN, Infinity and numbers that overflow to infinity are parse
        errors; lone surrogates too."""
        for raw in [b"NaN", b'{"x": Infinity}', b"[1e400]", b'"\\ud800"']:
            with self.subTest(raw=raw):
                answer = self.dispatch(None, raw=raw)
                self.assertEqual(answer["error"]["code"], -32700)

    def test_huge_integers(self):
        """An integer beyond 64 bits is read as a float: as an id it is
        unreadable (-32600, id null), as an integer parameter it is
        -32602, and inside free-form JSON it is kept as a number."""
        big = "1" + "0" * 30
        answer = self.dispatch(None, raw=b'{"jsonrpc":"2.0","id":%s,"method":"runs.list","params":{"agent_id":"a"}}' % big.encode())
        self.assertEqual((answer["id"], answer["error"]["code"]), (None, -32600))
        answer = self.dispatch(request(1, "runs.list", {"agent_id": "a", "limit": int(big)}))
        self.assertEqual(answer["error"]["code"], -32602)
        self.assertIn("limit", answer["error"]["message"])
        self.assertEqual(decode(b"[%s]" % big.encode()), [1e30])

    def test_answers_never_exceed_the_message_limit(self):
        """An answer larger than the message limit is replaced by a -32603
        error with the request's id, and the frame fits."""
        limits = WireLimits(max_message_size=4096)
        dispatcher = Dispatcher({"big": lambda session, params: "x" * 5000}, limits=limits)
        frame = self.successResultOf(
            dispatcher.dispatch(self.session, json.dumps(request(3, "big", {})).encode())
        ).frame
        self.assertLessEqual(len(frame), 4096)
        answer = json.loads(frame)
        self.assertEqual((answer["id"], answer["error"]["code"]), (3, -32603))
        self.assertIn("4096-byte message limit", answer["error"]["message"])

    def test_batch_answers_are_trimmed_to_fit(self):
        """A batch whose answers together exceed the limit has its largest
        answers replaced by errors until the frame fits; small ones stay."""
        limits = WireLimits(max_message_size=4096)
        methods = {"sized": lambda session, params: "x" * params["n"]}
        dispatcher = Dispatcher(methods, limits=limits)
        batch = [request(n, "sized", {"n": n * 100}) for n in range(1, 16)]
        frame = self.successResultOf(dispatcher.dispatch(self.session, json.dumps(batch).encode())).frame
        self.assertLessEqual(len(frame), 4096)
        answers = {a["id"]: a for a in json.loads(frame)}
        self.assertEqual(sorted(answers), list(range(1, 16)))
        kept = sorted(n for n, a in answers.items() if "result" in a)
        self.assertEqual(kept, list(range(1, len(kept) + 1)))
        self.assertGreater(len(kept), 3)
        for n in kept:
            self.assertEqual(answers[n]["result"], "x" * n * 100)


class CodecTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
            lambda children: st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4),
            max_leaves=20,
        )
    )
    def test_round_trip(self, value):
        """What encode writes, decode reads back unchanged, and the
        standard library reads the same."""
        frame = encode(value)
        self.assertEqual(decode(frame), value)
        self.assertEqual(json.loads(frame), value)

    def test_integers_beyond_64_bits_are_encoded_exactly(self):
        """Integers orjson cannot write are written exactly, as JSON."""
        value = {"big": 2**70, "small": -(2**65), "text": "é"}
        self.assertEqual(json.loads(encode(value)), value)


class PageSizeTests(unittest.TestCase):
    def setUp(self):
        daemon = InProcessDaemon()
        self.store = daemon.store
        self.session = daemon.session()
        self.dispatcher = daemon.dispatcher

    def call(self, method, params):
        payload = json.dumps(request(1, method, params)).encode()
        frame = self.successResultOf(self.dispatcher.dispatch(self.session, payload)).frame
        self.assertLessEqual(len(frame), WireLimits().max_message_size)
        return json.loads(frame)

    def test_trace_pages_are_cut_to_fit_a_message(self):
        """runs.get_trace pages hold as many records as fit in a message;
        following the cursor reads every record exactly once."""
        run_id = self.call("runs.start", START)["result"]["run_id"]
        blob = "b" * 200_000
        for n in range(5):
            recorded = self.call("runs.record_turns", {"run_id": run_id, "turns": [{"tool": str(n), "parameters": {"blob": blob}}]})
            self.assertTrue(recorded["result"]["ok"], recorded)
        cursor, seen, pages = 0, [], 0
        while True:
            page = self.call("runs.get_trace", {"run_id": run_id, "cursor": cursor})["result"]
            if not page["records"]:
                break
            pages += 1
            seen += page["records"]
            cursor = page["cursor"]
        self.assertEqual([r["record"] for r in seen], ["started"] + ["turn"] * 5)
        self.assertEqual([r["tool"] for r in seen[1:]], ["0", "1", "2", "3", "4"])
        self.assertGreater(pages, 1)

    def test_outcome_too_large_is_refused(self):
        """An outcome over 256 KiB encoded is -32602 and the run stays open."""
        run_id = self.call("runs.start", START)["result"]["run_id"]
        outcome = {"status": "success", "evidence": ["e" * 1000] * 300}
        answer = self.call("runs.complete", {"run_id": run_id, "outcome": outcome})
        self.assertEqual(answer["error"]["code"], -32602)
        self.assertEqual(self.successResultOf(self.store.get_run(run_id)).status, "in_progress")
