"""
Writes the disk refuses: a failed write changes nothing, on disk or in
memory, the client is told the store cannot write (-32603, reason
``store_unavailable``), and the same request succeeds once the disk writes
again. The store-level tests inject the failure (a patched
C{disk.write_all}, a SQLite connection whose COMMIT fails); the
end-to-end test fills a real tmpfs.
"""

import errno
import os
import sqlite3
import subprocess

from twisted.internet import reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from car_twisted.errors import StoreUnavailable
from car_twisted.interfaces import StoreWriteFailed
from car_twisted.outcomes import as_deferred
from car_twisted.records import ended_record
from car_twisted.records import keyed_run_id
from car_twisted.runs import DEFAULT_GRACE
from car_twisted import disk
from car_twisted.store import naming
from car_twisted.store.file import FileRunStore
from car_twisted.store.sqlite import SQLiteRunStore
from tests.store_conformance import started, turn
from tests.support import SUCCESS_OUTCOME, InProcessDaemon, private_dir, serve, wait_for

NO_SPACE = os.strerror(errno.ENOSPC)


class FullDisk:
    """
    An injected full disk for the file store: the next C{failing} calls of
    C{disk.write_all} write half their bytes, then fail with ENOSPC (a
    short write, as a filling disk gives).
    """

    def __init__(self, testcase):
        self.failing = 0
        real_write_all = disk.write_all

        def write_all(fd, data):
            if not self.failing:
                return real_write_all(fd, data)
            self.failing -= 1
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, NO_SPACE)

        testcase.patch(disk, "write_all", write_all)


class FailingCommits:
    """
    An injected full disk for the SQLite store: the writer connection's
    next C{failing} COMMITs fail as SQLite's does when the disk is full.
    """

    def __init__(self, store):
        self.failing = 0
        self._connection = store._writer
        store._writer = self

    def execute(self, sql, *args):
        if self.failing and sql == "COMMIT":
            self.failing -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._connection.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._connection, name)


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


class FileStoreWriteFailureTests(unittest.TestCase):
    """The file store after a write the disk refused (injected ENOSPC)."""

    def setUp(self):
        self.data_dir = self.mktemp()
        self.disk = FullDisk(self)

    async def open(self):
        store = FileRunStore(reactor, self.data_dir)
        self.addCleanup(store.close)
        await store.open()
        return store

    async def test_failed_turn_write_leaves_file_and_count(self):
        """A turn write cut short by ENOSPC leaves the run file as it was
        and turn_count unchanged, so the next acknowledged turn takes the
        failed one's index and is read back whole, also after a restart."""
        store = await self.open()
        record = started()
        run_id = record["run_id"]
        await store.start_run(record)
        await store.append_turns(run_id, [turn("0"), turn("1")], 10)
        path = store._runs[run_id].path
        before = file_bytes(path)
        self.disk.failing = 1
        with self.assertRaises(StoreWriteFailed) as caught:
            await store.append_turns(run_id, [turn("lost")], 10)
        self.assertEqual(caught.exception.detail, NO_SPACE)
        self.assertEqual(file_bytes(path), before)
        self.assertEqual((await store.get_run(run_id)).turn_count, 2)
        self.assertEqual((await store.append_turns(run_id, [turn("2")], 10))[0]["index"], 2)
        await store.close()
        store = await self.open()
        records, _ = await store.read_records(run_id, 0, 10)
        self.assertEqual([r.get("prompt") for r in records], [None, "0", "1", "2"])
        self.assertEqual([r.get("index") for r in records[1:]], [0, 1, 2])
        self.assertEqual(store.corrupt_runs, set())

    async def test_writes_queued_behind_a_failed_one_fail_too(self):
        """Turns queued while a failed write was on disk were numbered after
        it: they fail with it, and the next turn takes the first failed
        index."""
        store = await self.open()
        record = started()
        run_id = record["run_id"]
        await store.start_run(record)
        self.disk.failing = 1
        on_disk = store.append_turns(run_id, [turn("a")], 10)
        queued = store.append_turns(run_id, [turn("b")], 10)
        for write in (on_disk, queued):
            with self.assertRaises(StoreWriteFailed):
                await write
        self.assertEqual((await store.append_turns(run_id, [turn("c")], 10))[0]["index"], 0)
        records, _ = await store.read_records(run_id, 0, 10)
        self.assertEqual([(r.get("prompt"), r.get("index")) for r in records[1:]], [("c", 0)])

    async def test_failed_end_leaves_the_run_open(self):
        """An end the disk refused leaves the run in_progress (summary and
        listing), so the retried end is written and survives a restart."""
        store = await self.open()
        record = started()
        run_id = record["run_id"]
        await store.start_run(record)
        ended = ended_record("outcome", outcome=SUCCESS_OUTCOME)
        self.disk.failing = 1
        with self.assertRaises(StoreWriteFailed):
            await store.end_run(run_id, ended)
        self.assertEqual((await store.get_run(run_id)).status, "in_progress")
        self.assertEqual(await store.list_runs("agent-a", None, 10, "completed"), ([], None))
        listed, _ = await store.list_runs("agent-a", None, 10, "in_progress")
        self.assertEqual([s.run_id for s in listed], [run_id])
        await store.end_run(run_id, ended)
        await store.close()
        store = await self.open()
        self.assertEqual((await store.get_run(run_id)).status, "completed")
        records, _ = await store.read_records(run_id, 0, 10)
        self.assertEqual([r["record"] for r in records], ["started", "ended"])

    async def test_failed_start_leaves_nothing_behind(self):
        """A start the disk refused removes the run file it created, so the
        retry with the same run id succeeds; a new agent's start leaves no
        empty index either."""
        store = await self.open()
        await store.start_run(started(agent_id="agent-a"))
        for agent_id in ("agent-a", "agent-new"):
            record = started(agent_id=agent_id)
            path = os.path.join(
                self.data_dir,
                "runs",
                naming.encode_name(agent_id),
                naming.encode_name(record["run_id"]) + naming.RUN_SUFFIX,
            )
            self.disk.failing = 1
            with self.assertRaises(StoreWriteFailed):
                await store.start_run(record)
            self.assertFalse(os.path.exists(path))
            self.assertIsNone(await store.get_run(record["run_id"]))
            await store.start_run(record)
            self.assertEqual((await store.get_run(record["run_id"])).agent_id, agent_id)
        await store.close()
        store = await self.open()
        listed, _ = await store.list_runs("agent-new", None, 10, None)
        self.assertEqual(len(listed), 1)
        self.assertEqual(store.corrupt_runs, set())


    async def test_failed_journal_append_changes_nothing(self):
        """A journal append cut short by ENOSPC fails its writes with
        StoreWriteFailed and cuts the journal and the run files back (a
        start's new file is removed), so the retries succeed and a restart
        serves exactly the acknowledged records."""
        store = await self.open()
        record = started()
        run_id = record["run_id"]
        await store.start_run(record)
        path = store._runs[run_id].path
        journal_path = store._journal.current.path
        before, journal_before = file_bytes(path), file_bytes(journal_path)
        real_write_at = disk.write_at
        failing = []

        def write_at(fd, data, offset):
            if failing:
                failing.pop()
                os.pwrite(fd, data[: len(data) // 2], offset)
                raise OSError(errno.ENOSPC, NO_SPACE)
            return real_write_at(fd, data, offset)

        self.patch(disk, "write_at", write_at)
        failing.append(True)
        with self.assertRaises(StoreWriteFailed) as caught:
            await store.append_turns(run_id, [turn("lost")], 10)
        self.assertEqual(caught.exception.detail, NO_SPACE)
        self.assertEqual((file_bytes(path), file_bytes(journal_path)), (before, journal_before))
        other = started()
        failing.append(True)
        with self.assertRaises(StoreWriteFailed):
            await store.start_run(other)
        self.assertFalse(os.path.exists(store._runs[run_id].path.replace(
            naming.encode_name(run_id), naming.encode_name(other["run_id"]))))
        self.assertEqual(file_bytes(journal_path), journal_before)
        self.assertEqual((await store.append_turns(run_id, [turn("kept")], 10))[0]["index"], 0)
        await store.start_run(other)
        await store.close()
        store = await self.open()
        records, _ = await store.read_records(run_id, 0, 10)
        self.assertEqual([r.get("prompt") for r in records], [None, "kept"])
        self.assertEqual((await store.get_run(other["run_id"])).status, "in_progress")


class RunServiceWriteFailureTests(unittest.TestCase):
    """The run service answering requests whose writes the disk refused."""

    async def file_daemon(self):
        disk = FullDisk(self)
        store = FileRunStore(reactor, self.mktemp())
        self.addCleanup(store.close)
        await store.open()
        daemon = InProcessDaemon(store)
        self.clock = daemon.clock
        return daemon, disk

    def session(self, daemon, agent_id="agent-a"):
        session = daemon.runs.open_session("peer", lambda *args: None)
        session.agent_id = agent_id
        return session

    def assertStoreUnavailable(self, error: StoreUnavailable, detail: str):
        self.assertEqual(error.code, -32603)
        self.assertEqual(error.data, {"reason": "store_unavailable", "detail": detail})

    async def test_failed_start_can_be_retried_with_its_key(self):
        """A start the disk refused answers store_unavailable and keeps its
        idempotency key free: the retry starts the run."""
        daemon, disk = await self.file_daemon()
        session = self.session(daemon)
        await as_deferred(daemon.runs.start(session, {"intent": "the agent's first run"}))
        params = {"intent": "do it", "idempotency_key": "key-1"}
        disk.failing = 1
        with self.assertRaises(StoreUnavailable) as caught:
            await as_deferred(daemon.runs.start(session, params))
        self.assertStoreUnavailable(caught.exception, NO_SPACE)
        run_id = keyed_run_id("agent-a", "key-1")
        self.assertEqual(await as_deferred(daemon.runs.start(session, params)), {"run_id": run_id, "agent_id": "agent-a"})
        self.assertEqual((await daemon.store.get_run(run_id)).status, "in_progress")

    async def check_failed_complete_is_retried(self, daemon, fail_next, detail):
        session = self.session(daemon)
        run_id = (await as_deferred(daemon.runs.start(session, {"intent": "do it"})))["run_id"]
        await as_deferred(daemon.runs.record_turns(session, {"run_id": run_id, "turns": [{"prompt": "p"}]}))
        params = {"run_id": run_id, "outcome": SUCCESS_OUTCOME}
        fail_next()
        with self.assertRaises(StoreUnavailable) as caught:
            await as_deferred(daemon.runs.complete(session, params))
        self.assertStoreUnavailable(caught.exception, detail)
        listed = await as_deferred(daemon.parts.reader.list_runs(session, {"agent_id": "agent-a"}))
        self.assertEqual([r["status"] for r in listed["runs"]], ["in_progress"])
        self.assertEqual(session.producing, {run_id})
        self.assertEqual(await as_deferred(daemon.runs.complete(session, params)), {"ok": True, "run_id": run_id})
        trace = await as_deferred(daemon.parts.reader.get_trace(session, {"run_id": run_id}))
        self.assertEqual([r["record"] for r in trace["records"]], ["started", "turn", "ended"])
        listed = await as_deferred(daemon.parts.reader.list_runs(session, {"agent_id": "agent-a"}))
        self.assertEqual([r["status"] for r in listed["runs"]], ["completed"])

    async def test_failed_complete_file_store(self):
        """A runs.complete the file store could not write answers
        store_unavailable and leaves the run live and in_progress, so the
        retry completes it."""
        daemon, disk = await self.file_daemon()
        await self.check_failed_complete_is_retried(
            daemon, lambda: setattr(disk, "failing", 1), NO_SPACE
        )

    async def test_failed_complete_sqlite_store(self):
        """The same on the SQLite store, whose COMMIT fails (injected)."""
        store = SQLiteRunStore(private_dir(self), reactor)
        self.addCleanup(store.close)
        await store.open()
        commits = FailingCommits(store)
        await self.check_failed_complete_is_retried(
            InProcessDaemon(store),
            lambda: setattr(commits, "failing", 1),
            "database or disk is full",
        )

    async def test_grace_end_is_retried_until_written(self):
        """A run whose grace window ends while the disk is full stays open,
        and is ended incomplete after another window once the disk writes."""
        daemon, disk = await self.file_daemon()
        session = self.session(daemon)
        run_id = (await as_deferred(daemon.runs.start(session, {"intent": "do it"})))["run_id"]
        daemon.runs.close_session(session)
        disk.failing = 1
        self.clock.advance(DEFAULT_GRACE)
        await wait_for(lambda: not daemon.runs._writes, "the refused end")
        self.assertEqual((await daemon.runs.store.get_run(run_id)).status, "in_progress")
        self.clock.advance(DEFAULT_GRACE)
        await wait_for(lambda: not daemon.runs._writes, "the end")
        self.assertEqual((await daemon.runs.store.get_run(run_id)).status, "incomplete")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_failure_logged_once_per_incident(self):
        """Requests refused by one disk-full incident log one error between
        them; a success ends the incident, and the next failure logs again."""
        daemon, disk = await self.file_daemon()
        errors = []

        def observe(event):
            if event.get("log_namespace") == "car_twisted.runs" and event["log_level"] == LogLevel.error:
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        session = self.session(daemon)
        run_id = (await as_deferred(daemon.runs.start(session, {"intent": "do it"})))["run_id"]
        params = {"run_id": run_id, "turns": [{"prompt": "p"}]}
        disk.failing = 3
        for _ in range(3):
            with self.assertRaises(StoreUnavailable):
                await as_deferred(daemon.runs.record_turns(session, params))
        self.assertEqual(len(errors), 1)
        self.assertEqual((await as_deferred(daemon.runs.record_turns(session, params)))["base_index"], 0)
        disk.failing = 1
        with self.assertRaises(StoreUnavailable):
            await as_deferred(daemon.runs.record_turns(session, params))
        self.assertEqual(len(errors), 2)


def mount_small_tmpfs(testcase) -> str:
    """A 1 MiB tmpfs, unmounted when C{testcase} ends; skips the test when
    it cannot be mounted (mounting needs root)."""
    path = private_dir(testcase)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", path],
            capture_output=True,
            text=True,
        )
    except OSError as e:
        raise unittest.SkipTest(f"cannot mount a tmpfs: {e}")
    if mounted.returncode != 0:
        raise unittest.SkipTest(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    testcase.addCleanup(subprocess.run, ["umount", path], check=True)
    return path


def fill_up(directory: str) -> str:
    """Write a file until the filesystem is full: its path."""
    filler = os.path.join(directory, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


class FullTmpfsTests(unittest.TestCase):
    """The daemon over real sockets, its file store on a real full tmpfs
    (mounted by the test, so it runs as root; skipped, saying so, when the
    mount is refused)."""

    async def test_disk_full_answers_store_unavailable_and_recovers(self):
        """With the disk full, runs.record_turns and runs.complete answer
        -32603 with data.reason store_unavailable; once space returns, the
        same requests succeed, the trace is whole and numbered without a
        gap, and a follower sees the retried turn and the end."""
        disk = mount_small_tmpfs(self)
        store = FileRunStore(reactor, os.path.join(disk, "data"))
        self.addCleanup(store.close)
        await store.open()
        daemon = await serve(self, store=store)
        producer, follower = await daemon.connect(), await daemon.connect()
        run_id = (await producer.call("runs.start", {"intent": "fill", "agent_id": "agent-a"}))["run_id"]
        turns = {"run_id": run_id, "turns": [{"prompt": "0"}, {"prompt": "1"}]}
        await producer.call("runs.record_turns", turns)
        await follower.call("runs.subscribe", {"run_id": run_id})
        filler = fill_up(disk)
        # Larger than a page: they need space a full tmpfs does not have.
        big_turn = {"run_id": run_id, "turns": [{"prompt": "2", "output": "x" * 12000}]}
        complete = {"run_id": run_id, "outcome": dict(SUCCESS_OUTCOME, summary="y" * 12000)}
        for method, params in [("runs.record_turns", big_turn), ("runs.complete", complete)]:
            error = (await producer.call_raw(method, params))["error"]
            self.assertEqual(error["code"], -32603)
            self.assertEqual(error["data"], {"reason": "store_unavailable", "detail": NO_SPACE})
        os.unlink(filler)
        self.assertEqual((await producer.call("runs.record_turns", big_turn))["base_index"], 2)
        await producer.call("runs.complete", complete)
        trace = await producer.call("runs.get_trace", {"run_id": run_id})
        self.assertEqual(
            [(r["record"], r.get("index")) for r in trace["records"]],
            [("started", None), ("turn", 0), ("turn", 1), ("turn", 2), ("ended", None)],
        )
        events = [(await follower.receive())["params"] for _ in range(2)]
        self.assertEqual(
            [(e["record"]["record"], e["status"]) for e in events],
            [("turn", "in_progress"), ("ended", "completed")],
        )
