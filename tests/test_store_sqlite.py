"""The SQLite store: the IRunStore conformance suite, then what is its own."""

import os
import shutil
import sqlite3
import stat
import tempfile
import threading

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

    def test_queries_use_indexes(self):
        """Listing (with and without a status), open-run discovery and trace
        reads each search their own index, in index order, so they stay fast
        at millions of runs."""
        store = self.open()
        for query, args, index in [
            (sqlite_store.LIST_RUNS, (b"a", 10, 5), "INDEX runs_by_agent (agent_id=? AND seq<?)"),
            (
                sqlite_store.LIST_RUNS_WITH_STATUS,
                (b"a", "completed", 10, 5),
                "INDEX runs_by_agent_status (agent_id=? AND status=? AND seq<?)",
            ),
            (sqlite_store.OPEN_RUNS, (), "INDEX runs_open"),
            (sqlite_store.READ_RECORDS, (1, 0, 5), "PRIMARY KEY (run=? AND position>?)"),
        ]:
            plan = [row[-1] for row in store._writer.execute("EXPLAIN QUERY PLAN " + query, args)]
            self.assertEqual(len(plan), 1, plan)
            self.assertTrue(plan[0].endswith("USING " + index), plan)

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
