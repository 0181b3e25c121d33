"""
Separate processes against a daemon started by the test: a supervisor gets
an agent's token with the installed ``car-twisted agent-token`` command, an
agent process records a run with it, and ``car-twisted runs list`` reads it
back as the host.
"""

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.support import AuthDaemon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT_SCRIPT = os.path.join(ROOT, "tests", "recording_agent.py")


def car_twisted_command() -> str:
    """The installed console script, beside this Python."""
    path = os.path.join(os.path.dirname(sys.executable), "car-twisted")
    if not os.path.exists(path):
        raise AssertionError(f"{path} is missing: install the package (pip install '.[test]')")
    return path


def process_environment(**variables) -> dict:
    """A clean environment (no inherited CAR_* settings) that imports this checkout."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT, **variables}


async def run_process(executable, *args, **variables):
    out, err, code = await getProcessOutputAndValue(
        executable, args, env=process_environment(**variables), reactor=reactor
    )
    return out.decode(), err.decode(), code


class EndToEndTests(unittest.TestCase):
    async def test_supervised_agent_process_records_a_run(self):
        """The token printed by `car-twisted agent-token` lets a separate
        agent process bind to its agent and record a completed run, which
        `car-twisted runs list --json` then shows to the host."""
        auth = await AuthDaemon.serve(self)
        out, err, code = await run_process(
            car_twisted_command(), "agent-token", "agent-e2e", "--data-dir", auth.data_dir
        )
        self.assertEqual(code, 0, err)
        token = out.strip()

        out, err, code = await run_process(
            sys.executable,
            AGENT_SCRIPT,
            CAR_DAEMON_URL=auth.daemon.url,
            CAR_AGENT_ID="agent-e2e",
            CAR_AGENT_TOKEN=token,
        )
        self.assertEqual(code, 0, err)
        started = json.loads(out)
        self.assertEqual(started["agent_id"], "agent-e2e")
        summary = await auth.daemon.store.get_run(started["run_id"])
        self.assertEqual(
            (summary.agent_id, summary.status, summary.outcome_status),
            ("agent-e2e", "completed", "success"),
        )

        out, err, code = await run_process(
            car_twisted_command(), "runs", "list", "agent-e2e", "--json",
            "--data-dir", auth.data_dir, CAR_DAEMON_URL=auth.daemon.url,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual([r["run_id"] for r in json.loads(out)["runs"]], [started["run_id"]])

    async def test_agent_process_with_another_agents_token_records_nothing(self):
        """An agent process claiming another agent with its own token is
        refused (token mismatch) and nothing is recorded."""
        auth = await AuthDaemon.serve(self)
        out, err, code = await run_process(
            car_twisted_command(), "agent-token", "agent-e2e", "--data-dir", auth.data_dir
        )
        self.assertEqual(code, 0, err)
        out, err, code = await run_process(
            sys.executable,
            AGENT_SCRIPT,
            CAR_DAEMON_URL=auth.daemon.url,
            CAR_AGENT_ID="agent-other",
            CAR_AGENT_TOKEN=out.strip(),
        )
        self.assertNotEqual(code, 0)
        self.assertIn("auth failed: token mismatch", err)
        self.assertEqual(await auth.daemon.store.open_runs(), [])
        self.assertEqual(await auth.daemon.store.list_runs("agent-other", None, 10, None), ([], None))
