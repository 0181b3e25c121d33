"""The SQLite store: the IRunStore conformance suite, then what is its own."""

import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from car_twisted.interfaces import (
    RunExists,
    RunNotFound,
    RunTerminal,
    StoreWriteFailed,
    TurnLimitReached,
)
from car_twisted.records import ended_record
from car_twisted.store import sqlite as sqlite_store
from car_twisted.store.sqlite import RunDatabaseError, SQLiteRunStore
from tests.daemon_process import DaemonProcess
from tests.store_conformance import RunStoreConformance, started, turn
from tests.support import SUCCESS_OUTCOME, RPCClient, wait_for


def fresh_data_dir(case: unittest.TestCase) -> str:
    """A data dir path that does not exist yet, removed after the test."""
    parent = tempfile.mkdtemp(prefix="car-sqlite-test-")
    case.addCleanup(shutil.rmtree, parent)
    return os.path.join(parent, "data")


class SQLiteRunStoreConformanceTests(RunStoreConformance, unittest.TestCase):
    def make_store(self):
        store = SQLiteRunStore(fresh_data_dir(self), reactor)
        self.addCleanup(store.close)
        return store


def first_index(outcome):
    """An append's outcome as the index of its first record; others as they are."""
    return outcome[0]["index"] if isinstance(outcome, list) else outcome


def store_threads():
    """The running threads of SQLite stores: the writer and the reader pool."""
    return {t for t in threading.enumerate() if "car-sqlite-" in t.name}


class SQLiteRunStoreTests(unittest.TestCase):
    def setUp(self):
        self.data_dir = fresh_data_dir(self)
        self.path = os.path.join(self.data_dir, "runs.sqlite3")

    def open(self):
        """An open store on the test's data dir, closed after the test."""
        store = SQLiteRunStore(self.data_dir, reactor)
        self.addCleanup(store.close)
        self.successResultOf(store.open())
        return store

    async def test_reopen_serves_reads(self):
        """A store reopened on the same data dir serves every record, summary,
        listing and open run the first one acknowledged."""
        store = self.open()
        finished, still_open = started(intent="finished"), started(intent="open")
        await store.start_run(finished)
        await store.append_turns(finished["run_id"], [turn("1"), turn("2")], 10)
        outcome = {"status": "give_up", "summary": "", "evidence": [], "metrics": {}, "timestamp": "t"}
        await store.end_run(finished["run_id"], ended_record("outcome", outcome=outcome))
        await store.start_run(still_open)
        before = await store.read_records(finished["run_id"], 0, 10)
        await store.close()

        store = self.open()
        self.assertEqual(await store.read_records(finished["run_id"], 0, 10), before)
        summary = await store.get_run(finished["run_id"])
        self.assertEqual(
            (summary.status, summary.outcome_status, summary.turn_count),
            ("completed", "give_up", 2),
        )
        page, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual([s.intent for s in page], ["open", "finished"])
        self.assertEqual([s.run_id for s in await store.open_runs()], [still_open["run_id"]])

    async def test_newer_schema_refused(self):
        """A database written by a newer schema version is refused with a
        message naming the file and both versions, and left untouched."""
        await self.open().close()
        with sqlite3.connect(self.path) as db:
            db.execute(f"PRAGMA user_version = {sqlite_store.SCHEMA_VERSION + 1}")
        caught = self.failureResultOf(SQLiteRunStore(self.data_dir, reactor).open(), RunDatabaseError)
        message = caught.getErrorMessage()
        self.assertIn(self.path, message)
        self.assertIn(f"schema version {sqlite_store.SCHEMA_VERSION + 1}", message)
        with sqlite3.connect(self.path) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
        self.assertEqual(version, sqlite_store.SCHEMA_VERSION + 1)

    def test_garbage_file_refused(self):
        """A file that is not an SQLite database is a clear error naming it,
        and is left as it was (never replaced by an empty store)."""
        os.makedirs(self.data_dir)
        garbage = b"these are not the runs you are looking for\n" * 200
        with open(self.path, "wb") as f:
            f.write(garbage)
        caught = self.failureResultOf(SQLiteRunStore(self.data_dir, reactor).open(), RunDatabaseError)
        self.assertIn(self.path, caught.getErrorMessage())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), garbage)

    def test_foreign_database_refused(self):
        """An SQLite database of some other program is refused, not adopted."""
        os.makedirs(self.data_dir)
        with sqlite3.connect(self.path) as db:
            db.execute("CREATE TABLE accounts (name TEXT)")
        caught = self.failureResultOf(SQLiteRunStore(self.data_dir, reactor).open(), RunDatabaseError)
        self.assertIn("not a car-twisted run database", caught.getErrorMessage())

    def test_unopenable_path_refused(self):
        """A directory where the database file should be is a clear error
        naming the path."""
        os.makedirs(self.path)
        caught = self.failureResultOf(SQLiteRunStore(self.data_dir, reactor).open(), RunDatabaseError)
        self.assertIn(self.path, caught.getErrorMessage())

    async def test_second_store_on_one_database_refused(self):
        """While one store has the database open, a second one on it is
        refused at open with one line naming the file, and the first store's
        open run stays open; once the first closes, the database opens."""
        first = self.open()
        run = started()
        await first.start_run(run)
        caught = self.failureResultOf(SQLiteRunStore(self.data_dir, reactor).open(), RunDatabaseError)
        message = caught.getErrorMessage()
        self.assertIn(self.path, message)
        self.assertIn("in use by another daemon", message)
        self.assertNotIn("\n", message)
        self.assertEqual((await first.append_turns(run["run_id"], [turn()], 5))[0]["index"], 0)
        await first.close()

        second = self.open()
        self.assertEqual([s.run_id for s in await second.open_runs()], [run["run_id"]])

    async def write_runs(self):
        """A closed database of 200 runs with 5 turns each, its WAL
        checkpointed; the same pages every time."""
        store = self.open()
        for n in range(200):
            record = started(run_id=f"run-{n:03d}", intent=f"run {n}")
            store.start_run(record)
            store.append_turns(record["run_id"], [turn("x" * 200)] * 5, 10)
        await store.close()

    def damage_page(self, number: int) -> bytes:
        """Fill page C{number} (1-based) with garbage; the file's new bytes."""
        with sqlite3.connect(self.path) as db:
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
        with open(self.path, "r+b") as f:
            f.seek((number - 1) * page_size)
            f.write(b"\xff" * page_size)
            f.seek(0)
            return f.read()

    def assert_refused_as_damaged(self, damaged: bytes) -> None:
        """Opening fails with one line naming the file; the file is unchanged."""
        caught = self.failureResultOf(SQLiteRunStore(self.data_dir, reactor).open(), RunDatabaseError)
        message = caught.getErrorMessage()
        self.assertIn(self.path, message)
        self.assertIn("is damaged", message)
        self.assertNotIn("\n", message)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), damaged)

    async def test_damaged_page_refused(self):
        """A database with a damaged page in the middle of the file (one
        that opening alone does not read) is refused at open with one line
        naming the file, and left as it was."""
        await self.write_runs()
        with sqlite3.connect(self.path) as db:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
        self.assert_refused_as_damaged(self.damage_page(pages // 2))

    async def test_damaged_runs_page_refused_in_a_large_database(self):
        """A database larger than the whole-file check's bound still has its
        runs table checked: a damaged leaf in the middle of that b-tree is
        refused at open with one line naming the file."""
        self.patch(sqlite_store, "FULL_CHECK_BYTES", 0)
        await self.write_runs()
        with sqlite3.connect(self.path) as db:
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
        with open(self.path, "rb") as f:
            f.seek((root - 1) * page_size)
            page = f.read(page_size)
        self.assertEqual(page[0], 0x05, "the runs table fits in one page")
        # An interior table page: a cell count, a cell pointer array from
        # byte 12, each cell starting with its child's page number.
        cells = int.from_bytes(page[3:5], "big")
        cell = int.from_bytes(page[12 + cells // 2 * 2 : 14 + cells // 2 * 2], "big")
        self.assert_refused_as_damaged(self.damage_page(int.from_bytes(page[cell : cell + 4], "big")))

    async def test_private_files(self):
        """The data dir is created 0700 and the database and its WAL 0600."""
        store = self.open()
        await store.start_run(started())
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)
        for name in ["runs.sqlite3", "runs.sqlite3-wal"]:
            mode = os.stat(os.path.join(self.data_dir, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600, name)

    async def test_durability_settings(self):
        """The database is in WAL mode, and the writer syncs every commit."""
        store = self.open()
        await store.start_run(started())
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(
            store._writer.execute("PRAGMA synchronous").fetchone()[0], 2  # FULL
        )

    async def test_refused_writes_fail_alone_in_a_batch(self):
        """Writes refused inside one group commit fail only their own caller;
        the rest of the batch commits."""
        store = self.open()
        await store.start_run(started(run_id="seed"))
        commits = store.commits
        # Holding the writer's lock makes every write below join one batch.
        with store._wake:
            writes = [
                store.start_run(started(run_id="a")),
                store.start_run(started(run_id="a", intent="again")),
                store.append_turns("ghost", [turn()], 10),
                store.append_turns("a", [turn("1"), turn("2")], 10),
                store.append_turns("a", [turn()] * 9, 10),
                store.end_run("a", ended_record("incomplete", reason="x")),
                store.append_turns("a", [turn()], 10),
                store.start_run(started(run_id="b")),
            ]
        outcomes = await gatherResults(
            [d.addErrback(lambda f: f.trap(RunExists, RunNotFound, RunTerminal, TurnLimitReached))
             for d in writes],
            consumeErrors=True,
        )
        self.assertEqual(
            [first_index(outcome) for outcome in outcomes],
            [None, RunExists, RunNotFound, 0, TurnLimitReached, None, RunTerminal, None],
        )
        self.assertEqual(store.commits, commits + 1)
        records, _ = await store.read_records("a", 0, 10)
        self.assertEqual([r["record"] for r in records], ["started", "turn", "turn", "ended"])
        self.assertEqual(records[0]["intent"], "do it")
        self.assertEqual((await store.get_run("a")).turn_count, 2)
        self.assertIsNotNone(await store.get_run("b"))

    async def test_writes_of_one_reactor_turn_commit_together(self):
        """The writes issued in one reactor turn reach the writer together,
        at the turn's end, and commit in one transaction, even when the
        writer is idle and the turn takes its time between them."""
        store = self.open()
        await store.start_run(started(run_id="seed"))
        commits = store.commits
        first = store.start_run(started(run_id="a"))
        time.sleep(0.1)  # an idle writer would take the first write alone meanwhile
        writes = [first, store.start_run(started(run_id="b")), store.append_turns("a", [turn()], 5)]
        outcomes = await gatherResults(writes)
        self.assertEqual([first_index(o) for o in outcomes], [None, None, 0])
        self.assertEqual(store.commits, commits + 1)

    async def test_write_broken_partway_leaves_no_trace(self):
        """A write that fails after it began writing (here: an ended record
        without its timestamp) fails alone and leaves nothing behind; the
        writes batched with it, before and after, still commit."""
        store = self.open()
        await store.start_run(started(run_id="seed"))
        commits = store.commits
        malformed = {"record": "ended", "termination": "incomplete", "reason": "x"}
        with store._wake:
            writes = [
                store.start_run(started(run_id="a")),
                store.end_run("a", malformed),
                store.append_turns("a", [turn()], 10),
                store.start_run(started(run_id="a")),
                store.start_run(started(run_id="b")),
            ]
        outcomes = await gatherResults(
            [d.addErrback(lambda f: f.trap(KeyError, RunExists)) for d in writes],
            consumeErrors=True,
        )
        self.assertEqual([first_index(o) for o in outcomes], [None, KeyError, 0, RunExists, None])
        self.assertEqual(store.commits, commits + 1)
        records, _ = await store.read_records("a", 0, 10)
        self.assertEqual([r["record"] for r in records], ["started", "turn"])
        self.assertEqual((await store.get_run("a")).status, "in_progress")
        self.assertIsNotNone(await store.get_run("b"))
        self.assertEqual(await store.end_run("a", ended_record("incomplete", reason="y")), None)

    async def test_database_refusing_writes(self):
        """When the database refuses every write, each write fails with
        StoreWriteFailed naming the database's error instead of hanging,
        reads still work, and writing resumes once the database accepts
        writes again."""
        store = self.open()
        await store.start_run(started(run_id="a"))
        with store._wake:
            store._writer.execute("PRAGMA query_only = ON")
            writes = [store.start_run(started(run_id="b")), store.append_turns("a", [turn()], 5)]
        for write in writes:
            with self.assertRaises(StoreWriteFailed) as caught:
                await write
            self.assertIn("readonly", caught.exception.detail)
        self.assertEqual((await store.get_run("a")).turn_count, 0)
        self.assertIsNone(await store.get_run("b"))
        with store._wake:
            store._writer.execute("PRAGMA query_only = OFF")
        await store.start_run(started(run_id="b"))
        self.assertEqual((await store.append_turns("a", [turn()], 5))[0]["index"], 0)

    async def test_many_concurrent_writers(self):
        """Hundreds of concurrent starts and appends are all acknowledged
        and all present, each run with its own turns in order."""
        store = self.open()
        records = [started(intent=str(i)) for i in range(300)]
        acks = []
        for record in records:
            acks.append(store.start_run(record))
            acks.append(store.append_turns(record["run_id"], [turn(record["intent"])], 5))
            acks.append(store.append_turns(record["run_id"], [turn("second")], 5))
        self.assertEqual([first_index(ack) for ack in await gatherResults(acks)], [None, 0, 1] * 300)
        seen, cursor = [], None
        while True:
            page, cursor = await store.list_runs("agent-a", cursor, 500, None)
            seen.extend(page)
            if cursor is None:
                break
        self.assertEqual([s.run_id for s in seen], [r["run_id"] for r in reversed(records)])
        self.assertEqual({s.turn_count for s in seen}, {2})
        trace, _ = await store.read_records(records[123]["run_id"], 0, 10)
        self.assertEqual([r.get("prompt") for r in trace[1:]], ["123", "second"])

    async def test_starts_in_one_batch(self):
        """More starts than one statement inserts, batched with a repeated
        run id and a turn between them, commit together: each run has its
        own started record, they list in call order, and only the repeat is
        refused."""
        store = self.open()
        await store.start_run(started(run_id="seed"))
        commits = store.commits
        records = [started(intent=str(i)) for i in range(sqlite_store._WRITES_PER_STATEMENT + 5)]
        with store._wake:
            writes = [store.start_run(record) for record in records[:10]]
            writes.append(store.append_turns(records[3]["run_id"], [turn()], 5))
            writes.append(store.start_run(started(run_id="seed")))
            writes += [store.start_run(record) for record in records[10:]]
        outcomes = await gatherResults(
            [d.addErrback(lambda f: f.trap(RunExists)) for d in writes], consumeErrors=True
        )
        self.assertEqual(
            [first_index(o) for o in outcomes], [None] * 10 + [0, RunExists] + [None] * (len(records) - 10)
        )
        self.assertEqual(store.commits, commits + 1)
        page, _ = await store.list_runs("agent-a", None, 1000, None)
        newest_first = [r["run_id"] for r in reversed(records)]
        self.assertEqual([s.run_id for s in page], newest_first + ["seed"])
        for record in [records[0], records[3], records[-1]]:
            trace, _ = await store.read_records(record["run_id"], 0, 10)
            self.assertEqual(trace[0], record)
        self.assertEqual((await store.get_run(records[3]["run_id"])).turn_count, 1)

    async def test_ends_in_one_batch(self):
        """More ends than one statement applies, batched with runs started
        in the same batch, an unknown run, a run already ended and a run
        ended twice, commit together: each run gets its own ended record and
        summary, and only the unknown and the repeated ends are refused."""
        store = self.open()
        earlier = [started() for _ in range(sqlite_store._WRITES_PER_STATEMENT + 5)]
        for record in earlier:
            await store.start_run(record)
        await store.append_turns(earlier[7]["run_id"], [turn(), turn()], 5)
        await store.end_run(earlier[0]["run_id"], ended_record("incomplete", reason="x"))
        commits = store.commits
        fresh = started()
        done = ended_record("outcome", outcome=SUCCESS_OUTCOME)
        with store._wake:
            writes = [store.start_run(fresh), store.end_run(fresh["run_id"], done)]
            writes.append(store.end_run(fresh["run_id"], ended_record("incomplete", reason="y")))
            writes += [
                store.end_run(record["run_id"], ended_record("incomplete", reason=str(i)))
                for i, record in enumerate(earlier)
            ]
            writes.append(store.end_run("ghost", done))
            writes.append(store.end_run(earlier[7]["run_id"], done))
        outcomes = await gatherResults(
            [d.addErrback(lambda f: f.trap(RunNotFound, RunTerminal)) for d in writes],
            consumeErrors=True,
        )
        self.assertEqual(
            outcomes,
            [None, None, RunTerminal, RunTerminal]
            + [None] * (len(earlier) - 1)
            + [RunNotFound, RunTerminal],
        )
        self.assertEqual(store.commits, commits + 1)
        self.assertEqual(await store.open_runs(), [])
        summary = await store.get_run(fresh["run_id"])
        self.assertEqual((summary.status, summary.outcome_status), ("completed", "success"))
        self.assertEqual(summary.ended_at, done["ended_at"])
        trace, _ = await store.read_records(earlier[7]["run_id"], 0, 10)
        self.assertEqual([r["record"] for r in trace], ["started", "turn", "turn", "ended"])
        self.assertEqual(trace[-1]["reason"], "7")
        trace, _ = await store.read_records(earlier[0]["run_id"], 0, 10)
        self.assertEqual([r.get("reason") for r in trace], [None, "x"])
        with self.assertRaises(RunTerminal):
            await store.append_turns(fresh["run_id"], [turn()], 5)

    async def test_reads_see_earlier_writes(self):
        """A read issued right after a write it does not wait for still sees
        that write: calls take effect in call order."""
        store = self.open()
        record = started()
        store.start_run(record)
        store.append_turns(record["run_id"], [turn()], 5)
        summary = await store.get_run(record["run_id"])
        self.assertEqual(summary.turn_count, 1)
        other = started()
        store.start_run(other)
        page, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual(page[0].run_id, other["run_id"])
        store.end_run(other["run_id"], ended_record("incomplete", reason="x"))
        self.assertEqual([s.run_id for s in await store.open_runs()], [record["run_id"]])

    async def test_newest_first_by_start_not_by_id(self):
        """Runs list in start order even when their ids (idempotency keys)
        sort the other way."""
        store = self.open()
        for run_id in ["zzz", "mmm", "aaa"]:
            await store.start_run(started(run_id=run_id))
        page, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual([s.run_id for s in page], ["aaa", "mmm", "zzz"])

    async def test_cursor_is_stable_under_new_runs(self):
        """Runs started between two pages neither shift nor repeat the next
        page: the cursor is a position in start order, not an offset."""
        store = self.open()
        ids = []
        for _ in range(4):
            record = started()
            await store.start_run(record)
            ids.append(record["run_id"])
        first, cursor = await store.list_runs("agent-a", None, 2, None)
        await store.start_run(started())
        second, cursor = await store.list_runs("agent-a", cursor, 2, None)
        self.assertEqual([s.run_id for s in first + second], ids[::-1])
        self.assertIsNone(cursor)

    async def test_unencodable_ids_round_trip(self):
        """Ids and texts with lone surrogates (valid JSON escapes, invalid
        UTF-8) are stored and found under exactly their own value."""
        store = self.open()
        record = started(run_id="run-\ud800", agent_id="agent-\udfff", intent="\udc80")
        await store.start_run(record)
        await store.append_turns(record["run_id"], [turn("\ud83d")], 5)
        page, _ = await store.list_runs("agent-\udfff", None, 10, None)
        self.assertEqual([(s.run_id, s.intent) for s in page], [("run-\ud800", "\udc80")])
        records, _ = await store.read_records("run-\ud800", 0, 10)
        self.assertEqual(records[1]["prompt"], "\ud83d")
        self.assertIsNone(await store.get_run("run-\udc00"))

    async def test_open_runs_of_one_agent_among_many(self):
        """An agent's in_progress listing, searched among every agent's open
        runs, holds exactly its own open runs, newest first, paged without
        gap or repeat while other agents' runs start and end between pages."""
        store = self.open()
        mine = []
        for n in range(12):
            record = started(agent_id=f"agent-{n % 3}")
            await store.start_run(record)
            if n % 3 == 0 and n % 4:
                mine.append(record["run_id"])
            elif n % 3 == 0:
                await store.end_run(record["run_id"], ended_record("incomplete", reason="x"))
        seen, cursor = [], None
        while True:
            page, cursor = await store.list_runs("agent-0", cursor, 1, "in_progress")
            seen += [(s.run_id, s.agent_id, s.status) for s in page]
            await store.start_run(started(agent_id="agent-1"))
            if cursor is None:
                break
        self.assertEqual(seen, [(run_id, "agent-0", "in_progress") for run_id in reversed(mine)])

    def test_queries_use_indexes(self):
        """Listing (with and without a status), open-run discovery and trace
        reads each search their own index, in index order, so they stay fast
        at millions of runs: an agent's open runs are searched among the
        open runs, not among the agent's runs. Counting the prunable runs
        reads the table, not the ended runs' index row by row."""
        store = self.open()
        for query, args, index in [
            (sqlite_store.LIST_RUNS, (b"a", 10, 5), "INDEX runs_by_agent (agent_id=? AND seq<?)"),
            (
                sqlite_store.LIST_ENDED_RUNS,
                (b"a", "completed", 10, 5),
                "INDEX runs_ended_by_agent (agent_id=? AND status=? AND seq<?)",
            ),
            (sqlite_store.LIST_OPEN_RUNS, (b"a", 10, 5), "INDEX runs_open (seq<?)"),
            (sqlite_store.LIST_ALL_RUNS_WITH_STATUS, ("in_progress", 10, 5), "INDEX runs_open (seq<?)"),
            (sqlite_store.OPEN_RUNS, (), "INDEX runs_open"),
            (sqlite_store.READ_RECORDS, (1, 0, 5), "PRIMARY KEY (run=? AND position>?)"),
        ]:
            plan = [row[-1] for row in store._writer.execute("EXPLAIN QUERY PLAN " + query, args)]
            self.assertEqual(len(plan), 1, plan)
            self.assertTrue(plan[0].endswith("USING " + index), plan)
        # Counting what a prune would take reads the table once, in order.
        plan = store._writer.execute("EXPLAIN QUERY PLAN " + sqlite_store.COUNT_PRUNABLE, (b"t",))
        self.assertEqual([row[-1] for row in plan], ["SCAN runs"])

    async def test_close_drains_and_leaves_no_threads(self):
        """close acknowledges every pending write, then leaves no store
        thread running; later calls fail instead of hanging."""
        before = store_threads()
        store = SQLiteRunStore(self.data_dir, reactor)
        await store.open()
        await store.get_run("start a reader thread")
        self.assertEqual(
            sorted(t.name.split()[0] for t in store_threads() - before),
            ["PoolThread-car-sqlite-reader", "car-sqlite-writer"],
        )
        pending = [store.start_run(started()) for _ in range(20)]
        await store.close()
        self.assertEqual(await gatherResults(pending), [None] * 20)
        self.assertEqual(store_threads() - before, set())
        with self.assertRaises(RuntimeError):
            await store.get_run("x")
        with self.assertRaises(RuntimeError):
            await store.start_run(started())
        store = self.open()
        page, _ = await store.list_runs("agent-a", None, 50, None)
        self.assertEqual(len(page), 20)


class SQLiteDaemonTests(unittest.TestCase):
    async def test_second_daemon_leaves_live_runs_alone(self):
        """A second daemon on the data dir of a running one with --store
        sqlite does not start, so it does not end the first one's live run
        (as its recovery would): the first daemon's agent still records
        turns and completes the run."""
        data_dir = os.path.abspath(self.mktemp())
        first = DaemonProcess("sqlite", data_dir)
        self.addCleanup(first.kill)
        await first.start()
        agent = await RPCClient.connect(first.port)
        self.addCleanup(agent.close)
        run_id = (await agent.call("runs.start", {"agent_id": "agent-a", "intent": "live"}))["run_id"]

        second = DaemonProcess("sqlite", data_dir)
        self.addCleanup(second.kill)
        starting = Deferred.fromCoroutine(second.start())
        # Exiting before it listens is the refusal it should make.
        starting.addErrback(lambda failure: failure.trap(RuntimeError))
        await wait_for(
            lambda: starting.called or b"in use by another daemon" in second.output,
            "the second daemon to listen or be refused",
            timeout=30,
        )
        self.assertIsNone(second.port, "the second daemon started")
        self.assertIn(os.path.join(data_dir, "runs.sqlite3").encode(), second.output)
        await second.kill()

        await agent.call("runs.record_turns", {"run_id": run_id, "turns": [{"tool": "after"}]})
        await agent.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        trace = await agent.call("runs.get_trace", {"run_id": run_id})
        self.assertEqual(
            [r["record"] for r in trace["records"]], ["started", "turn", "ended"]
        )
        self.assertEqual(trace["records"][-1]["termination"], "outcome")


#: A run database written by the schema-1 store (the store of main at
#: 5884ffc, through its own start_run/append_turns/end_run, then closed):
#: eight runs of three agents, open, completed, cancelled and incomplete,
#: one with lone surrogates in its ids.
V1_DATABASE = os.path.join(os.path.dirname(__file__), "data", "runs-v1.sqlite3")
V1_INDEXES = {"sqlite_autoindex_runs_1", "runs_by_agent", "runs_by_agent_status", "runs_open"}


def schema_of(path: str):
    """The database's schema version and its tables' and indexes' SQL."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        entries = dict(db.execute("SELECT name, sql FROM sqlite_master"))
    return version, entries


class SchemaMigrationTests(unittest.TestCase):
    """A database of an older schema is brought to the current one at open,
    in one transaction."""

    def setUp(self):
        self.data_dir = fresh_data_dir(self)
        os.makedirs(self.data_dir, mode=0o700)
        self.path = os.path.join(self.data_dir, "runs.sqlite3")
        shutil.copy(V1_DATABASE, self.path)
        version, entries = schema_of(self.path)
        self.assertEqual((version, V1_INDEXES <= set(entries)), (1, True))

    def open(self):
        store = SQLiteRunStore(self.data_dir, reactor)
        self.successResultOf(store.open())
        self.addCleanup(store.close)
        return store

    async def current_schema(self):
        """The schema of a database the current code creates."""
        other = fresh_data_dir(self)
        store = SQLiteRunStore(other, reactor)
        await store.open()
        await store.close()
        return schema_of(os.path.join(other, "runs.sqlite3"))

    async def assert_runs_as_written(self, store):
        """Every run of the version-1 file reads back as it was written."""
        page, cursor = await store.list_runs(None, None, 50, None)
        self.assertIsNone(cursor)
        self.assertEqual(
            [(s.run_id, s.agent_id, s.intent, s.status, s.outcome_status, s.turn_count) for s in page],
            [
                ("run-8", "agent-a", "open", "in_progress", None, 1),
                ("run-7", "agent-b", "completed", "completed", "success", 0),
                ("run-6", "agent-a", "dropped", "incomplete", None, 2),
                ("run-\ud800", "agent-\udfff", "dropped", "incomplete", None, 1),
                ("run-4", "agent-a", "cancelled", "cancelled", None, 0),
                ("run-3", "agent-a", "open", "in_progress", None, 2),
                ("run-2", "agent-b", "open", "in_progress", None, 1),
                ("run-1", "agent-a", "completed", "completed", "success", 0),
            ],
        )
        for status, expected in [
            (None, ["run-8", "run-6", "run-4", "run-3", "run-1"]),
            ("in_progress", ["run-8", "run-3"]),
            ("completed", ["run-1"]),
            ("incomplete", ["run-6"]),
            ("cancelled", ["run-4"]),
        ]:
            page, _ = await store.list_runs("agent-a", None, 50, status)
            self.assertEqual([s.run_id for s in page], expected, status)
        page, _ = await store.list_runs("agent-\udfff", None, 50, "incomplete")
        self.assertEqual([s.run_id for s in page], ["run-\ud800"])
        self.assertEqual(
            sorted(s.run_id for s in await store.open_runs()), ["run-2", "run-3", "run-8"]
        )
        records, _ = await store.read_records("run-6", 0, 10)
        self.assertEqual(
            [r["record"] for r in records], ["started", "turn", "turn", "ended"]
        )
        self.assertEqual(
            (records[1]["prompt"], records[2]["index"], records[3]["reason"]),
            ("run-6 prompt 0", 1, "connection closed"),
        )

    async def test_version_1_migrated(self):
        """A version-1 database opens as the current version, with exactly
        the tables and indexes of a database created now and its WAL
        checkpointed, serves every run as written, and takes new writes."""
        store = self.open()
        self.assertEqual(os.path.getsize(self.path + "-wal"), 0, "the migration is checkpointed")
        await self.assert_runs_as_written(store)
        self.assertEqual(schema_of(self.path), await self.current_schema())
        fresh = started(agent_id="agent-a", intent="after")
        await store.start_run(fresh)
        await store.end_run("run-3", ended_record("incomplete", reason="x"))
        page, _ = await store.list_runs("agent-a", None, 50, "in_progress")
        self.assertEqual([s.run_id for s in page], [fresh["run_id"], "run-8"])
        page, _ = await store.list_runs("agent-a", None, 2, "incomplete")
        self.assertEqual([s.run_id for s in page], ["run-6", "run-3"])
        await store.close()

        store = self.open()
        self.assertEqual((await store.get_run("run-3")).status, "incomplete")
        self.assertEqual(schema_of(self.path), await self.current_schema())

    async def test_failed_migration_leaves_version_1(self):
        """A migration that fails partway is refused with one line naming
        the file and leaves the database exactly as it was; the next open
        migrates it."""
        with open(self.path, "rb") as f:
            before = f.read()
        failing = self.patch(
            sqlite_store,
            "MIGRATIONS",
            {1: sqlite_store.MIGRATIONS[1] + "; CREATE INDEX runs_open ON runs (seq)"},
        )
        caught = self.failureResultOf(SQLiteRunStore(self.data_dir, reactor).open(), RunDatabaseError)
        self.assertIn(self.path, caught.getErrorMessage())
        self.assertIn("runs_open already exists", caught.getErrorMessage())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(schema_of(self.path)[0], 1)
        self.assertTrue(V1_INDEXES <= set(schema_of(self.path)[1]))

        failing.restore()
        await self.assert_runs_as_written(self.open())

    async def test_migration_killed_before_commit(self):
        """A daemon killed (SIGKILL) with its migration applied but not
        committed leaves a version-1 database that passes its integrity
        check, and the next open migrates it."""
        killed = subprocess.run(
            [sys.executable, "-c", _KILLED_MIGRATION, self.path],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        self.assertEqual(killed.returncode, -signal.SIGKILL, killed.stderr)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("PRAGMA quick_check").fetchone()[0], "ok")
        version, entries = schema_of(self.path)
        self.assertEqual((version, V1_INDEXES <= set(entries)), (1, True))
        store = self.open()
        await self.assert_runs_as_written(store)
        self.assertEqual(schema_of(self.path), await self.current_schema())


# Opens the database at argv[1], and is killed once the migration's
# statements have run, before the opening transaction commits.
_KILLED_MIGRATION = """
import os, signal, sys
from car_twisted.store import sqlite

migrate = sqlite._migrate

def migrate_then_die(connection, version):
    migrate(connection, version)
    os.kill(os.getpid(), signal.SIGKILL)

sqlite._migrate = migrate_then_die
sqlite.open_database(sys.argv[1])
"""
