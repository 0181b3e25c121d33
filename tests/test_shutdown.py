"""
Graceful stop of the real daemon process: SIGTERM while clients stream
requests, then a restart on the same data directory.
"""

import signal

from twisted.trial import unittest

from tests.daemon_process import DaemonProcess
from tests.support import RPCClient
from tests.test_crash import signal_mid_stream

CLIENTS = 5
STARTS_BEFORE_TERM = 60


class GracefulStopTests(unittest.TestCase):
    async def start_daemon(self, data_dir):
        daemon = DaemonProcess("file", data_dir)
        self.addCleanup(daemon.kill)
        await daemon.start()
        return daemon

    async def test_sigterm_keeps_every_acknowledged_request(self):
        """On SIGTERM mid-stream the daemon closes every connection with
        1001 and stops cleanly (twistd then ends itself with the signal it
        got, so a supervisor sees a SIGTERM exit); after a restart every
        acknowledged start and completion is on disk, and the runs left
        open are ended incomplete ("daemon restarted")."""
        data_dir = self.mktemp()
        daemon = await self.start_daemon(data_dir)
        agents = [f"term-agent-{n}" for n in range(CLIENTS)]
        streams = await signal_mid_stream(daemon, agents, STARTS_BEFORE_TERM, "TERM")
        self.assert_stopped_cleanly(daemon)
        self.assertEqual([s.client.protocol.close_code for s in streams], [1001] * CLIENTS)

        daemon = await self.start_daemon(data_dir)
        reader = await RPCClient.connect(daemon.port)
        for stream in streams:
            page = await reader.call("runs.list", {"agent_id": stream.agent_id, "limit": 500})
            listed = {r["run_id"]: r for r in page["runs"]}
            self.assertEqual(sorted(listed), sorted(stream.started))
            for run_id in stream.started:
                trace = await reader.call("runs.get_trace", {"run_id": run_id})
                ended = trace["records"][-1]
                if run_id in stream.completed:
                    self.assertEqual(ended["termination"], "outcome")
                else:
                    self.assertEqual(
                        (ended["termination"], ended["reason"]), ("incomplete", "daemon restarted")
                    )
        await reader.close()
        await daemon.kill("TERM")
        self.assert_stopped_cleanly(daemon)

    def assert_stopped_cleanly(self, daemon):
        output = daemon.output.decode(errors="replace")
        self.assertEqual((daemon.exit_code, daemon.exit_signal), (None, signal.SIGTERM), output)
        self.assertIn("car-twisted stopped: the store is closed", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Unhandled", output)
