"""
A run store in PostgreSQL, shared by any number of daemons.

Writes and reads go through a L{twisted.enterprise.adbapi.ConnectionPool} of
psycopg 3 connections in autocommit mode: each write is one SQL statement
(one round trip, one commit) on a pool thread, and the starts of one reactor
turn share one statement. Calls on one run are chained so they apply and
fire in call order; calls on different runs run in parallel, and
PostgreSQL's group commit shares flushes among them. What must be unique across daemons is unique in the database:
run ids (so also idempotency keys, which become run ids), and one terminal
record per run (each write locks its run's row; a partial unique index
backs that up).

Each store is one daemon process: L{PostgresRunStore.open} registers it in
C{car_daemons} under a fresh id; it owns the runs it starts, and heartbeats
on the injected clock once started (L{PostgresRunStore.start_heartbeat}).
Every heartbeat also sweeps: the runs of a daemon whose lease expired are
ended C{incomplete} ("daemon lost"). Each committed change to a run sends a
NOTIFY on L{CHANNEL} whose payload points at it (run id, cursor, origin);
see L{car_twisted.store.pg_listener}.
"""

import json
import socket
import time
import uuid

import psycopg
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted.interfaces import (
    ISharedRunStore,
    RunExists,
    RunNotFound,
    RunTerminal,
    StoreWriteFailed,
    TurnLimitReached,
    status_of,
)
from car_twisted.records import ended_record
from car_twisted.store.cursors import parse_seq_cursor
from car_twisted.store.pg_listener import RunChangeListener
from car_twisted.store.rows import summary_from_row, to_bytes, to_text

log = Logger()

#: The environment variable that holds the DSN when C{--dsn} is not given.
DSN_ENV = "CAR_DATABASE_URL"
#: The NOTIFY channel of run changes.
CHANNEL = "car_runs"
#: Seconds a daemon stays alive in its peers' eyes without a heartbeat.
DEFAULT_LEASE = 10.0
#: Connections in the pool (one thread each).
POOL_SIZE = 8
#: Batches of runs.start sent at once; starts arriving meanwhile wait for the
#: next batch (group commit: fewer, larger transactions).
BATCHES_IN_FLIGHT = 2

#: The schema, one entry per version: entry N-1 takes a database from
#: version N-1 to version N.
MIGRATIONS = [
    """
    CREATE TABLE car_schema (version integer NOT NULL);
    INSERT INTO car_schema VALUES (0);
    CREATE TABLE car_daemons (
        daemon_id text PRIMARY KEY,
        name text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        lease interval NOT NULL
    );
    CREATE TABLE car_runs (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id bytea NOT NULL UNIQUE,
        agent_id bytea NOT NULL,
        intent bytea NOT NULL,
        started_at bytea NOT NULL,
        ended_at bytea,
        status text NOT NULL,
        outcome_status text,
        turn_count integer NOT NULL,
        record_count integer NOT NULL,
        owner text NOT NULL,
        detached boolean NOT NULL DEFAULT false
    );
    CREATE INDEX car_runs_by_agent ON car_runs (agent_id, seq);
    CREATE INDEX car_runs_by_agent_status ON car_runs (agent_id, status, seq);
    CREATE INDEX car_runs_open ON car_runs (owner) WHERE status = 'in_progress';
    CREATE TABLE car_records (
        run bigint NOT NULL REFERENCES car_runs (seq),
        position integer NOT NULL,
        terminal boolean NOT NULL,
        body text NOT NULL,
        PRIMARY KEY (run, position)
    );
    CREATE UNIQUE INDEX car_records_one_terminal ON car_records (run) WHERE terminal;
    """,
    # runs.list without agent_id (every agent's runs), by status; pruning.
    """
    CREATE INDEX car_runs_by_status ON car_runs (status, seq);
    CREATE INDEX car_runs_ended ON car_runs (ended_at) WHERE status <> 'in_progress';
    """,
]
#: The schema version this code writes and understands.
SCHEMA_VERSION = len(MIGRATIONS)
# Any constant: daemons starting together migrate one at a time.
_MIGRATION_LOCK = 0x6361725F7363

# The writes are single statements: on the pool's autocommit connections each
# is one round trip. The run's row is locked first (FOR UPDATE), so writes to
# one run from several daemons take turns; the first row says what was found.
# Turn bodies get their "index" appended here, where the base is known
# (bodies are compact JSON objects: a later duplicate key wins in every reader).
START_RUNS = """
WITH new AS (
    INSERT INTO car_runs (run_id, agent_id, intent, started_at, status, turn_count, record_count, owner)
    SELECT run_id, agent_id, intent, started_at, 'in_progress', 0, 1, %(owner)s
    FROM unnest(%(run_ids)s::bytea[], %(agent_ids)s::bytea[], %(intents)s::bytea[],
                %(started_ats)s::bytea[]) WITH ORDINALITY AS s (run_id, agent_id, intent, started_at, n)
    ORDER BY n
    ON CONFLICT (run_id) DO NOTHING
    RETURNING seq, run_id
), records AS (
    INSERT INTO car_records (run, position, terminal, body)
    SELECT new.seq, 0, false, b.body
    FROM new JOIN unnest(%(run_ids)s::bytea[], %(bodies)s::text[]) AS b (run_id, body) USING (run_id)
)
SELECT run_id FROM new
"""
APPEND_TURNS = """
WITH run AS (
    SELECT seq, status, turn_count, record_count FROM car_runs WHERE run_id = %(run_id)s FOR UPDATE
), ok AS (
    SELECT * FROM run WHERE status = 'in_progress' AND turn_count + %(count)s <= %(max)s
), inserted AS (
    INSERT INTO car_records (run, position, terminal, body)
    SELECT ok.seq, ok.record_count + t.n - 1, false,
           left(t.body, -1) || ',"index":' || (ok.turn_count + t.n - 1) || '}'
    FROM ok, unnest(%(bodies)s::text[]) WITH ORDINALITY AS t (body, n)
), updated AS (
    UPDATE car_runs r SET turn_count = ok.turn_count + %(count)s,
                          record_count = ok.record_count + %(count)s
    FROM ok WHERE r.seq = ok.seq RETURNING r.record_count
), notified AS (
    SELECT pg_notify(%(channel)s, '[' || %(run_json)s || ',' || record_count || ',' || %(origin_json)s || ']')
    FROM updated
)
SELECT status, turn_count, (SELECT count(*) FROM notified) FROM run
"""
END_RUN = """
WITH run AS (
    SELECT seq, status, record_count, owner FROM car_runs WHERE run_id = %(run_id)s FOR UPDATE
), inserted AS (
    INSERT INTO car_records (run, position, terminal, body)
    SELECT seq, record_count, true, %(body)s FROM run
    WHERE status = 'in_progress' AND (%(owner)s::text IS NULL OR owner = %(owner)s)
    RETURNING run, position
), updated AS (
    UPDATE car_runs r SET status = %(status)s, outcome_status = %(outcome_status)s,
                          ended_at = %(ended_at)s, record_count = inserted.position + 1
    FROM inserted WHERE r.seq = inserted.run RETURNING r.record_count
), notified AS (
    SELECT pg_notify(%(channel)s, '[' || %(run_json)s || ',' || record_count || ',' || %(origin_json)s || ']')
    FROM updated
)
SELECT status, owner, (SELECT count(*) FROM notified) FROM run
"""

# Ended runs before a time, oldest first, each deleted whole in one
# statement (foreign keys are checked at its end); rows another daemon's
# prune holds are skipped.
PRUNE_RUNS = """
WITH doomed AS (
    SELECT seq FROM car_runs WHERE status <> 'in_progress' AND ended_at < %(before)s
    ORDER BY ended_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), records AS (
    DELETE FROM car_records USING doomed WHERE car_records.run = doomed.seq
)
DELETE FROM car_runs r USING doomed WHERE r.seq = doomed.seq RETURNING r.run_id
"""
#: The key prunes are chained under (no run id can be it: ids are at most
#: 256 characters).
_PRUNE_KEY = "\0prune" * 64

_SUMMARY_COLUMNS = (
    "run_id, agent_id, intent, started_at, ended_at, status, outcome_status, turn_count"
)


class RunAdopted(RunTerminal):
    """Another daemon owns the run now: this one may no longer end it."""


class RunDatabaseError(Exception):
    """The run database cannot be used; the message says why, on one line."""


def redacted(dsn: str) -> str:
    """C{dsn} without its password, fit for a log line."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(an unreadable DSN)"
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo(**params)


# Ids and texts come from the network and may hold NUL and lone surrogates,
# which PostgreSQL text cannot: they are kept as bytea of their
# surrogate-passing UTF-8. Record bodies are ASCII JSON (every such
# character escaped).




def _encode(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))






def _write_failed(failure):
    """
    A database error of a write, as the L{StoreWriteFailed} it is (the pool
    reports a connection lost mid-write as L{adbapi.ConnectionLost}, after
    logging the rollback that could not be sent).
    """
    if failure.check(psycopg.Error):
        message = str(failure.value).strip().splitlines()
        raise StoreWriteFailed(message[0] if message else failure.type.__name__)
    if failure.check(adbapi.ConnectionLost):
        raise StoreWriteFailed("the connection to the run database was lost")
    return failure


def notice(run_id: str, cursor: int, origin: str) -> str:
    """The NOTIFY payload for a run whose records now end at C{cursor}."""
    return json.dumps([run_id, cursor, origin])


def _in_transaction(work):
    """
    C{work(txn, ...)} in one transaction: the pool's connections are in
    autocommit mode, and the pool commits (or rolls back) what C{BEGIN} opened.
    """

    def transaction(txn, *args):
        txn.execute("BEGIN")
        return work(txn, *args)

    return transaction


def _migrate(txn) -> int:
    """Bring the database to L{SCHEMA_VERSION}; the version found."""
    txn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
    txn.execute("SELECT to_regclass('car_schema') IS NOT NULL")
    version = 0
    if txn.fetchone()[0]:
        txn.execute("SELECT version FROM car_schema")
        version = txn.fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RunDatabaseError(
            f"the run database has schema version {version}, newer than the "
            f"{SCHEMA_VERSION} this car-twisted understands: it was written by a "
            "newer release; run that release or upgrade"
        )
    for step in MIGRATIONS[version:]:
        txn.execute(step)
    txn.execute("UPDATE car_schema SET version = %s", (SCHEMA_VERSION,))
    return version


class _Tail:
    """The latest write issued on one run (or on any run): who waits for it."""

    def __init__(self):
        self.settled = False
        self._waiters = []

    def wait(self) -> Deferred:
        waiter = Deferred()
        if self.settled:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def settle(self) -> None:
        self.settled = True
        for waiter in self._waiters:
            waiter.callback(None)
        self._waiters = []


class _StartBatches:
    """
    Group the C{start_run} calls made in one reactor turn into one INSERT
    statement (one pool thread hop, one round trip): a daemon under load
    starts many runs at once, and each costs far less in a batch.
    """

    def __init__(self, reactor, commit, start_runs):
        self._reactor = reactor
        self._commit = commit
        self._start_runs = start_runs
        self._pending = []  # (started, Deferred)
        self._flush = None
        self._in_flight = 0

    def add(self, started) -> Deferred:
        d = Deferred()
        self._pending.append((started, d))
        if self._flush is None and self._in_flight < BATCHES_IN_FLIGHT:
            self._flush = self._reactor.callLater(0, self._send)
        return d

    def _send(self) -> None:
        self._flush = None
        batch, self._pending = self._pending, []
        self._in_flight += 1
        d = self._commit(len(batch), self._start_runs, [started for started, _ in batch])
        d.addCallbacks(self._created, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addBoth(self._sent)

    def _sent(self, _) -> None:
        self._in_flight -= 1
        if self._pending and self._flush is None:
            self._send()

    @staticmethod
    def _created(created, batch) -> None:
        for started, d in batch:
            if to_bytes(started["run_id"]) in created:
                d.callback(None)
            else:
                d.errback(RunExists(started["run_id"]))

    @staticmethod
    def _failed(failure, batch) -> None:
        for _, d in batch:
            d.errback(failure)


@implementer(ISharedRunStore)
class PostgresRunStore:
    """
    Runs in the PostgreSQL database at C{dsn}; L{open} connects.

    @param name: what stays the same across restarts of one daemon (host and
        data directory): a starting daemon ends its predecessors' runs.
    @param lease: seconds this daemon stays alive in its peers' eyes
        without a heartbeat.
    @ivar daemon_id: this daemon's id in C{car_daemons} (one per process start).
    @ivar on_commit: C{f(writes, seconds)}, called after each write's commit
        with how many writes it held and how long it took (the daemon's
        metrics).
    """

    def __init__(self, reactor, dsn: str, name=None, lease=DEFAULT_LEASE, pool_size=POOL_SIZE):
        self._dsn = dsn
        self._reactor = reactor
        self.name = name or socket.gethostname()
        self.lease = lease
        self.daemon_id = uuid.uuid4().hex
        self._pool_size = pool_size
        self._pool = None
        self._starts = None
        self.on_commit = lambda writes, seconds: None
        self._tails = {}  # run_id -> _Tail of the newest write on it
        self._writes = set()  # _Tails of the writes in flight
        self._reads = set()  # Deferreds of reads in flight
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._beating = None
        self._listener = None
        self._closing = None

    def open(self):
        """
        Connect, create or migrate the schema, and register this daemon.

        @return: Deferred firing with None; fails with L{RunDatabaseError}
            (one line, no password) if the database cannot be used.
        """
        return Deferred.fromCoroutine(self._open())

    async def _open(self):
        self._pool = adbapi.ConnectionPool(
            "psycopg",
            conninfo=self._dsn,
            application_name=f"car-twisted {self.daemon_id}",
            autocommit=True,
            cp_min=1,
            cp_max=self._pool_size,
            cp_reconnect=True,
            cp_reactor=self._reactor,
        )
        self._pool.start()
        self._starts = _StartBatches(self._reactor, self._commit, self._start_runs)
        try:
            await self._pool.runInteraction(_in_transaction(_migrate))
            await self._pool.runInteraction(self._register)
        except psycopg.Error as e:
            self._pool.close()
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunDatabaseError(
                f"cannot use the run database {redacted(self._dsn)}: {message}"
            ) from e
        except BaseException:
            self._pool.close()
            raise

    # Liveness

    def _register(self, txn) -> None:
        txn.execute(
            "INSERT INTO car_daemons (daemon_id, name, lease) VALUES (%s, %s, make_interval(secs => %s))",
            (self.daemon_id, self.name, self.lease),
        )

    def start_heartbeat(self, interval=None) -> None:
        """
        Heartbeat (and sweep) every C{interval} seconds on the store's clock:
        by default a third of the lease, at most one second, so a dead peer
        is noticed within lease + 1 s.
        """
        interval = interval if interval is not None else min(1.0, self.lease / 3)
        self._beating = self._heartbeat.start(interval, now=False)
        self._beating.addErrback(lambda f: log.failure("the heartbeat stopped", f))

    def _beat(self) -> Deferred:
        d = self.sweep()
        d.addErrback(lambda f: log.failure("car-twisted: heartbeat failed (will retry)", f))
        return d

    def sweep(self) -> Deferred:
        """
        Renew this daemon's lease, forget expired daemons and end their open
        runs C{incomplete} ("daemon lost").

        @return: Deferred firing with the ids of the runs ended.
        """
        return self._pool.runInteraction(_in_transaction(self._sweep))

    def _sweep(self, txn) -> list:
        txn.execute(
            "UPDATE car_daemons d SET heartbeat_at = now() FROM car_daemons old"
            " WHERE d.daemon_id = %s AND old.daemon_id = d.daemon_id"
            " RETURNING old.heartbeat_at + old.lease < now()",
            (self.daemon_id,),
        )
        row = txn.fetchone()
        if row is None:
            log.error(
                "car-twisted: this daemon's lease had expired and its peers ended its "
                "open runs (a pause longer than --lease?); registering again"
            )
            self._register(txn)
            return []
        if row[0]:
            # Out of touch with the database for longer than a lease (an
            # outage?): so were the peers, likely. Let them beat once first.
            return []
        txn.execute("DELETE FROM car_daemons WHERE heartbeat_at + lease < now()")
        return self._end_orphans(txn, "daemon lost")

    def recover(self) -> Deferred:
        """
        At start: end the open runs of this daemon's predecessors (same name)
        C{incomplete} ("daemon restarted"), then sweep. A live peer's runs
        are never touched.

        @return: Deferred firing with how many runs were ended.
        """

        def recover(txn):
            txn.execute(
                "DELETE FROM car_daemons WHERE name = %s AND daemon_id <> %s",
                (self.name, self.daemon_id),
            )
            return len(self._end_orphans(txn, "daemon restarted")) + len(self._sweep(txn))

        return self._pool.runInteraction(_in_transaction(recover))

    def _end_orphans(self, txn, reason: str) -> list:
        """End the open runs whose owner is no registered daemon."""
        txn.execute(
            "SELECT run_id FROM car_runs r WHERE status = 'in_progress'"
            " AND NOT EXISTS (SELECT 1 FROM car_daemons d WHERE d.daemon_id = r.owner)"
            " FOR UPDATE SKIP LOCKED"
        )
        ended = []
        for (run_id,) in txn.fetchall():
            run_id = to_text(run_id)
            self._end_run(txn, run_id, ended_record("incomplete", reason=reason), "")
            ended.append(run_id)
        if ended:
            # One line, not one per run: a lost daemon may leave thousands.
            log.info("{count} runs ended incomplete: {reason}", count=len(ended), reason=reason)
        return ended

    def leave(self) -> Deferred:
        """
        Stop heartbeating and watching (the daemon is stopping).

        @return: Deferred firing once the beat in progress, if any, is done.
        """
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._heartbeat.running:
            self._heartbeat.stop()
            return self._beating
        return succeed(None)

    def watch(self, on_change, on_reconnect) -> Deferred:
        """
        Listen for the run changes other daemons (and sweeps) commit:
        C{on_change(run_id)} for each, C{on_reconnect()} after the listening
        connection was lost and is back. Stops when the store closes.

        @return: Deferred firing once listening.
        """

        def changed(run_id, cursor, origin):
            if origin != self.daemon_id:
                on_change(run_id)

        self._listener = RunChangeListener(
            self._reactor,
            self._dsn,
            CHANNEL,
            f"car-twisted {self.daemon_id} listener",
            changed,
            on_reconnect,
        )
        return self._listener.start()

    # Ownership

    def release(self, run_id):
        return self._write(run_id, self._release, run_id)

    def _release(self, txn, run_id):
        txn.execute(
            "UPDATE car_runs SET detached = true"
            " WHERE run_id = %s AND owner = %s AND status = 'in_progress'",
            (to_bytes(run_id), self.daemon_id),
        )

    def adopt(self, run_id):
        return self._write(run_id, _in_transaction(self._adopt), run_id)

    def _adopt(self, txn, run_id) -> bool:
        txn.execute(
            "UPDATE car_runs r SET owner = %s, detached = false"
            " WHERE run_id = %s AND status = 'in_progress' AND (owner = %s OR detached"
            " OR NOT EXISTS (SELECT 1 FROM car_daemons d WHERE d.daemon_id = r.owner))"
            " RETURNING record_count",
            (self.daemon_id, to_bytes(run_id), self.daemon_id),
        )
        row = txn.fetchone()
        if row is None:
            return False
        txn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, notice(run_id, row[0], self.daemon_id)))
        return True

    def owns(self, run_id):
        return self._read(self._after_run(run_id), self._owns, run_id)

    def _owns(self, txn, run_id) -> bool:
        txn.execute("SELECT owner = %s FROM car_runs WHERE run_id = %s", (self.daemon_id, to_bytes(run_id)))
        row = txn.fetchone()
        return bool(row and row[0])

    # Writes

    def _write(self, run_id: str, work, *args) -> Deferred:
        """
        Run C{work(txn, *args)} once earlier calls on C{run_id} settled. A
        database error (the connection lost, the server down) fails it with
        L{StoreWriteFailed}: the statement, a transaction of its own, was
        rolled back.
        """
        d = self._after_writes_on(run_id, lambda: self._commit(1, work, *args))
        d.addErrback(_write_failed)
        return d

    def _commit(self, writes: int, work, *args) -> Deferred:
        """C{work(txn, *args)} on a pool connection, reported to L{on_commit}."""
        began = time.monotonic()

        def committed(result):
            self.on_commit(writes, time.monotonic() - began)
            return result

        return self._pool.runInteraction(work, *args).addCallback(committed)

    def _after_writes_on(self, run_id: str, write) -> Deferred:
        """Call C{write()} (returning a Deferred) once earlier calls on C{run_id} settled."""
        if self._closing is not None:
            return fail(RuntimeError("the run store is closed"))
        before = self._tails.get(run_id)
        tail = _Tail()
        self._tails[run_id] = tail
        self._writes.add(tail)

        async def write_after():
            try:
                if before is not None:
                    await before.wait()
                return await write()
            finally:
                if self._tails.get(run_id) is tail:
                    del self._tails[run_id]
                self._writes.discard(tail)
                tail.settle()

        return Deferred.fromCoroutine(write_after())

    def start_run(self, started):
        started = dict(started)
        d = self._after_writes_on(started["run_id"], lambda: self._starts.add(started))
        d.addErrback(_write_failed)
        return d

    def _start_runs(self, txn, batch) -> set:
        """Insert a batch of runs in one statement; the ids of those created."""
        txn.execute(START_RUNS, {
            "run_ids": [to_bytes(s["run_id"]) for s in batch],
            "agent_ids": [to_bytes(s["agent_id"]) for s in batch],
            "intents": [to_bytes(s["intent"]) for s in batch],
            "started_ats": [to_bytes(s["started_at"]) for s in batch],
            "bodies": [_encode(s) for s in batch],
            "owner": self.daemon_id,
        })  # fmt: skip
        return {bytes(run_id) for (run_id,) in txn.fetchall()}

    def _append_turns(self, txn, run_id, bodies, max_turns):
        txn.execute(APPEND_TURNS, {
            "run_id": to_bytes(run_id), "count": len(bodies), "max": max_turns, "bodies": bodies,
            "channel": CHANNEL, "run_json": json.dumps(run_id), "origin_json": json.dumps(self.daemon_id),
        })  # fmt: skip
        row = txn.fetchone()
        if row is None:
            raise RunNotFound(run_id)
        status, base, _ = row
        if status != "in_progress":
            raise RunTerminal(run_id)
        if base + len(bodies) > max_turns:
            raise TurnLimitReached(run_id)
        return base

    def append_turns(self, run_id, turns, max_turns):
        stamped = [dict(t) for t in turns]
        d = self._write(
            run_id, self._append_turns, run_id, [_encode(t) for t in stamped], max_turns
        )

        def indexed(base):
            for offset, record in enumerate(stamped):
                record["index"] = base + offset
            return [dict(record) for record in stamped]

        return d.addCallback(indexed)

    def end_run(self, run_id, ended):
        return self._write(run_id, self._end_run, run_id, dict(ended), self.daemon_id)

    def end_own_run(self, run_id, ended):
        return self._write(
            run_id, self._end_run, run_id, dict(ended), self.daemon_id, self.daemon_id
        )

    @staticmethod
    def _end_run(txn, run_id, ended, origin, owner=None):
        status = status_of(ended)
        txn.execute(END_RUN, {
            "run_id": to_bytes(run_id), "body": _encode(ended), "status": status,
            "outcome_status": ended["outcome"]["status"] if status == "completed" else None,
            "ended_at": to_bytes(ended["ended_at"]), "owner": owner,
            "channel": CHANNEL, "run_json": json.dumps(run_id), "origin_json": json.dumps(origin),
        })  # fmt: skip
        row = txn.fetchone()
        if row is None:
            raise RunNotFound(run_id)
        if row[0] != "in_progress":
            raise RunTerminal(run_id)
        if owner is not None and row[1] != owner:
            raise RunAdopted(run_id)

    def prune_runs(self, ended_before, limit):
        d = self._after_writes_on(
            _PRUNE_KEY, lambda: self._commit(1, self._prune_runs, to_bytes(ended_before), limit)
        )
        d.addErrback(_write_failed)
        return d

    @staticmethod
    def _prune_runs(txn, before, limit) -> list:
        txn.execute(PRUNE_RUNS, {"before": before, "limit": limit})
        return [to_text(run_id) for (run_id,) in txn.fetchall()]

    # Reads

    def _read(self, after, work, *args) -> Deferred:
        """Run C{work(txn, *args)} once the writes in C{after} settled."""
        if self._closing is not None:
            return fail(RuntimeError("the run store is closed"))

        async def read():
            for tail in after:
                await tail.wait()
            return await self._pool.runInteraction(work, *args)

        d = Deferred.fromCoroutine(read())
        self._reads.add(d)
        d.addBoth(lambda result: (self._reads.discard(d), result)[1])
        return d

    def _after_run(self, run_id) -> list:
        tail = self._tails.get(run_id)
        return [tail] if tail is not None else []

    def get_run(self, run_id):
        return self._read(self._after_run(run_id), self._get_run, run_id)

    @staticmethod
    def _get_run(txn, run_id):
        txn.execute(f"SELECT {_SUMMARY_COLUMNS} FROM car_runs WHERE run_id = %s", (to_bytes(run_id),))
        row = txn.fetchone()
        return None if row is None else summary_from_row(row)

    def read_records(self, run_id, cursor, limit):
        return self._read(self._after_run(run_id), self._read_records, run_id, cursor, limit)

    @staticmethod
    def _read_records(txn, run_id, cursor, limit):
        txn.execute("SELECT seq FROM car_runs WHERE run_id = %s", (to_bytes(run_id),))
        row = txn.fetchone()
        if row is None:
            raise RunNotFound(run_id)
        txn.execute(
            "SELECT body FROM car_records WHERE run = %s AND position >= %s"
            " ORDER BY position LIMIT %s",
            (row[0], cursor, limit),
        )
        records = [json.loads(body) for (body,) in txn.fetchall()]
        return records, cursor + len(records)

    def list_runs(self, agent_id, cursor, limit, status):
        try:
            below = parse_seq_cursor(cursor)
        except ValueError as e:
            return fail(e)
        return self._read(list(self._writes), self._list_runs, agent_id, below, limit, status)

    @staticmethod
    def _list_runs(txn, agent_id, below, limit, status):
        where, args = "seq < %s", [below]
        if agent_id is not None:
            where += " AND agent_id = %s"
            args.append(to_bytes(agent_id))
        if status is not None:
            where += " AND status = %s"
            args.append(status)
        txn.execute(
            f"SELECT seq, {_SUMMARY_COLUMNS} FROM car_runs WHERE {where}"
            " ORDER BY seq DESC LIMIT %s",
            (*args, limit + 1),
        )
        rows = txn.fetchall()
        page = [summary_from_row(row[1:]) for row in rows[:limit]]
        next_cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
        return page, next_cursor

    def count_prunable(self, ended_before):
        return self._read(list(self._writes), self._count_prunable, to_bytes(ended_before))

    @staticmethod
    def _count_prunable(txn, before) -> int:
        txn.execute(
            "SELECT count(*) FROM car_runs WHERE status <> 'in_progress' AND ended_at < %s",
            (before,),
        )
        return txn.fetchone()[0]

    def open_runs(self):
        return self._read(list(self._writes), self._open_runs)

    @staticmethod
    def _open_runs(txn):
        txn.execute(f"SELECT {_SUMMARY_COLUMNS} FROM car_runs WHERE status = 'in_progress'")
        return [summary_from_row(row) for row in txn.fetchall()]

    # Closing

    def close(self):
        """
        Stop heartbeating, finish pending calls and close the pool. The
        daemon's row stays: its open runs are ended by its next start or,
        once its lease expires, by a peer.
        """
        if self._closing is None:
            self._closing = Deferred.fromCoroutine(self._close())
        closed = Deferred()
        self._closing.addBoth(lambda result: (closed.callback(result), result)[1])
        return closed

    async def _close(self):
        await self.leave()
        await DeferredList([tail.wait() for tail in self._writes] + list(self._reads))
        self._pool.close()
