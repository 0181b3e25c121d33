"""``twistd car``: option parsing, the service it builds, the auth secrets
it makes at start, and what it logs."""

import os

from twisted.internet import error, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from car_twisted import __version__
from car_twisted.limits import WireLimits
from car_twisted.tap import DEFAULT_HTTP, DEFAULT_LISTEN, DaemonService, Options, makeService
from tests.support import RPCClient, private_dir


class OptionsTests(unittest.TestCase):
    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        """Without options: the default endpoint and the grace window."""
        options = self.parse("--data-dir", self.mktemp())
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(options["grace"], 0.25)
        self.assertEqual(options["http"], DEFAULT_HTTP)
        self.assertIsNotNone(options["http-endpoint"])

    def test_http_none_turns_the_http_side_off(self):
        """--http none: no HTTP endpoint."""
        self.assertIsNone(self.parse("--http", "none", "--data-dir", "d")["http-endpoint"])

    def test_limits_default_and_set(self):
        """Without limit options the wire limits are the defaults; each
        limit option sets its field."""
        self.assertEqual(self.parse("--data-dir", "d")["limits"], WireLimits())
        options = self.parse(
            "--data-dir", "d", "--max-message-size", "2097152", "--ping-interval", "10",
            "--ping-timeout", "25", "--open-handshake-timeout", "3", "--close-handshake-timeout", "1.5",
            "--max-connections", "20000", "--max-batch", "10", "--max-depth", "16", "--max-in-flight", "8",
        )  # fmt: skip
        self.assertEqual(
            options["limits"],
            WireLimits(
                max_message_size=2097152, auto_ping_interval=10, auto_ping_timeout=25,
                open_handshake_timeout=3, close_handshake_timeout=1.5, max_connections=20000,
                max_batch=10, max_depth=16, max_in_flight=8,
            ),
        )  # fmt: skip

    def test_listen_is_repeatable(self):
        """Every --listen is kept, in order."""
        options = self.parse("--listen", "tcp:0", "--listen", "unix:/tmp/car.sock", "--data-dir", "d")
        self.assertEqual(options["listen"], ["tcp:0", "unix:/tmp/car.sock"])

    def test_data_dir_from_car_home(self):
        """The data dir defaults to $CAR_HOME."""
        self.patch(os.environ, "get", {"CAR_HOME": "/srv/car"}.get)
        self.assertEqual(self.parse()["data-dir"], "/srv/car")

    def test_bad_options_are_usage_errors(self):
        """Bad values are usage errors naming the option, not tracebacks."""
        for argv, needle in [
            (["--store", "nope"], "--store"),
            (["--listen", "bogus:1"], "--listen"),
            (["--http", "bogus:1"], "--http"),
            (["--grace", "-1"], "--grace"),
            (["--grace", "soon"], "could not convert"),
            (["--no-such-option"], "no-such-option"),
            (["--max-message-size", "1000"], "--max-message-size"),
            (["--max-depth", "1000"], "--max-depth"),
            (["--max-batch", "0"], "--max-batch"),
            (["--ping-timeout", "-1"], "--ping-timeout"),
            (["--max-in-flight", "lots"], "invalid literal"),
        ]:
            with self.subTest(argv=argv):
                error = self.assertRaises(usage.UsageError, self.parse, *argv)
                self.assertIn(needle, str(error))


class ServiceTests(unittest.TestCase):
    async def test_service_serves_and_stops(self):
        """The service listens on its endpoint, answers JSON-RPC, and stops
        listening when stopped."""
        options = Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--http", "none", "--store", "memory", "--no-auth", "--data-dir", self.mktemp()])
        service = makeService(options)
        service.startService()
        await service.ready
        port = service._ports[0].getHost().port
        ws = await RPCClient.connect(port)
        started = await ws.call("runs.start", {"agent_id": "a", "intent": "x"})
        self.assertEqual(started["agent_id"], "a")
        await ws.close()
        await service.stopService()
        with self.assertRaises(error.ConnectionRefusedError):
            await RPCClient.connect(port)


class DaemonServiceAuthTests(unittest.TestCase):
    async def start(self, *argv, environ=None):
        """Start the service on an ephemeral loopback port; its log texts."""
        options = Options()
        options.parseOptions(
            ["--store", "memory", "--listen", "tcp:0:interface=127.0.0.1", "--http", "none", *argv]
        )
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

    async def test_startup_line_names_the_version(self):
        """The startup log line names the package's version."""
        _, logged = await self.start("--data-dir", private_dir(self), "--no-auth")
        self.assertTrue(any(text.startswith(f"car-twisted {__version__}: memory store") for text in logged), logged)

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
