"""
Retention: background passes (--retain-days) and runs.prune on every store,
the ``runs prune`` command, and a SIGKILL in the middle of a prune on the
real daemon leaving every run whole or gone.
"""

import io
import os
import sqlite3
import threading
import time

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial import unittest

from car_twisted.access import AccessPolicy
from car_twisted.cli import parser, run
from car_twisted.interfaces import RunNotFound
from car_twisted.records import ended_record, started_record
from car_twisted.retention import Retention, ended_before
from car_twisted.store import index, naming, runfiles
from car_twisted.store.file import FileRunStore
from car_twisted.store.memory import MemoryRunStore
from car_twisted.store.sqlite import DATABASE_NAME, SQLiteRunStore
from car_twisted.tap import Options
from tests.daemon_process import DaemonProcess
from tests.support import AuthDaemon, private_dir, wait_for

LONG_AGO = "2020-01-01T00:00:00.000Z"


async def add_run(store, agent_id="agent-a", ended_at=None, ends=True, turns=1):
    """A run with C{turns} turns, ended at C{ended_at} (None: now) if C{ends}."""
    record = started_record(None, agent_id, "c", "goal", None)
    record["run_id"] = f"{agent_id}-{os.urandom(6).hex()}"
    await store.start_run(record)
    if turns:
        await store.append_turns(
            record["run_id"], [{"record": "turn", "tool": "t", "recorded_at": record["started_at"]}] * turns, 10
        )
    if ends:
        ended = ended_record("incomplete", reason="x")
        if ended_at is not None:
            ended["ended_at"] = ended_at
        await store.end_run(record["run_id"], ended)
    return record["run_id"]


async def pump(clock, d):
    """Wait for C{d}, moving the Clock past the yields between batches."""
    await wait_for(lambda: clock.advance(0) or d.called, "the prune to finish")
    return await d


async def opened(store):
    """C{store}, open."""
    await store.open()
    return store


class RetentionMixin:
    async def store(self):
        store = await opened(self.make_store())
        self.addCleanup(store.close)
        return store

    async def test_background_passes(self):
        """With days set, a pass runs at start and then every interval, in
        batches: old ended runs go, open and recent runs stay."""
        store = await self.store()
        old = [await add_run(store, ended_at=LONG_AGO) for _ in range(5)]
        old_open = await add_run(store, ends=False)
        recent = await add_run(store)
        clock = Clock()
        clock.advance(time.time())
        retention = Retention(store, clock, AccessPolicy(False), days=30, batch=2, interval=3600)
        retention.startService()
        await wait_for(lambda: clock.advance(0) or not retention._passes, "the first pass")
        for run_id in old:
            self.assertIsNone(await store.get_run(run_id))
        self.assertEqual((await store.get_run(old_open)).status, "in_progress")
        self.assertEqual((await store.get_run(recent)).status, "incomplete")
        later = await add_run(store, ended_at=LONG_AGO)
        clock.advance(3600)
        await wait_for(lambda: clock.advance(0) or not retention._passes, "the second pass")
        self.assertIsNone(await store.get_run(later))
        await retention.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_prune_counts_and_keeps_the_cut(self):
        """prune(days) deletes exactly the runs ended before now - days."""
        store = await self.store()
        clock = Clock()
        clock.advance(time.time())
        cut = ended_before(clock.seconds(), 10)
        older = await add_run(store, ended_at=ended_before(clock.seconds(), 10.5))
        younger = await add_run(store, ended_at=ended_before(clock.seconds(), 9.5))
        retention = Retention(store, clock, AccessPolicy(False), batch=1)
        self.assertEqual(await store.count_prunable(cut), 1)
        self.assertEqual(await pump(clock, retention.prune(10)), 1)
        self.assertIsNone(await store.get_run(older))
        self.assertIsNotNone(await store.get_run(younger))


class MemoryRetentionTests(RetentionMixin, unittest.TestCase):
    def make_store(self):
        return MemoryRunStore()


class FileRetentionTests(RetentionMixin, unittest.TestCase):
    def make_store(self):
        return FileRunStore(reactor, self.mktemp())

    async def test_pruned_runs_stay_pruned_after_restart(self):
        """The index notes the drops: a restart serves neither the runs nor
        a rebuilt index, and the files are gone."""
        data_dir = self.mktemp()
        store = await opened(FileRunStore(reactor, data_dir))
        old = await add_run(store, ended_at=LONG_AGO)
        kept = await add_run(store)
        await store.prune_runs("2021-01-01T00:00:00.000Z", 10)
        await store.close()
        agent_dir = os.path.join(data_dir, "runs", "agent-a")
        self.assertEqual(
            sorted(os.listdir(agent_dir)), [".index", naming.encode_name(kept) + ".jsonl"]
        )
        self.assertEqual(index.read_index(agent_dir)[1], [kept])
        store = await opened(FileRunStore(reactor, data_dir))
        self.addCleanup(store.close)
        self.assertIsNone(await store.get_run(old))
        page, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual([s.run_id for s in page], [kept])
        page, _ = await store.list_runs(None, None, 10, None)
        self.assertEqual([s.run_id for s in page], [kept])

    async def test_read_racing_a_prune_is_not_found(self):
        """A read of a run whose file is pruned while the read waits for the
        disk answers RunNotFound, as a read after the prune does."""
        store = await self.store()
        old = await add_run(store, ended_at=LONG_AGO)
        gate = threading.Event()
        scan_records = runfiles.scan_records

        def held_scan(path, *args):
            gate.wait(10)
            return scan_records(path, *args)

        self.patch(runfiles, "scan_records", held_scan)
        read = store.read_records(old, 0, 10)
        await store.prune_runs("2021-01-01T00:00:00.000Z", 10)
        gate.set()
        with self.assertRaises(RunNotFound):
            await read


    async def test_pruned_run_leaves_the_offset_cache(self):
        """A run read before it is pruned keeps no record offsets after."""
        store = await self.store()
        old = await add_run(store, ended_at=LONG_AGO)
        await store.read_records(old, 0, 10)
        self.assertIn(old, store._offsets)
        await store.prune_runs("2021-01-01T00:00:00.000Z", 10)
        self.assertNotIn(old, store._offsets)


class SQLiteRetentionTests(RetentionMixin, unittest.TestCase):
    def make_store(self):
        return SQLiteRunStore(self.mktemp(), reactor)


class PruneMethodTests(unittest.TestCase):
    async def serve(self):
        auth = await AuthDaemon.serve(self)
        auth.daemon.clock.advance(time.time())  # the daemon's retention tells the time by it
        store = auth.daemon.store
        self.old = [await add_run(store, ended_at=LONG_AGO) for _ in range(3)]
        self.kept = await add_run(store, ended_at=ended_before(time.time(), 1))
        return auth

    async def test_host_prunes_and_dry_runs(self):
        """The host counts with dry_run (nothing deleted), then prunes."""
        auth = await self.serve()
        host = await auth.host()
        counted = await host.call("runs.prune", {"older_than_days": 30, "dry_run": True})
        self.assertEqual((counted["prunable"], counted["dry_run"]), (3, True))
        self.assertIsNotNone(await auth.daemon.store.get_run(self.old[0]))
        pruned = await host.call("runs.prune", {"older_than_days": 30})
        self.assertEqual(pruned["pruned"], 3)
        self.assertEqual(pruned["ended_before"], pruned["ended_before"][:23] + "Z")
        for run_id in self.old:
            trace = await host.call("runs.get_trace", {"run_id": run_id})
            self.assertTrue(trace["not_found"])
        self.assertIsNotNone(await auth.daemon.store.get_run(self.kept))

    async def test_agents_may_not_prune_and_bad_params(self):
        """An agent session is refused; bad ages are -32602; nothing changes."""
        auth = await self.serve()
        agent = await auth.agent("agent-a")
        refused = await agent.call_raw("runs.prune", {"older_than_days": 30})
        self.assertIn("host", refused["error"]["message"])
        host = await auth.host()
        for params in ({}, {"older_than_days": 0}, {"older_than_days": "30"},
                       {"older_than_days": 30, "dry_run": "yes"}):  # fmt: skip
            answer = await host.call_raw("runs.prune", params)
            self.assertEqual(answer["error"]["code"], -32602, params)
        self.assertEqual(await auth.daemon.store.count_prunable("2021-01-01T00:00:00.000Z"), 3)

    async def test_command(self):
        """car-twisted runs prune --older-than DAYS [--dry-run] as the host."""
        auth = await self.serve()

        async def command(*argv):
            args = parser().parse_args(["runs", "prune", *argv, "--url", auth.daemon.url, "--data-dir", auth.data_dir])
            out, err = io.StringIO(), io.StringIO()
            status = await run(reactor, args, {}, out, err)
            return status, out.getvalue(), err.getvalue()

        status, out, err = await command("--older-than", "30", "--dry-run")
        self.assertEqual((status, err), (0, ""))
        self.assertRegex(out, r"^3 runs ended before \S+Z would be pruned\n$")
        status, out, err = await command("--older-than", "30")
        self.assertEqual((status, err), (0, ""))
        self.assertRegex(out, r"^pruned 3 runs ended before \S+Z\n$")
        self.assertEqual((await command("--older-than", "30"))[1][:8], "pruned 0")


#: Old ended runs in the store before the daemon that prunes them starts.
OLD_RUNS = 3000


class KilledPrune:
    """
    SIGKILL the real daemon while its first retention pass is deleting old
    runs; after a restart every run is whole (all its records, the same
    summary) or gone from every read, and open and recent runs are whole.
    """

    async def fill(self, data_dir):
        store = await opened(self.open_store(data_dir))
        try:
            old = await gatherResults(
                [ensureDeferred(add_run(store, f"agent-{n % 3}", LONG_AGO)) for n in range(OLD_RUNS)]
            )
            kept = [await add_run(store, ends=False), await add_run(store)]
            expected = {}
            for run_id in old + kept:
                expected[run_id] = (await store.get_run(run_id), (await store.read_records(run_id, 0, 10))[0])
        finally:
            await store.close()
        return old, kept, expected

    async def test_sigkill_mid_prune(self):
        """Every run is whole or gone after a SIGKILL in the middle of a prune."""
        data_dir = private_dir(self)
        old, kept, expected = await self.fill(data_dir)
        daemon = DaemonProcess(self.store, data_dir, "--retain-days", "30")
        await daemon.start()
        await wait_for(lambda: 0 < self.remaining(data_dir) < OLD_RUNS, "the prune to start", 60)
        await daemon.kill("KILL")

        store = await opened(self.open_store(data_dir))
        self.addCleanup(store.close)
        gone = 0
        for run_id, (summary, records) in expected.items():
            now = await store.get_run(run_id)
            if now is None:
                gone += 1
                with self.assertRaises(RunNotFound):
                    await store.read_records(run_id, 0, 10)
            else:
                self.assertEqual(now.turn_count, summary.turn_count)
                now_records = (await store.read_records(run_id, 0, 10))[0]
                if run_id == kept[0]:  # the open run: the restart ended it
                    self.assertEqual(now_records[-1]["reason"], "daemon restarted")
                    now_records = now_records[:-1]
                self.assertEqual(now_records, records)
        self.assertTrue(0 < gone < OLD_RUNS, f"the kill landed mid-prune ({gone} gone)")
        listed = set()
        for agent in ("agent-0", "agent-1", "agent-2", "agent-a"):
            page, _ = await store.list_runs(agent, None, 5000, None)
            listed |= {s.run_id for s in page}
        self.assertLessEqual(listed, set(expected))
        self.assertEqual(len(listed), len(expected) - gone)
        everyone, _ = await store.list_runs(None, None, 5000, None)
        self.assertEqual({s.run_id for s in everyone}, listed)
        for run_id in kept:
            self.assertIn(run_id, listed)


class FileKilledPruneTests(KilledPrune, unittest.TestCase):
    store = "file"

    def open_store(self, data_dir):
        return FileRunStore(reactor, data_dir, "none")

    def remaining(self, data_dir):
        runs = os.path.join(data_dir, "runs")
        return sum(
            len([n for n in os.listdir(os.path.join(runs, a)) if n.endswith(".jsonl")])
            for a in ("agent-0", "agent-1", "agent-2")
        )


class SQLiteKilledPruneTests(KilledPrune, unittest.TestCase):
    store = "sqlite"

    def open_store(self, data_dir):
        return SQLiteRunStore(data_dir, reactor)

    def remaining(self, data_dir):
        db = sqlite3.connect(f"file:{os.path.join(data_dir, DATABASE_NAME)}?mode=ro", uri=True)
        try:
            return db.execute("SELECT count(*) FROM runs WHERE agent_id != ?", (b"agent-a",)).fetchone()[0]
        finally:
            db.close()


class OptionTests(unittest.TestCase):
    def test_retain_days(self):
        """--retain-days is off by default and at least 1 day when given: else
        the daemon exits with one line."""
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options["retain-days"])
        options = Options()
        options.parseOptions(["--retain-days", "30"])
        self.assertEqual(options["retain-days"], 30)
        for bad in ("0", "-1", "soon"):
            with self.assertRaises(SystemExit) as raised:
                Options().parseOptions(["--retain-days", bad])
            self.assertTrue(raised.exception.code.startswith("car-twisted: "))
