"""
A run store in one SQLite database, for deployments that record many runs
per second or keep millions of them.

One writer thread owns the write connection and commits in batches (group
commit): the writes of a reactor turn are handed to it together at the
turn's end, and every write that arrives while a commit is in flight joins
the next transaction. A refused write fails only its caller: each write checks before
it writes, and a write that breaks partway has its batch replayed with a
savepoint per write. Reads run on a small thread pool with their own connections. The
database is in WAL mode with C{synchronous=FULL}: a write's Deferred fires
after the commit holding it is on stable storage.
"""

import fcntl
import json
import os
import sqlite3
import threading
import time
from functools import lru_cache

import orjson

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from car_twisted.interfaces import (
    IRunStore,
    RunExists,
    RunNotFound,
    RunStoreError,
    RunTerminal,
    StoreWriteFailed,
    TurnLimitReached,
    status_of,
)
from car_twisted.store.cursors import parse_seq_cursor
from car_twisted.store.pending import PendingWrite
from car_twisted.store.rows import summary_from_row, to_bytes, to_text

log = Logger()

DATABASE_NAME = "runs.sqlite3"
#: Beside the database, C{flock()}ed by the one store using it.
LOCK_SUFFIX = ".lock"
#: Databases up to this size get the whole-file integrity check at open;
#: larger ones only their runs table and its indexes (docs/storage.md).
FULL_CHECK_BYTES = 256 * 2**20

#: The schema version this code writes and understands (C{PRAGMA user_version}).
SCHEMA_VERSION = 2

# Ids and texts come from the network and may hold lone surrogates, which
# UTF-8 cannot encode: they are kept as BLOBs of their surrogate-passing
# UTF-8, a one-to-one mapping of every Python string.
SCHEMA = """
CREATE TABLE runs (
    seq INTEGER PRIMARY KEY,
    run_id BLOB NOT NULL UNIQUE,
    agent_id BLOB NOT NULL,
    intent BLOB NOT NULL,
    started_at BLOB NOT NULL,
    ended_at BLOB,
    status TEXT NOT NULL,
    outcome_status TEXT,
    turn_count INTEGER NOT NULL,
    record_count INTEGER NOT NULL
);
CREATE INDEX runs_by_agent ON runs (agent_id, seq);
CREATE INDEX runs_ended_by_agent ON runs (agent_id, status, seq) WHERE status != 'in_progress';
CREATE INDEX runs_open ON runs (seq, agent_id) WHERE status = 'in_progress';
CREATE TABLE records (
    run INTEGER NOT NULL REFERENCES runs (seq),
    position INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (run, position)
) WITHOUT ROWID;
"""

#: The statements bringing a database of each older version to the next
#: one, run at open in the opening transaction (docs/storage.md, "Schema
#: versions"). Version 2: a start no longer writes a status index entry,
#: only an end does; open runs carry their agent for a filtered listing.
MIGRATIONS = {
    1: """
DROP INDEX runs_by_agent_status;
DROP INDEX runs_open;
CREATE INDEX runs_ended_by_agent ON runs (agent_id, status, seq) WHERE status != 'in_progress';
CREATE INDEX runs_open ON runs (seq, agent_id) WHERE status = 'in_progress';
""",
}

_SUMMARY_COLUMNS = (
    "run_id, agent_id, intent, started_at, ended_at, status, outcome_status, turn_count"
)
LIST_RUNS = f"""
    SELECT seq, {_SUMMARY_COLUMNS} FROM runs
    WHERE agent_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?
"""
LIST_ENDED_RUNS = f"""
    SELECT seq, {_SUMMARY_COLUMNS} FROM runs
    WHERE agent_id = ? AND status = ? AND status != 'in_progress' AND seq < ?
    ORDER BY seq DESC LIMIT ?
"""
# The open runs of all agents are few (at most the live ones, and those a
# crash left), an agent's runs may be millions: search the former.
LIST_OPEN_RUNS = f"""
    SELECT seq, {_SUMMARY_COLUMNS} FROM runs INDEXED BY runs_open
    WHERE agent_id = ? AND status = 'in_progress' AND seq < ? ORDER BY seq DESC LIMIT ?
"""
LIST_ALL_RUNS = f"""
    SELECT seq, {_SUMMARY_COLUMNS} FROM runs WHERE seq < ? ORDER BY seq DESC LIMIT ?
"""
LIST_ALL_RUNS_WITH_STATUS = f"""
    SELECT seq, {_SUMMARY_COLUMNS} FROM runs
    WHERE status = ? AND seq < ? ORDER BY seq DESC LIMIT ?
"""
OPEN_RUNS = f"SELECT {_SUMMARY_COLUMNS} FROM runs WHERE status = 'in_progress'"
PRUNABLE = """
    SELECT seq, run_id FROM runs
    WHERE status != 'in_progress' AND ended_at < ? ORDER BY seq LIMIT ?
"""
# Not through runs_ended_by_agent, which SQLite would pick: a row lookup per
# ended run, three times slower than reading the table (0.3 vs 0.1 s at a
# million runs).
COUNT_PRUNABLE = (
    "SELECT count(*) FROM runs NOT INDEXED WHERE status != 'in_progress' AND ended_at < ?"
)
READ_RECORDS = """
    SELECT body FROM records WHERE run = ? AND position >= ? ORDER BY position LIMIT ?
"""

#: The key prunes are ordered under (no run id can be it: ids are at most 256 characters).
_PRUNE_KEY = "\0prune" * 64
_READERS = 2
#: Writes committed by one transaction at most: a burst (the recovery's
#: ends) is committed in pieces, so the WAL is checkpointed between them.
_WRITES_PER_COMMIT = 4096
#: Writes applied together by one statement at most (SQLite allows 32,766
#: parameters).
_WRITES_PER_STATEMENT = 256


class RunDatabaseError(Exception):
    """The run database cannot be used; the message names the file and why."""


def _query(db, query, arguments) -> list:
    return db.execute(query, arguments).fetchall()


def _encode(record: dict) -> str:
    """
    A record as compact JSON text. Lone surrogates (which orjson refuses)
    and integers beyond 64 bits are written by the standard library, as
    escapes and exactly.
    """
    try:
        return orjson.dumps(record).decode()
    except TypeError:
        return json.dumps(record, separators=(",", ":"))


def _start_row(started: dict) -> tuple:
    """The C{runs} columns of a started run, and its record's body."""
    return (
        to_bytes(started["run_id"]),
        to_bytes(started["agent_id"]),
        to_bytes(started["intent"]),
        to_bytes(started["started_at"]),
        _encode(started),
    )


def _values(row: str, count: int) -> str:
    return ", ".join([row] * count)


@lru_cache(maxsize=None)
def _insert_runs_sql(count: int) -> str:
    return (
        "INSERT INTO runs (run_id, agent_id, intent, started_at, status, turn_count,"
        f" record_count) VALUES {_values('(?, ?, ?, ?, ?, 0, 1)', count)}"
    )


@lru_cache(maxsize=None)
def _insert_records_sql(count: int) -> str:
    return f"INSERT INTO records (run, position, body) VALUES {_values('(?, ?, ?)', count)}"


@lru_cache(maxsize=None)
def _find_runs_sql(count: int) -> str:
    return (
        "SELECT run_id, seq, status, turn_count, record_count FROM runs"
        f" WHERE run_id IN ({_values('?', count)})"
    )


@lru_cache(maxsize=None)
def _update_runs_sql(count: int) -> str:
    return (
        "UPDATE runs SET status = v.column2, outcome_status = v.column3,"
        " ended_at = v.column4, turn_count = v.column5, record_count = v.column6"
        f" FROM (VALUES {_values('(?, ?, ?, ?, ?, ?)', count)}) AS v"
        " WHERE runs.seq = v.column1"
    )


def _insert_records(db, records: list) -> None:
    """Insert C{(run, position, body)} rows, a statement per
    L{_WRITES_PER_STATEMENT}."""
    for i in range(0, len(records), _WRITES_PER_STATEMENT):
        chunk = records[i : i + _WRITES_PER_STATEMENT]
        db.execute(_insert_records_sql(len(chunk)), [v for record in chunk for v in record])


def _start_runs(db, writes: list) -> list:
    """
    Insert the runs of start C{writes}, and their started records, with one
    statement per table.

    @return: their outcomes.
    """
    rows = [_start_row(write.payload) for write in writes]
    try:
        last = db.execute(
            _insert_runs_sql(len(rows)),
            [v for row in rows for v in (*row[:4], "in_progress")],
        ).lastrowid
    except sqlite3.IntegrityError:
        # The INSERT wrote nothing.
        if len(writes) > 1:
            return [_start_runs(db, [write])[0] for write in writes]
        if db.execute("SELECT 1 FROM runs WHERE run_id = ?", rows[0][:1]).fetchone():
            return [Failure(RunExists(writes[0].run_id))]
        raise
    # A multi-row INSERT gives each row the next sequence number in turn
    # (seq is the rowid and never reaches its maximum).
    first = last - len(rows) + 1
    _insert_records(db, [(first + i, 0, row[4]) for i, row in enumerate(rows)])
    return [None] * len(rows)


def _extend_runs(db, writes: list, extend) -> list:
    """
    Apply C{writes} to open runs with three statements, whatever their
    number: one finds their runs, one inserts their records, one updates
    the runs' rows. C{extend(write, run)} checks one write against its
    run's row C{[seq, status, outcome_status, ended_at, turn_count,
    record_count]}, updates that row and returns the write's records;
    it raises a L{RunStoreError} to refuse the write alone.

    @return: their outcomes.
    """
    blobs = [to_bytes(write.run_id) for write in writes]
    runs = {
        run_id: [seq, status, None, None, turns, position]
        for run_id, seq, status, turns, position in db.execute(
            _find_runs_sql(len(writes)), blobs
        )
    }
    outcomes, records, touched = [], [], {}
    for write, blob in zip(writes, blobs):
        run = runs.get(blob)
        try:
            if run is None:
                raise RunNotFound(write.run_id)
            if run[1] != "in_progress":
                raise RunTerminal(write.run_id)
            outcome, added = extend(write, run)
        except RunStoreError:
            outcomes.append(Failure())
            continue
        records += added
        touched[run[0]] = run
        outcomes.append(outcome)
    if touched:
        _insert_records(db, records)
        db.execute(
            _update_runs_sql(len(touched)), [v for run in touched.values() for v in run]
        )
    return outcomes


def _append(write, run):
    turns, max_turns = write.payload
    base, position = run[4], run[5]
    if base + len(turns) > max_turns:
        raise TurnLimitReached(write.run_id)
    run[4:] = base + len(turns), position + len(turns)
    seq = run[0]
    stamped = [dict(turn, index=base + i) for i, turn in enumerate(turns)]
    return stamped, [(seq, position + i, _encode(record)) for i, record in enumerate(stamped)]


def _end(write, run):
    ended, status, outcome_status = write.payload
    seq, position = run[0], run[5]
    run[1:4] = status, outcome_status, to_bytes(ended["ended_at"])
    run[5] = position + 1
    return None, [(seq, position, _encode(ended))]


def _append_turns(db, writes: list) -> list:
    """Append the turns of C{writes}; their outcomes (each the records it
    stamped)."""
    return _extend_runs(db, writes, _append)


def _end_runs(db, writes: list) -> list:
    """End the runs of C{writes}; their outcomes."""
    return _extend_runs(db, writes, _end)


def _prune_runs(db, writes: list) -> list:
    """
    Delete the runs of C{writes} (each payload a list of run seqs) and
    their records; each outcome the seqs still there to delete (ended runs
    never change, but a concurrent prune may have taken some).
    """
    outcomes = []
    for write in writes:
        seqs = write.payload
        marks = ", ".join("?" * len(seqs))
        deleted = {seq for (seq,) in db.execute(f"SELECT seq FROM runs WHERE seq IN ({marks})", seqs)}
        db.execute(f"DELETE FROM records WHERE run IN ({marks})", seqs)
        db.execute(f"DELETE FROM runs WHERE seq IN ({marks})", seqs)
        outcomes.append(deleted)
    return outcomes


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: this module issues BEGIN / COMMIT itself.
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout = 10000")
    return connection


def lock_database(path: str) -> int:
    """
    Take the exclusive lock of the run database at C{path}: an C{flock} on
    C{<path>.lock}, held while the returned descriptor stays open. SQLite's
    own locks only serialize transactions: a second daemon would get in
    and end the first one's live runs as left open by a crash.

    @raise RunDatabaseError: another store (another daemon) holds it.
    """
    lock_path = path + LOCK_SUFFIX
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise RunDatabaseError(f"cannot open the lock file {lock_path}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise RunDatabaseError(
                f"the run database {path} is in use by another daemon (it holds "
                f"{lock_path}); stop that daemon or choose another --data-dir"
            ) from e
        raise RunDatabaseError(f"cannot lock {lock_path}: {e}") from e
    return fd


def open_database(path: str) -> sqlite3.Connection:
    """
    Open (creating it, mode 0600, if absent) the run database at C{path} for
    writing, and bring a fresh one to the current schema.

    @raise RunDatabaseError: the file is not a run database this code can
        use, or cannot be opened.
    """
    try:
        _create(path)
        connection = _connect(path)
    except (OSError, sqlite3.Error) as e:
        raise RunDatabaseError(f"cannot open the run database {path}: {e}") from e
    try:
        _prepare(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


def _create(path: str) -> None:
    """Create the database file private from the start, its entry durable."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _prepare(connection: sqlite3.Connection, path: str) -> None:
    try:
        connection.execute("BEGIN IMMEDIATE")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        migrated = False
        if version == 0:
            tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise RunDatabaseError(
                    f"{path} is an SQLite database but not a car-twisted run "
                    "database (it has tables and no schema version); move it "
                    "away or choose another --data-dir"
                )
            _run_script(connection, SCHEMA)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version > SCHEMA_VERSION:
            raise RunDatabaseError(
                f"the run database {path} has schema version {version}, newer "
                f"than the {SCHEMA_VERSION} this car-twisted understands: it was "
                "written by a newer release; run that release or upgrade"
            )
        else:
            _check_integrity(connection, path)
            if version < SCHEMA_VERSION:
                _migrate(connection, version)
                migrated = True
                log.info(
                    "migrated the run database {path} from schema version {old} to {new}",
                    path=path, old=version, new=SCHEMA_VERSION,
                )  # fmt: skip
        connection.execute("COMMIT")
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RunDatabaseError(f"the run database {path} cannot use WAL mode ({mode})")
        connection.execute("PRAGMA synchronous = FULL")
        if migrated:
            # The new indexes are all in the WAL (35 MiB at a million
            # runs): move them into the database now, not in the first
            # commit, and keep the WAL the readers search short.
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as e:
        raise RunDatabaseError(f"cannot open the run database {path}: {e}") from e


def _run_script(connection: sqlite3.Connection, script: str) -> None:
    """Execute C{script}'s statements in the open transaction (unlike
    C{executescript}, which would commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            connection.execute(statement)


def _migrate(connection: sqlite3.Connection, version: int) -> None:
    """
    Bring a database of schema C{version} to L{SCHEMA_VERSION} inside the
    opening transaction: a crash or an error before its commit leaves the
    database as it was, at its old version, to be migrated at the next open.
    """
    for old in range(version, SCHEMA_VERSION):
        _run_script(connection, MIGRATIONS[old])
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _check_integrity(connection: sqlite3.Connection, path: str) -> None:
    """
    Refuse a database with a damaged page, which would otherwise fail
    calls once the daemon listens. C{quick_check} reads every page it
    checks, so a large database has only what every call reads checked:
    the runs table and its indexes, not the records (docs/storage.md).
    """
    scope = "" if os.path.getsize(path) <= FULL_CHECK_BYTES else "(runs)"
    try:
        problem = connection.execute(f"PRAGMA quick_check{scope}").fetchall()[0][0]
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as e:
        # Some damage (a page of the wrong type) fails the check itself.
        problem = str(e)
    if problem != "ok":
        problem = " ".join(problem.split())
        raise RunDatabaseError(
            f"the run database {path} is damaged (quick_check: {problem}); "
            "restore it from a backup or move it away"
        )


class _WriteBroke(Exception):
    """A write failed partway through; its batch must be replayed isolated."""


class _Write(PendingWrite):
    """One write operation waiting for (or past) the commit that holds it."""

    __slots__ = ("run_id", "apply", "payload")

    def __init__(self, run_id, apply, payload):
        super().__init__()
        self.run_id = run_id
        # apply(connection, writes) -> outcomes, on the writer thread: applies
        # consecutive writes of one kind together, each write's payload its input.
        self.apply = apply
        self.payload = payload


def _groups(batch: list):
    """C{batch} cut into runs of consecutive writes of one kind, each at
    most L{_WRITES_PER_STATEMENT} long."""
    group = []
    for write in batch:
        if group and (write.apply is not group[0].apply or len(group) == _WRITES_PER_STATEMENT):
            yield group
            group = []
        group.append(write)
    if group:
        yield group


@implementer(IRunStore)
class SQLiteRunStore:
    """
    Runs in C{<data_dir>/runs.sqlite3}.

    L{open} opens (or creates) the database, before the daemon accepts
    connections: a database that cannot be used, or that another store
    holds, fails it with L{RunDatabaseError}. The store holds the
    database's lock from then until it is closed.

    @param reactor: where results are delivered.
    @ivar commits: transactions the writer has committed (one per batch).
    @ivar on_commit: C{f(writes, seconds)}, called on the reactor after
        each batch with its size and how long it took (the daemon's metrics).
    """

    def __init__(self, data_dir: str, reactor):
        self._reactor = reactor
        self._data_dir = data_dir
        self.path = os.path.join(data_dir, DATABASE_NAME)
        self._lock = None
        self._writer = None
        self.commits = 0
        self.on_commit = lambda writes, seconds: None
        # Writes issued in this reactor turn, handed to the writer at its end.
        self._queued = []
        self._hand_over_call = None
        # Writes handed over, taken in batches by the writer.
        self._pending = []
        self._wake = threading.Condition(threading.RLock())
        self._stopping = False
        self._stopped = Deferred()
        self._thread = threading.Thread(
            target=self._write_loop, name=f"car-sqlite-writer {self.path}", daemon=True
        )
        self._readers = ThreadPool(0, _READERS, name=f"car-sqlite-reader {self.path}")
        self._reader_local = threading.local()
        self._reader_connections = []
        self._reader_lock = threading.Lock()
        self._reads = set()  # Deferreds of reads in flight
        self._last_write = {}  # run_id -> newest _Write issued on that run
        self._newest_write = None
        self._closing = None

    def open(self) -> Deferred:
        """Open (or create) the database, then start the writer and readers."""
        try:
            os.makedirs(self._data_dir, mode=0o700, exist_ok=True)
            self._lock = lock_database(self.path)
            self._writer = open_database(self.path)
        except (OSError, RunDatabaseError) as e:
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
            return fail(e)
        self._thread.start()
        self._readers.start()
        return succeed(None)

    # Writes

    def _submit(self, run_id: str, apply, payload) -> Deferred:
        if self._closing is not None:
            return fail(RuntimeError(f"the run store {self.path} is closed"))
        write = _Write(run_id, apply, payload)
        self._last_write[run_id] = write
        self._newest_write = write
        self._queued.append(write)
        if self._hand_over_call is None:
            self._hand_over_call = self._reactor.callLater(0, self._hand_over)
        return write.deferred

    def _hand_over(self) -> None:
        """
        Give the writer the writes of the reactor turn just ended, at once:
        one wake-up of the writer thread per turn, not one per write, and a
        batch holds every write that turn's readable connections brought.
        """
        self._hand_over_call = None
        queued, self._queued = self._queued, []
        with self._wake:
            self._pending += queued
            self._wake.notify()

    def start_run(self, started):
        return self._submit(started["run_id"], _start_runs, dict(started))

    def append_turns(self, run_id, turns, max_turns):
        return self._submit(run_id, _append_turns, ([dict(t) for t in turns], max_turns))

    def end_run(self, run_id, ended):
        status = status_of(ended)
        outcome_status = ended["outcome"]["status"] if status == "completed" else None
        return self._submit(run_id, _end_runs, (dict(ended), status, outcome_status))

    def _write_loop(self) -> None:
        """The writer thread: commit whatever is pending, one batch at a time."""
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                pending, self._pending = self._pending, []
            if not pending:
                break
            for i in range(0, len(pending), _WRITES_PER_COMMIT):
                batch = pending[i : i + _WRITES_PER_COMMIT]
                started = time.monotonic()
                outcomes = self._commit(batch)
                self._reactor.callFromThread(self._settle, batch, outcomes, time.monotonic() - started)
        self._writer.close()
        self._reactor.callFromThread(self._stopped.callback, None)

    def _commit(self, batch) -> list:
        """Apply a batch in one transaction; one result or Failure per write."""
        try:
            try:
                outcomes = self._transaction(batch, isolated=False)
            except _WriteBroke:
                outcomes = self._transaction(batch, isolated=True)
        except Exception:
            # The writer thread must outlive whatever one batch does.
            outcomes = Failure()
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
        if not isinstance(outcomes, list):
            return [outcomes] * len(batch)
        self.commits += 1
        return outcomes

    def _transaction(self, batch, isolated: bool):
        """
        Apply every write of C{batch}, then commit.

        Consecutive writes of one kind are applied together, each refused
        alone (its outcome a L{RunStoreError}) before anything of it is
        written. Any other error may have left part of a write behind:
        unless C{isolated} (each write alone, in its own savepoint), the
        transaction is rolled back and L{_WriteBroke} raised so the batch
        can be replayed isolated.

        @return: the outcomes, or a Failure if the commit itself failed.
        """
        db = self._writer
        outcomes = []
        try:
            db.execute("BEGIN IMMEDIATE")
            if isolated:
                for write in batch:
                    db.execute("SAVEPOINT write")
                    try:
                        outcomes += write.apply(db, [write])
                    except Exception:
                        outcomes.append(Failure())
                        db.execute("ROLLBACK TO write")
                    db.execute("RELEASE write")
            else:
                for group in _groups(batch):
                    try:
                        outcomes += group[0].apply(db, group)
                    except Exception:
                        raise _WriteBroke()
            db.execute("COMMIT")
        except _WriteBroke:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        except sqlite3.Error:
            failure = Failure()
            if db.in_transaction:
                db.execute("ROLLBACK")
            return failure
        return outcomes

    def _settle(self, batch, outcomes, seconds) -> None:
        """On the reactor: hand each write of a committed batch its outcome."""
        self.on_commit(len(batch), seconds)
        last_write = self._last_write
        for write, outcome in zip(batch, outcomes):
            if last_write.get(write.run_id) is write:
                del last_write[write.run_id]
            if self._newest_write is write:
                self._newest_write = None
            if isinstance(outcome, Failure) and outcome.check(sqlite3.Error):
                # Rolled back, so nothing of it was kept: the caller may retry.
                outcome = Failure(StoreWriteFailed(str(outcome.value)))
            write.settle(outcome)

    # Reads

    def _read(self, after, query, *args) -> Deferred:
        """
        Run C{query(connection, *args)} on a reader thread once the write
        C{after} (if any) is settled, so reads see the writes issued before
        them.
        """
        if self._closing is not None:
            return fail(RuntimeError(f"the run store {self.path} is closed"))

        async def read():
            if after is not None:
                await after.wait()
            return await deferToThreadPool(
                self._reactor, self._readers, self._in_read_transaction, query, args
            )

        d = Deferred.fromCoroutine(read())
        self._reads.add(d)

        def done(result):
            self._reads.discard(d)
            return result

        return d.addBoth(done)

    def _in_read_transaction(self, query, args):
        connection = getattr(self._reader_local, "connection", None)
        if connection is None:
            connection = _connect(self.path)
            connection.execute("PRAGMA query_only = ON")
            with self._reader_lock:
                self._reader_connections.append(connection)
            self._reader_local.connection = connection
        connection.execute("BEGIN")
        try:
            return query(connection, *args)
        finally:
            connection.execute("COMMIT")

    def get_run(self, run_id):
        return self._read(self._last_write.get(run_id), self._get_run, run_id)

    @staticmethod
    def _get_run(db, run_id):
        row = db.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM runs WHERE run_id = ?", (to_bytes(run_id),)
        ).fetchone()
        return None if row is None else summary_from_row(row)

    def read_records(self, run_id, cursor, limit):
        return self._read(
            self._last_write.get(run_id), self._read_records, run_id, cursor, limit
        )

    @staticmethod
    def _read_records(db, run_id, cursor, limit):
        row = db.execute("SELECT seq FROM runs WHERE run_id = ?", (to_bytes(run_id),)).fetchone()
        if row is None:
            raise RunNotFound(run_id)
        records = [
            json.loads(body)
            for (body,) in db.execute(READ_RECORDS, (row[0], cursor, limit))
        ]
        return records, cursor + len(records)

    def list_runs(self, agent_id, cursor, limit, status):
        try:
            below = parse_seq_cursor(cursor)
        except ValueError as e:
            return fail(e)
        agent = None if agent_id is None else to_bytes(agent_id)
        return self._read(self._newest_write, self._list_runs, agent, below, limit, status)

    @staticmethod
    def _list_runs(db, agent, below, limit, status):
        if agent is None:
            query, args = (LIST_ALL_RUNS, ()) if status is None else (LIST_ALL_RUNS_WITH_STATUS, (status,))
        elif status is None:
            query, args = LIST_RUNS, (agent,)
        elif status == "in_progress":
            query, args = LIST_OPEN_RUNS, (agent,)
        else:
            query, args = LIST_ENDED_RUNS, (agent, status)
        rows = db.execute(query, (*args, below, limit + 1)).fetchall()
        page = [summary_from_row(row[1:]) for row in rows[:limit]]
        next_cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
        return page, next_cursor

    def open_runs(self):
        return self._read(self._newest_write, self._open_runs)

    @staticmethod
    def _open_runs(db):
        return [summary_from_row(row) for row in db.execute(OPEN_RUNS)]

    # Retention

    def prune_runs(self, ended_before, limit):
        """
        Find the runs on a reader (a scan that never holds the write lock),
        then delete them and their records in one short write transaction:
        a run is whole or gone, whatever happens.
        """

        async def prune():
            found = await self._read(
                self._newest_write, _query, PRUNABLE, (to_bytes(ended_before), limit)
            )
            if not found:
                return []
            deleted = await self._submit(_PRUNE_KEY, _prune_runs, [seq for seq, _ in found])
            return [to_text(run_id) for seq, run_id in found if seq in deleted]

        return Deferred.fromCoroutine(prune())

    def count_prunable(self, ended_before):
        d = self._read(self._newest_write, _query, COUNT_PRUNABLE, (to_bytes(ended_before),))
        d.addCallback(lambda rows: rows[0][0])
        return d

    # Closing

    def close(self):
        if self._closing is None:
            self._closing = Deferred.fromCoroutine(self._close())
        closed = Deferred()

        def share(result):
            closed.callback(result)

        self._closing.addBoth(share)
        return closed

    async def _close(self):
        await DeferredList(list(self._reads))
        # The readers are idle now, so joining their threads is immediate.
        self._readers.stop()
        with self._reader_lock:
            for connection in self._reader_connections:
                connection.close()
            self._reader_connections = []
        if self._hand_over_call is not None:
            self._hand_over_call.cancel()
            self._hand_over()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await self._stopped
        self._thread.join()
        os.close(self._lock)
