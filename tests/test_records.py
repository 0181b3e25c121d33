"""Run ids and the other values records are made of."""

import itertools
import time
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

from twisted.trial import unittest

from car_twisted import records
from car_twisted.errors import RPCError
from car_twisted.records import agent_slug, id_param, new_run_id, now, text_param
from tests.support import InProcessDaemon


class RunIdTests(unittest.TestCase):
    def test_uuid7_in_mint_order(self):
        """Run ids are canonical UUIDv7 strings, distinct, and sort in the
        order they were minted, even within one millisecond."""
        ids = [new_run_id() for _ in range(5000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(sorted(ids), ids)
        parsed = uuid.UUID(ids[0])
        self.assertEqual((str(parsed), parsed.version, parsed.variant), (ids[0], 7, uuid.RFC_4122))


class ValueTests(unittest.TestCase):
    def test_slug(self):
        """agent_name slugs: lower case, runs of other characters become one
        dash, trimmed; a name of nothing usable is empty."""
        self.assertEqual(agent_slug("Bulldozer Agent"), "bulldozer-agent")
        self.assertEqual(agent_slug("  ../Été__2 "), "t-2")
        self.assertEqual(agent_slug("!!!"), "")

    def test_now_is_rfc3339_utc_milliseconds(self):
        """Timestamps look like 2026-11-23T21:15:04.123Z."""
        self.assertRegex(now(), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_now_across_a_second(self):
        """The text of a second is reused only within that second: the
        millisecond after it reads as the next second, exactly as the
        standard library formats it."""
        clock = SimpleNamespace(ns=1_700_000_000_998_700_000)
        fake_time = SimpleNamespace(time_ns=lambda: clock.ns, strftime=time.strftime, gmtime=time.gmtime)
        self.patch(records, "time", fake_time)
        stamps = []
        for _ in range(3):
            stamps.append(now())
            clock.ns += 1_000_000
        expected = [
            datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
            for ms in (1_700_000_000_998, 1_700_000_000_999, 1_700_000_001_000)
        ]
        expected = [stamp.replace("+00:00", "Z") for stamp in expected]
        self.assertEqual(stamps, expected)
        self.assertEqual(stamps[2], "2023-11-14T22:13:21.000Z")


class StartParamsTests(unittest.TestCase):
    def test_runs_start_reads_params_as_the_general_readers(self):
        """runs.start reads its parameters in one pass, yet answers every
        combination of well-formed and malformed intent, outcome_description,
        idempotency_key and agent_id, from an unbound, an agent-bound and a
        host session, exactly as text_param, id_param and the agent
        resolution give it in that order: the same error, or the same agent
        and stored texts."""
        values = [ABSENT, None, "", "x", 7, ["x"], "k" * 256, "k" * 257]
        sessions = [(None, None), (None, "bound-agent"), ("agent", "bound-agent"), ("host", None)]
        checked = 0
        for intent, description, key, agent_id in itertools.product(values, repeat=4):
            params = {
                name: value
                for name, value in (
                    ("intent", intent),
                    ("outcome_description", description),
                    ("idempotency_key", key),
                    ("agent_id", agent_id),
                )
                if value is not ABSENT
            }
            for role, bound in sessions:
                daemon = InProcessDaemon(environ={})
                session = daemon.session()
                session.role, session.agent_id = role, bound
                expected = _read_start(daemon, session, params)
                try:
                    got = daemon.runs.start(session, params)
                except RPCError as e:
                    got = e.message
                else:
                    summary = self.successResultOf(daemon.store.get_run(got["run_id"]))
                    records_, _ = self.successResultOf(daemon.store.read_records(got["run_id"], 0, 1))
                    got = (summary.agent_id, records_[0]["intent"], records_[0]["outcome_description"])
                self.assertEqual(got, expected, (params, role))
                checked += 1
        self.assertEqual(checked, len(values) ** 4 * len(sessions))


#: A parameter left out.
ABSENT = object()


def _read_start(daemon, session, params):
    """What runs.start must answer, by the general readers: the error's
    message, or (agent_id, intent, outcome_description)."""
    try:
        intent = text_param(params, "intent", required=True)
        description = text_param(params, "outcome_description")
        id_param(params, "idempotency_key")
        agent_id = daemon.runs._resolve_agent(session, params)
    except RPCError as e:
        return e.message
    return agent_id, intent, description
