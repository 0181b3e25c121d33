"""The examples/ scripts, run as a user would run them."""

import os
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.support import AuthDaemon

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class FollowRunExampleTests(unittest.TestCase):
    async def test_follow_run_prints_every_event(self):
        """follow_run.py, against a daemon with auth on, prints the
        subscription, one event per turn and the end, each turn one cursor
        further (the end does not advance it), and the run it made is
        completed."""
        auth = await AuthDaemon.serve(self)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [os.path.join(EXAMPLES, "follow_run.py"), "--url", auth.daemon.url, "--data-dir", auth.data_dir],
            env={**os.environ, "CAR_AUTH_TOKEN": ""},
            reactor=reactor,
        )
        self.assertEqual(code, 0, err.decode())
        lines = out.decode().splitlines()
        self.assertTrue(lines[0].startswith("following run "), lines)
        self.assertIn("cursor=0 status=in_progress", lines[0])
        events = [line for line in lines if line.startswith("event")]
        self.assertEqual([e.split()[1] for e in events], ["cursor=1", "cursor=2", "cursor=3", "cursor=3"])
        self.assertEqual(["search" in events[0], "read" in events[1], "ended" in events[3]], [True] * 3)
        self.assertEqual(lines[-1], "run ended: completed")
        runs, _ = await auth.daemon.store.list_runs("demo-agent", None, 10, None)
        self.assertEqual([r.status for r in runs], ["completed"])
