"""The PostgreSQL store: the IRunStore conformance suite, then what is its own."""

import psycopg
from twisted.enterprise import adbapi
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from car_twisted.interfaces import ISharedRunStore, RunExists, RunTerminal, StoreWriteFailed
from car_twisted.records import ended_record
from car_twisted.store.postgresql import (
    SCHEMA_VERSION,
    PostgresRunStore,
    RunAdopted,
    RunDatabaseError,
    redacted,
)
from tests.postgres_server import fresh_database
from tests.store_conformance import RunStoreConformance, started
from tests.support import wait_for


class PostgresRunStoreConformanceTests(RunStoreConformance, unittest.TestCase):
    def make_store(self):
        store = PostgresRunStore(reactor, fresh_database(self))
        self.addCleanup(store.close)
        return store


class PostgresRunStoreTests(unittest.TestCase):
    def setUp(self):
        self.dsn = fresh_database(self)

    async def open(self, **kwargs):
        store = PostgresRunStore(reactor, self.dsn, **kwargs)
        await store.open()
        self.addCleanup(store.close)
        return store

    def sql(self, statement, *args):
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            cursor = connection.execute(statement, args)
            return cursor.fetchall() if cursor.description else None

    async def test_provides_shared_interface(self):
        """The store provides everything a shared store promises."""
        self.assertTrue(verifyObject(ISharedRunStore, await self.open()))

    async def test_reopen_keeps_schema_and_runs(self):
        """A second open on a migrated database keeps its version and runs."""
        store = await self.open()
        record = started()
        await store.start_run(record)
        await store.close()
        store = await self.open()
        self.assertEqual((await store.get_run(record["run_id"])).intent, "do it")
        self.assertEqual(self.sql("SELECT version FROM car_schema"), [(SCHEMA_VERSION,)])

    async def test_newer_schema_refused(self):
        """A database of a newer schema version is refused in one line."""
        await (await self.open()).close()
        self.sql("UPDATE car_schema SET version = %s", SCHEMA_VERSION + 1)
        with self.assertRaises(RunDatabaseError) as caught:
            await PostgresRunStore(reactor, self.dsn).open()
        message = str(caught.exception)
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}, newer than", message)
        self.assertNotIn("\n", message)

    async def test_unreachable_database_refused_without_password(self):
        """A database that cannot be reached fails open with one line naming
        it, its password left out."""
        dsn = psycopg.conninfo.make_conninfo(
            self.dsn, dbname="car_no_such_database", password="hunter2"
        )
        with self.assertRaises(RunDatabaseError) as caught:
            await PostgresRunStore(reactor, dsn).open()
        message = str(caught.exception)
        self.assertIn("car_no_such_database", message)
        self.assertNotIn("hunter2", message)
        self.assertNotIn("\n", message)

    def test_redacted(self):
        """redacted() drops the password from key-value and URL DSNs."""
        self.assertEqual(
            psycopg.conninfo.conninfo_to_dict(redacted("host=db password=s3cret user=car")),
            {"host": "db", "user": "car"},
        )
        self.assertNotIn("s3cret", redacted("postgresql://car:s3cret@db:5432/runs"))

    async def test_two_daemons_start_the_same_run_id(self):
        """Two daemons starting one run id at once: exactly one succeeds, the
        other fails RunExists (the run service answers it as an idempotent restart)."""
        a, b = await self.open(), await self.open()
        record = started(run_id="key-1")
        results = await DeferredList(
            [a.start_run(record), b.start_run(dict(record, intent="other"))],
            consumeErrors=True,
        )
        outcomes = sorted(ok for ok, _ in results)
        self.assertEqual(outcomes, [False, True])
        loser = next(result for ok, result in results if not ok)
        self.assertTrue(loser.check(RunExists))
        self.assertEqual(self.sql("SELECT count(*) FROM car_runs"), [(1,)])

    async def test_two_daemons_end_the_same_run(self):
        """Two daemons ending one run at once (complete vs cancel, many times):
        exactly one terminal record each time, the other fails RunTerminal."""
        a, b = await self.open(), await self.open()
        outcome = {"status": "success", "summary": "", "evidence": [], "metrics": {}, "timestamp": "t"}
        for _ in range(20):
            record = started()
            run_id = record["run_id"]
            await a.start_run(record)
            results = await DeferredList(
                [
                    a.end_run(run_id, ended_record("outcome", outcome=outcome)),
                    b.end_run(run_id, ended_record("cancelled", reason_digest="00")),
                ],
                consumeErrors=True,
            )
            self.assertEqual(sorted(ok for ok, _ in results), [False, True])
            self.assertTrue(next(r for ok, r in results if not ok).check(RunTerminal))
            records, _ = await b.read_records(run_id, 0, 10)
            self.assertEqual([r["record"] for r in records], ["started", "ended"])

    async def test_terminal_record_unique_in_the_database(self):
        """The database itself refuses a second terminal record for a run."""
        store = await self.open()
        record = started()
        await store.start_run(record)
        await store.end_run(record["run_id"], ended_record("incomplete", reason="x"))
        with self.assertRaises(psycopg.errors.UniqueViolation):
            self.sql(
                "INSERT INTO car_records (run, position, terminal, body)"
                " SELECT seq, 5, true, '{}' FROM car_runs"
            )

    async def test_sweep_ends_only_expired_daemons_runs(self):
        """A sweep ends the open runs of a daemon whose lease expired
        (incomplete, "daemon lost"), and never a live peer's."""
        survivor, lost, peer = await self.open(), await self.open(), await self.open()
        mine, theirs, peers = started(), started(), started()
        await survivor.start_run(mine)
        await lost.start_run(theirs)
        await peer.start_run(peers)
        self.sql(
            "UPDATE car_daemons SET heartbeat_at = now() - interval '1 hour' WHERE daemon_id = %s",
            lost.daemon_id,
        )
        self.assertEqual(await survivor.sweep(), [theirs["run_id"]])
        records, _ = await survivor.read_records(theirs["run_id"], 0, 10)
        self.assertEqual(
            (records[-1]["termination"], records[-1]["reason"]), ("incomplete", "daemon lost")
        )
        still_open = {s.run_id for s in await survivor.open_runs()}
        self.assertEqual(still_open, {mine["run_id"], peers["run_id"]})

    async def test_restart_ends_predecessors_runs_only(self):
        """A daemon starting under the name of a previous one ends that
        predecessor's open runs ("daemon restarted"), not a live peer's."""
        before = await self.open(name="host-a")
        peer = await self.open(name="host-b")
        left_open, peers = started(), started()
        await before.start_run(left_open)
        await peer.start_run(peers)
        await before.close()
        after = await self.open(name="host-a")
        self.assertEqual(await after.recover(), 1)
        summary = await after.get_run(left_open["run_id"])
        self.assertEqual(summary.status, "incomplete")
        records, _ = await after.read_records(left_open["run_id"], 1, 1)
        self.assertEqual(records[0]["reason"], "daemon restarted")
        self.assertEqual((await after.get_run(peers["run_id"])).status, "in_progress")

    async def test_expired_daemon_registers_again(self):
        """A daemon whose peers declared it lost registers again at its next
        heartbeat, so the runs it starts afterwards have a live owner."""
        store = await self.open()
        self.sql("DELETE FROM car_daemons")
        await store.sweep()
        self.assertEqual(
            self.sql("SELECT daemon_id FROM car_daemons"), [(store.daemon_id,)]
        )

    async def test_heartbeat_on_the_clock(self):
        """The heartbeat runs on the injected clock and renews the lease."""
        clock = Clock()
        store = await self.open(lease=3.0)
        store._heartbeat.clock = clock
        self.sql("UPDATE car_daemons SET heartbeat_at = now() - interval '2 seconds'")
        store.start_heartbeat()
        beat = store._heartbeat
        clock.advance(1.0)
        await wait_for(lambda: beat.call is not None, "the heartbeat to finish")
        (age,) = self.sql("SELECT now() - heartbeat_at < interval '1 second' FROM car_daemons")[0]
        self.assertTrue(age)

    async def test_adopted_run_is_not_ended_by_its_old_daemon(self):
        """Once daemon B adopted a run daemon A released, A's end_own_run
        (its producer's window running out) fails RunAdopted and changes
        nothing; B still ends it."""
        a, b = await self.open(), await self.open()
        record = started()
        run_id = record["run_id"]
        await a.start_run(record)
        self.assertFalse(await b.adopt(run_id))
        await a.release(run_id)
        self.assertTrue(await b.adopt(run_id))
        self.assertEqual((await a.owns(run_id), await b.owns(run_id)), (False, True))
        with self.assertRaises(RunAdopted):
            await a.end_own_run(run_id, ended_record("incomplete", reason="connection closed"))
        self.assertEqual((await a.get_run(run_id)).status, "in_progress")
        await b.end_own_run(run_id, ended_record("cancelled", reason_digest="00"))
        self.assertEqual((await a.get_run(run_id)).status, "cancelled")

    async def test_no_sweep_after_own_lease_lapsed(self):
        """A daemon whose own heartbeat had lapsed (a database outage longer
        than the lease) renews it but ends no peer's runs in that sweep; the
        next sweep does, if the peer is still silent."""
        survivor, peer = await self.open(), await self.open()
        record = started()
        await peer.start_run(record)
        self.sql("UPDATE car_daemons SET heartbeat_at = now() - interval '1 hour'")
        self.assertEqual(await survivor.sweep(), [])
        self.assertEqual((await survivor.get_run(record["run_id"])).status, "in_progress")
        self.assertEqual(await survivor.sweep(), [record["run_id"]])

    async def test_write_on_a_dropped_connection_is_retryable(self):
        """A write whose connection the server dropped fails
        StoreWriteFailed and changes nothing; the same call, made again,
        succeeds on a new connection."""
        store = await self.open(pool_size=1)
        record = started()
        run_id = record["run_id"]
        await store.start_run(record)
        self.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            f"car-twisted {store.daemon_id}",
        )
        with self.assertRaises(StoreWriteFailed):
            await store.append_turns(run_id, [{"record": "turn", "prompt": "p"}], 10)
        # The pool logs the rollback it could not send.
        self.flushLoggedErrors(psycopg.OperationalError, adbapi.ConnectionLost)
        self.assertEqual((await store.get_run(run_id)).turn_count, 0)
        (stamped,) = await store.append_turns(run_id, [{"record": "turn", "prompt": "p"}], 10)
        self.assertEqual(stamped["index"], 0)
        records, _ = await store.read_records(run_id, 0, 10)
        self.assertEqual([r["record"] for r in records], ["started", "turn"])

    async def test_commits_reported(self):
        """Each commit is reported to on_commit with how many writes it held
        (the starts of one reactor turn share one) and how long it took."""
        store = PostgresRunStore(reactor, self.dsn)
        commits = []
        store.on_commit = lambda writes, seconds: commits.append((writes, seconds))
        await store.open()
        self.addCleanup(store.close)
        first, second = started(), started()
        await DeferredList([store.start_run(first), store.start_run(second)])
        await store.append_turns(first["run_id"], [{"record": "turn", "prompt": "p"}], 10)
        self.assertEqual([writes for writes, _ in commits], [2, 1])
        self.assertTrue(all(seconds >= 0 for _, seconds in commits))

    async def test_two_daemons_prune_at_once(self):
        """Two daemons pruning at once delete each old ended run exactly
        once, whole, and never an open one (retention, docs/storage.md)."""
        a, b = await self.open(), await self.open()
        ended_ids, open_record = [], started()
        for _ in range(20):
            record = started()
            await a.start_run(record)
            await a.end_run(record["run_id"], ended_record("incomplete", reason="x"))
            ended_ids.append(record["run_id"])
        await a.start_run(open_record)
        later = "9999-12-31T23:59:59.999Z"
        self.assertEqual(await a.count_prunable(later), 20)
        results = await DeferredList([a.prune_runs(later, 15), b.prune_runs(later, 15)])
        pruned = [run_id for _, ids in results for run_id in ids]
        self.assertEqual(sorted(pruned), sorted(ended_ids))
        self.assertEqual(await b.count_prunable(later), 0)
        self.assertEqual(self.sql("SELECT count(*) FROM car_records"), [(1,)])
        self.assertEqual((await b.get_run(open_record["run_id"])).status, "in_progress")
