"""
The benchmark suite still runs. Its smallest mode, end to end, proves the
bench code works against the current daemon; it asserts nothing about
speed (the figures and their goals live in bench/ and docs/performance.md).
"""

import os
import subprocess
import sys

from twisted.trial import unittest

RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run.py")


class BenchSmokeTests(unittest.TestCase):
    def test_smallest_mode_runs_every_section(self):
        """
        C{bench/run.py --smoke} starts the echo server and the daemons,
        drives every default section with tiny loads, stops by itself with
        exit status 0, and prints a figure for each section; its drop storm
        found every one of its 20 runs ended incomplete.
        """
        done = subprocess.run([sys.executable, RUN, "--smoke"], capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        for expected in [
            "machine: ",
            "runs.start 50 conn x 1, memory store",
            "sequential runs.start round trip p99, memory",
            "durable runs.start 50 conn x 1, sqlite",
            "durable runs.start 1 conn x 100, file",
            "RSS per idle session, daemon (20)",
            "drop storm, 20 open runs: all ended incomplete",
            "(20 incomplete)",
            "delayed calls left after the storm",
        ]:
            self.assertIn(expected, done.stdout)
