"""``twistd car``: option parsing and the service it builds."""

from twisted.internet import error
from twisted.python import usage
from twisted.trial import unittest

from car_twisted.tap import DEFAULT_LISTEN, Options, makeService
from tests.support import RPCClient


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

    def test_listen_is_repeatable(self):
        """Every --listen is kept, in order."""
        options = self.parse("--listen", "tcp:0", "--listen", "unix:/tmp/car.sock", "--data-dir", "d")
        self.assertEqual(options["listen"], ["tcp:0", "unix:/tmp/car.sock"])

    def test_data_dir_from_car_home(self):
        """The data dir defaults to $CAR_HOME."""
        self.patch(__import__("os").environ, "get", {"CAR_HOME": "/srv/car"}.get)
        self.assertEqual(self.parse()["data-dir"], "/srv/car")

    def test_bad_options_are_usage_errors(self):
        """Bad values are usage errors naming the option, not tracebacks."""
        for argv, needle in [
            (["--store", "nope"], "--store"),
            (["--listen", "bogus:1"], "--listen"),
            (["--grace", "-1"], "--grace"),
            (["--grace", "soon"], "could not convert"),
            (["--no-such-option"], "no-such-option"),
        ]:
            with self.subTest(argv=argv):
                error = self.assertRaises(usage.UsageError, self.parse, *argv)
                self.assertIn(needle, str(error))


class ServiceTests(unittest.TestCase):
    async def test_service_serves_and_stops(self):
        """The service listens on its endpoint, answers JSON-RPC, and stops
        listening when stopped."""
        options = Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--store", "memory", "--no-auth", "--data-dir", self.mktemp()])
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
