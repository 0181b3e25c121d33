"""
``twistd car``'s service: the auth secrets at start, and what it logs.
"""

import os

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from car_twisted.tap import DaemonService, Options
from tests.support import RPCClient, private_dir


class DaemonServiceAuthTests(unittest.TestCase):
    async def start(self, *argv, environ=None):
        """Start the service on an ephemeral loopback port; its log texts."""
        options = Options()
        options.parseOptions(["--store", "memory", "--listen", "tcp:0:interface=127.0.0.1", *argv])
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = DaemonService(options, reactor, environ or {})
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        self.port = service._ports[0].getHost().port
        return service, [formatEvent(e) for e in events]

    async def test_auth_on_by_default(self):
        """By default the service makes the secrets in the data dir, logs
        where they are but never what they are, and refuses unauthenticated
        requests."""
        data_dir = os.path.join(private_dir(self), "car")
        service, logged = await self.start("--data-dir", data_dir)
        self.assertTrue(service.registry.authenticator.enabled)
        tokens = []
        for name in ("auth-token", "host-token"):
            with open(os.path.join(data_dir, name)) as f:
                tokens.append(f.read().strip())
        self.assertTrue(any(os.path.join(data_dir, "auth-token") in text for text in logged), logged)
        for token in tokens:
            self.assertFalse([text for text in logged if token in text])
        ws = await RPCClient.connect(self.port)
        refused = await ws.call_raw("runs.list", {"agent_id": "agent-A"})
        self.assertEqual(refused["error"]["code"], -32001)
        self.assertEqual(await ws.closed_by_daemon(), 4001)

    async def test_environment_secret_is_named_not_logged(self):
        """With CAR_AUTH_TOKEN set, the log names the variable, not its value."""
        secret = "environment-secret-value-0123456789"
        service, logged = await self.start(
            "--data-dir", private_dir(self), environ={"CAR_AUTH_TOKEN": secret}
        )
        self.assertTrue(any("$CAR_AUTH_TOKEN" in text for text in logged), logged)
        self.assertFalse([text for text in logged if secret in text])

    async def test_no_auth(self):
        """--no-auth makes no token files and accepts every session."""
        data_dir = os.path.join(private_dir(self), "car")
        service, _ = await self.start("--data-dir", data_dir, "--no-auth")
        self.assertFalse(service.registry.authenticator.enabled)
        self.assertFalse(os.path.exists(data_dir))
        ws = await RPCClient.connect(self.port)
        listed = await ws.call("runs.list", {"agent_id": "agent-A"})
        self.assertEqual(listed["runs"], [])
        await ws.close()
