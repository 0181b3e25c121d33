"""``twistd car``: option parsing, the service it builds, the auth secrets
it makes at start, and what it logs."""

import gc
import os
import sys

import psycopg
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from car_twisted import __version__
from car_twisted.auth import SECRET_FILE, ensure_token
from car_twisted.limits import WireLimits
from car_twisted.store.postgresql import SCHEMA_VERSION, PostgresRunStore
from car_twisted.store.sqlite import DATABASE_NAME
from car_twisted.tap import (
    DEFAULT_HTTP,
    DEFAULT_LISTEN,
    FD_HEADROOM,
    Options,
    build_daemon,
    makeService,
    raise_open_file_limit,
)
from tests.daemon_process import SOURCE_ROOT, DaemonProcess, daemon_environment
from tests.postgres_server import fresh_database
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
            "--max-unsent-bytes", "1048576", "--auth-timeout", "2.5",
        )  # fmt: skip
        self.assertEqual(
            options["limits"],
            WireLimits(
                max_message_size=2097152, auto_ping_interval=10, auto_ping_timeout=25,
                open_handshake_timeout=3, close_handshake_timeout=1.5, max_connections=20000,
                max_batch=10, max_depth=16, max_in_flight=8, max_unsent_bytes=1048576,
                auth_timeout=2.5,
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

    def test_dsn_from_environment(self):
        """--store postgresql takes its DSN from $CAR_DATABASE_URL unless --dsn is given."""
        self.patch(os.environ, "get", {"CAR_DATABASE_URL": "dbname=runs"}.get)
        self.assertEqual(self.parse("--store", "postgresql")["dsn"], "dbname=runs")
        self.assertEqual(
            self.parse("--store", "postgresql", "--dsn", "dbname=other")["dsn"], "dbname=other"
        )

    def test_bad_options_are_one_line(self):
        """Bad values end the process (status 1) with one line naming the
        option, not a traceback or the whole help."""
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
            (["--store", "postgresql"], "--dsn"),
            (["--lease", "0"], "--lease"),
            (["--max-unsent-bytes", "1000"], "--max-unsent-bytes"),
            (["--auth-timeout", "0"], "--auth-timeout"),
        ]:
            with self.subTest(argv=argv):
                exit = self.assertRaises(SystemExit, self.parse, *argv)
                self.assertIsInstance(exit.code, str)
                self.assertEqual(len(exit.code.splitlines()), 1, exit.code)
                self.assertTrue(exit.code.startswith("car-twisted: "), exit.code)
                self.assertIn(needle, exit.code)


class OpenFileLimits:
    """A stand-in for the C{resource} module: one process's open-file limits."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard):
        self.limits = (soft, hard)

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        assert which == self.RLIMIT_NOFILE
        self.limits = limits


class OpenFileLimitTests(unittest.TestCase):
    def test_soft_limit_raised_to_what_max_connections_needs(self):
        """A soft limit below --max-connections plus the headroom is raised
        to exactly that, the hard limit unchanged, and nothing is logged."""
        limits = OpenFileLimits(1024, 524288)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(raise_open_file_limit(10_000, limits), 10_000 + FD_HEADROOM)
        self.assertEqual(limits.limits, (10_000 + FD_HEADROOM, 524288))
        self.assertEqual(events, [])

    def test_never_lowered_and_unlimited_left_alone(self):
        """A soft limit already high enough, or unlimited, is not changed."""
        for soft, hard in ((65536, 65536), (-1, -1)):
            limits = OpenFileLimits(soft, hard)
            self.assertEqual(raise_open_file_limit(10_000, limits), soft)
            self.assertEqual(limits.limits, (soft, hard))

    def test_hard_limit_too_low_is_reached_and_warned_about(self):
        """Below what is needed, the soft limit goes up to the hard one and
        a warning says connections past it fail in the kernel."""
        limits = OpenFileLimits(1024, 4096)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(raise_open_file_limit(10_000, limits), 4096)
        self.assertEqual(limits.limits, (4096, 4096))
        (text,) = [formatEvent(e) for e in events]
        self.assertIn("the open-file limit is 4096, below --max-connections 10000", text)


class ServiceTests(unittest.TestCase):
    async def test_service_serves_and_stops(self):
        """The service listens on its endpoint, answers JSON-RPC, and stops
        listening when stopped. Once it serves, the objects made at start-up
        are frozen out of garbage collection (twistd's daemon only)."""
        options = Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--http", "none", "--store", "memory", "--no-auth", "--data-dir", self.mktemp()])
        service = makeService(options)
        self.addCleanup(gc.unfreeze)
        service.startService()
        (listening,) = await service.ready
        port = listening.getHost().port
        ws = await RPCClient.connect(port)
        self.assertGreater(gc.get_freeze_count(), 0)
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
        service = build_daemon(options, reactor, environ or {})
        service.startService()
        self.addCleanup(service.stopService)
        (listening,) = await service.ready
        self.port = listening.getHost().port
        return service, [formatEvent(e) for e in events]

    async def test_auth_on_by_default(self):
        """By default the service makes the secrets in the data dir, logs
        where they are but never what they are, and refuses unauthenticated
        requests."""
        data_dir = os.path.join(private_dir(self), "car")
        service, logged = await self.start("--data-dir", data_dir)
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
        self.assertFalse(os.path.exists(data_dir))
        ws = await RPCClient.connect(self.port)
        listed = await ws.call("runs.list", {"agent_id": "agent-A"})
        self.assertEqual(listed["runs"], [])
        await ws.close()


class StartAttempt(ProcessProtocol):
    """A ``twistd -n car`` child: its stdout, its stderr and its exit code."""

    def __init__(self):
        self.out = self.err = b""
        self.ended = Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class StartFailureTests(unittest.TestCase):
    """
    A daemon that cannot start, run as a supervisor runs it (``twistd -n
    car`` in a child process): it exits with status 1 and one line on
    stderr saying why, and never hangs (a child still running after the
    bounded wait is killed and the test fails).
    """

    async def assert_cannot_start(self, needle, *argv, environ=None, listened=False):
        """
        C{listened}: the failure is a listener's, so the others may have
        listened (and closed again).
        """
        attempt = StartAttempt()
        command = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "car", "--http", "none", *argv,
        ]  # fmt: skip
        env = {**daemon_environment(), "CAR_AUTH_TOKEN": "", **(environ or {})}
        reactor.spawnProcess(attempt, command[0], command, env=env, path=SOURCE_ROOT)
        hung = reactor.callLater(60, attempt.transport.signalProcess, "KILL")
        code = await attempt.ended
        if not hung.active():
            self.fail(f"the daemon neither started nor exited: {attempt.out.decode()}")
        hung.cancel()
        lines = attempt.err.decode().splitlines()
        self.assertEqual((code, len(lines)), (1, 1), attempt.err.decode() + attempt.out.decode())
        self.assertTrue(lines[0].startswith("car-twisted"), lines)
        self.assertIn(needle, lines[0])
        if not listened:
            self.assertNotIn("listening on", attempt.out.decode())

    async def test_bad_option(self):
        """A bad option: one line, no help text, status 1."""
        await self.assert_cannot_start("--store", "--store", "nope")

    async def test_short_environment_secret(self):
        """A CAR_AUTH_TOKEN under 16 bytes is refused at start."""
        await self.assert_cannot_start(
            "$CAR_AUTH_TOKEN is 1 bytes", "--data-dir", private_dir(self), "--listen", "tcp:0",
            environ={"CAR_AUTH_TOKEN": "x"},
        )  # fmt: skip

    async def test_token_file_readable_by_others(self):
        """A token file others may read is refused at start."""
        data_dir = private_dir(self)
        path = os.path.join(data_dir, SECRET_FILE)
        ensure_token(path)
        os.chmod(path, 0o644)
        await self.assert_cannot_start("readable by other users", "--data-dir", data_dir, "--listen", "tcp:0")

    async def test_unusable_data_dir(self):
        """A data dir that cannot be made (a file is in its place: root
        ignores a read-only directory) is refused at start, by name."""
        path = os.path.join(private_dir(self), "not-a-directory")
        open(path, "w").close()
        await self.assert_cannot_start(path, "--no-auth", "--data-dir", path, "--listen", "tcp:0")

    async def test_damaged_database(self):
        """A SQLite store whose file is not a database is refused at start."""
        data_dir = private_dir(self)
        with open(os.path.join(data_dir, DATABASE_NAME), "wb") as f:
            f.write(b"not a database " * 1000)
        await self.assert_cannot_start(
            DATABASE_NAME, "--no-auth", "--store", "sqlite", "--data-dir", data_dir, "--listen", "tcp:0"
        )

    async def test_unreachable_postgresql(self):
        """A PostgreSQL database that cannot be reached is refused at start,
        named without its password."""
        dsn = psycopg.conninfo.make_conninfo(
            fresh_database(self), dbname="car_no_such_database", password="hunter2"
        )
        await self.assert_cannot_start(
            "car_no_such_database", "--no-auth", "--store", "postgresql", "--dsn", dsn,
            "--data-dir", private_dir(self), "--listen", "tcp:0",
        )  # fmt: skip

    async def test_newer_postgresql_schema(self):
        """A PostgreSQL database of a newer schema version is refused at start."""
        dsn = fresh_database(self)
        store = PostgresRunStore(reactor, dsn)
        await store.open()
        await store.close()
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("UPDATE car_schema SET version = version + 1")
        await self.assert_cannot_start(
            f"schema version {SCHEMA_VERSION + 1}, newer than", "--no-auth", "--store", "postgresql",
            "--dsn", dsn, "--data-dir", private_dir(self), "--listen", "tcp:0",
        )  # fmt: skip

    async def test_port_in_use(self):
        """A port another process listens on is refused at start."""
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        listen = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        await self.assert_cannot_start(
            f"cannot listen on {listen}", "--no-auth", "--store", "memory",
            "--data-dir", private_dir(self), "--listen", listen,
        )  # fmt: skip

    async def test_http_port_in_use(self):
        """An --http port another process listens on is refused at start."""
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        http = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        await self.assert_cannot_start(
            f"cannot listen on {http}", "--no-auth", "--store", "memory",
            "--data-dir", private_dir(self), "--listen", "tcp:0:interface=127.0.0.1", "--http", http,
            listened=True,
        )  # fmt: skip

    async def test_port_out_of_range(self):
        """A port number no socket can have is refused at start."""
        await self.assert_cannot_start(
            "cannot listen on tcp:99999", "--no-auth", "--store", "memory",
            "--data-dir", private_dir(self), "--listen", "tcp:99999",
        )  # fmt: skip

    async def test_second_daemon_on_one_data_dir(self):
        """A second daemon on a data dir a running daemon holds is refused
        at start; the first keeps running."""
        data_dir = private_dir(self)
        first = DaemonProcess("file", data_dir)
        self.addCleanup(first.kill)
        await first.start()
        await self.assert_cannot_start(
            "in use by another daemon", "--no-auth", "--data-dir", data_dir, "--listen", "tcp:0"
        )
        self.assertFalse(first.ended.called)
