"""Run ids and the other values records are made of."""

import time
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

from twisted.trial import unittest

from car_twisted import records
from car_twisted.records import agent_slug, new_run_id, now


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
