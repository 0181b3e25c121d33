"""
Crash safety of a store, on the real daemon process: SIGKILL in the middle
of a stream of acknowledged starts and turns, restart on the same data
directory, and every acknowledged run is there with its acknowledged
turns, none written twice, the open ones ended incomplete.

The scenario is a mixin over the store's ``--store`` name, so every
durable store runs it: subclass L{CrashRecovery} and set C{store}.
"""

import os
import random

from twisted.internet.defer import Deferred, gatherResults, race
from twisted.trial import unittest

from car_twisted.store import journal
from tests.daemon_process import DaemonProcess
from tests.postgres_server import fresh_database
from tests.support import SUCCESS_OUTCOME, RPCClient

CLIENTS = 5
#: Acknowledged starts to see (across clients) before the kill.
STARTS_BEFORE_KILL = 120


class Stream:
    """One client starting runs back to back (recording a turn in every
    other, completing every third) until its connection dies, noting what
    the daemon acknowledged."""

    def __init__(self, client: RPCClient, agent_id: str):
        self.client = client
        self.agent_id = agent_id
        self.started = []
        self.turned = set()
        self.completed = set()

    async def _call(self, method, params):
        """The result, or None once the connection is gone."""
        self.client.request(method, params)
        index, response = await race([self.client.receive(), self._closed()])
        if index == 1:
            return None
        assert "error" not in response, response
        return response["result"]

    def _closed(self):
        """A Deferred firing when the connection is gone (cancelling it is harmless)."""
        d = Deferred()
        self.client.protocol.closed.addBoth(lambda result: (d.called or d.callback(None), result)[1])
        return d

    async def run(self, progress):
        while True:
            result = await self._call("runs.start", {"agent_id": self.agent_id, "intent": "crash me"})
            if result is None:
                return
            run_id = result["run_id"]
            self.started.append(run_id)
            progress()
            if len(self.started) % 2 == 0:
                turns = {"run_id": run_id, "turns": [{"prompt": "crash"}]}
                if await self._call("runs.record_turns", turns) is None:
                    return
                self.turned.add(run_id)
            if len(self.started) % 3 == 0:
                result = await self._call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
                if result is None:
                    return
                self.completed.add(run_id)


async def signal_mid_stream(daemon, agent_ids, after, signal_name):
    """
    Stream starts from one client per agent id and send the daemon
    C{signal_name} once C{after} starts were acknowledged; fire with the
    streams when every connection has ended and the daemon with it.
    """
    streams = [Stream(await RPCClient.connect(daemon.port), agent_id) for agent_id in agent_ids]
    acknowledged = 0

    def progress():
        nonlocal acknowledged
        acknowledged += 1
        if acknowledged == after:
            daemon.kill(signal_name)

    await gatherResults([Deferred.fromCoroutine(s.run(progress)) for s in streams])
    await daemon.ended
    return streams


class CrashRecovery:
    #: The --store name under test, and more options for its daemon.
    store = None
    options = ()
    #: Acknowledged starts before the kill: a fixed number, or a range to pick from.
    kill_after = STARTS_BEFORE_KILL

    async def start_daemon(self, data_dir):
        daemon = DaemonProcess(self.store, data_dir, *self.options)
        self.addCleanup(daemon.kill)
        await daemon.start()
        return daemon

    def after_kill(self, data_dir: str) -> None:
        """What else the crash did to the data directory."""

    async def test_acknowledged_runs_survive_sigkill(self):
        """After SIGKILL mid-stream and a restart, every acknowledged start
        is listed and readable with its acknowledged turn, no record is
        there twice, acknowledged completions kept their outcome, and no
        run is left open: the others ended incomplete with reason "daemon
        restarted"."""
        data_dir = os.path.abspath(self.mktemp())
        daemon = await self.start_daemon(data_dir)
        agents = [f"crash-agent-{n % 2}" for n in range(CLIENTS)]
        after = self.kill_after if isinstance(self.kill_after, int) else random.randint(*self.kill_after)
        streams = await signal_mid_stream(daemon, agents, after, "KILL")
        self.after_kill(data_dir)

        daemon = await self.start_daemon(data_dir)
        reader = await RPCClient.connect(daemon.port)
        self.addCleanup(reader.close)
        listed = {}
        for agent_id in {s.agent_id for s in streams}:
            cursor = None
            while True:
                page = await reader.call(
                    "runs.list", {"agent_id": agent_id, "limit": 50, "cursor": cursor}
                )
                listed.update((r["run_id"], r) for r in page["runs"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
        self.assertEqual([r for r in listed.values() if r["status"] == "in_progress"], [])
        acknowledged_runs = [run_id for s in streams for run_id in s.started]
        self.assertGreaterEqual(len(acknowledged_runs), after)
        for stream in streams:
            for run_id in stream.started:
                self.assertIn(run_id, listed)
                self.assertEqual(listed[run_id]["agent_id"], stream.agent_id)
                trace = await reader.call("runs.get_trace", {"run_id": run_id})
                kinds = [(r["record"], r.get("index")) for r in trace["records"]]
                self.assertIn(kinds, [[("started", None), ("ended", None)], [("started", None), ("turn", 0), ("ended", None)]], f"killed after {after} starts")
                if run_id in stream.turned:
                    self.assertEqual(kinds[1], ("turn", 0))
                ended = trace["records"][-1]
                if run_id in stream.completed:
                    self.assertEqual(ended["termination"], "outcome")
                elif ended["termination"] != "outcome":
                    self.assertEqual(
                        (ended["termination"], ended["reason"]), ("incomplete", "daemon restarted")
                    )
        self.assertTrue(
            any(r["status"] == "incomplete" for r in listed.values()),
            "the kill left no open run to recover",
        )
        await reader.close()
        await daemon.kill("TERM")


class FileStoreCrashTests(CrashRecovery, unittest.TestCase):
    store = "file"


class FileStoreCheckpointCrashTests(CrashRecovery, unittest.TestCase):
    """The file store killed at a random point while its journal is
    checkpointed again and again (a new journal every 4 KiB)."""

    store = "file"
    options = ("--journal-bytes", "4096")
    kill_after = (20, 200)

    def after_kill(self, data_dir: str) -> None:
        """
        As if the machine had lost power too: every run file the journals
        left name loses the records they hold (what no checkpoint synced
        yet), so only replay can bring the acknowledged ones back.
        """
        runs = os.path.join(data_dir, "runs")
        synced = {}  # run file -> records a checkpoint made durable
        for name in sorted(os.listdir(runs)):
            if name.startswith(journal.PREFIX):
                with open(os.path.join(runs, name), "rb") as f:
                    for path, position, _ in journal.read_frames(f.read())[0]:
                        synced[path] = min(position, synced.get(path, position))
        self.assertNotEqual(synced, {}, "the kill left no journal to replay")
        for path, records in synced.items():
            path = os.path.join(runs, path)
            with open(path, "rb") as f:
                kept = b"".join(f.readlines()[:records])
            if kept:
                os.truncate(path, len(kept))
            else:
                os.unlink(path)


class SQLiteStoreCrashTests(CrashRecovery, unittest.TestCase):
    store = "sqlite"


class PostgresStoreCrashTests(CrashRecovery, unittest.TestCase):
    store = "postgresql"

    async def start_daemon(self, data_dir):
        if not hasattr(self, "dsn"):
            self.dsn = fresh_database(self)
        daemon = DaemonProcess(self.store, data_dir, "--dsn", self.dsn)
        self.addCleanup(daemon.kill)
        await daemon.start()
        return daemon
