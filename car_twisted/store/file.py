"""
The file store: one JSONL file per run under C{<data-dir>/runs/}, durable
before it acknowledges, the daemon's default store.

Writes are validated and applied to the in-memory state at call time (so
calls on a run take effect in call order), then queued for the disk. One
batch at a time goes to a disk thread, which writes every queued record to
its run file, appends the batch to the write-ahead journal with one
fdatasync (L{journal}), then appends the agents' index entries. Everything
queued while a batch is on disk forms the next batch: concurrent writers
share flushes. A checkpoint syncs the run files in the background and
drops the journal; start-up replays what a crash left in it.
A write the disk refuses is undone on disk and in memory, with the writes
queued behind it on the same run, and fails with L{StoreWriteFailed}.
Only open runs are held in memory whole; an ended run is kept as offsets
of its entries in its agent's index, and read back from there.
See docs/storage.md.
"""

import bisect
import ctypes
import fcntl
import itertools
import json
import os
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from car_twisted.interfaces import (
    RUN_STATUSES,
    IRunStore,
    RunExists,
    RunNotFound,
    RunSummary,
    RunTerminal,
    StoreWriteFailed,
    TurnLimitReached,
    status_of,
)
from car_twisted import disk
from car_twisted.store import index, journal, naming, runfiles
from car_twisted.store.cursors import parse_position_cursor
from car_twisted.store.pending import PendingWrite
from car_twisted.store.runfiles import RunState

log = Logger()

DURABILITIES = ("fsync", "none")
#: File bytes one read_records page reads at most (one record alone may be
#: more): a full runs.get_trace page, whatever the size of the run.
PAGE_READ_BYTES = 512 * 1024
#: Runs whose record offsets are kept, the most recently read.
OFFSETS_KEPT = 256
#: Agents' indexes kept open to read ended runs back, the most recently read.
INDEX_FILES_KEPT = 64
#: Journal bytes after which the next batch begins a new journal file and
#: the old one is checkpointed.
CHECKPOINT_BYTES = 4 * 1024 * 1024
#: Files the batches keep open between writes, of each kind (the open runs'
#: files, the agents' indexes), the most recently written.
OPEN_FILES_KEPT = 64


#: Per status code, a bytes.translate table keeping that code (as 1) only.
_ONLY = [bytes(int(n == code) for n in range(256)) for code in range(len(RUN_STATUSES))]


class RunIndex:
    """
    Runs by position in start order, and the positions of those kept, in
    all and by status, in arrays (4 bytes a run each). A pruned run leaves
    its position unused, so cursors stay valid.
    """

    def __init__(self):
        self.size = 0
        self._present = array("I")
        self._positions = {status: array("I") for status in RUN_STATUSES}

    def add(self, status: str) -> int:
        """File a run: its position."""
        position = self.size
        self.size += 1
        self._present.append(position)
        self._positions[status].append(position)
        return position

    def fill(self, statuses: bytes) -> None:
        """File runs of these status codes (L{index.STATUS_CODES}), in order."""
        filed = range(self.size, self.size + len(statuses))
        self.size += len(statuses)
        self._present.extend(filed)
        for code, status in enumerate(RUN_STATUSES):
            self._positions[status].extend(itertools.compress(filed, statuses.translate(_ONLY[code])))

    def remove(self, position: int, status: str) -> None:
        """Forget a pruned run."""
        for positions in (self._present, self._positions[status]):
            del positions[bisect.bisect_left(positions, position)]

    def moved(self, position: int, old_status: str, status: str) -> None:
        """Re-file a run whose status changed."""
        positions = self._positions[old_status]
        del positions[bisect.bisect_left(positions, position)]
        bisect.insort(self._positions[status], position)

    def chosen(self, cursor, limit: int, status: Optional[str]):
        """
        The positions of a page, newest first from below C{cursor}, and the
        next cursor; the cost grows with C{limit} only.
        """
        below = parse_position_cursor(cursor, self.size)
        positions = self._present if status is None else self._positions[status]
        end = bisect.bisect_left(positions, below)
        chosen = positions[max(end - limit, 0) : end].tolist()[::-1]
        return chosen, (str(chosen[-1]) if end - limit > 0 else None)


class AgentRuns(RunIndex):
    """
    One agent's runs, the directory they are kept in, and where each run's
    entries lie in the agent's index.
    """

    def __init__(self, agent_id: str, directory: str):
        super().__init__()
        self.agent_id = agent_id
        self.directory = directory
        #: Its place in the store's list of agents, once filed.
        self.number = None
        #: Per run, the offset of its start and end entry in the index (-1:
        #: none, or not known), and its position among every agent's runs.
        self.starts = array("q")
        self.ends = array("q")
        self.overall = array("I")


class EveryRun(RunIndex):
    """Every agent's runs in start order: each run's agent and its position there."""

    def __init__(self):
        super().__init__()
        self.agents = array("I")
        self.locals = array("I")


class RunIds:
    """
    Which positions hold a run id: an open-addressed hash table in arrays
    (8 bytes a slot, at most two thirds of them used, and 8 bytes a run), the
    compact stand-in for a dict of a million ids. Runs are known by the
    64-bit hash of their id (keyed anew by each process), so a lookup names
    candidates, which the caller checks against the runs themselves.
    """

    def __init__(self, hashes: array = None):
        """With C{hashes}, the runs at positions 0, 1, ... have ids of these hashes."""
        self._hashes = array("q") if hashes is None else hashes  # by position
        self._slots = array("q", bytes(8 * self._capacity(len(self._hashes))))  # position + 1; 0 free, -1 freed
        slots, mask = self._slots, len(self._slots) - 1
        for value, run_hash in enumerate(self._hashes, 1):  # _place, inlined: a million runs at start
            slot = run_hash & mask
            while slots[slot]:
                slot = (slot + 1) & mask
            slots[slot] = value
        self._filled = len(self._hashes)  # slots not free

    @staticmethod
    def _capacity(runs: int) -> int:
        """Room for half as many runs again, at least, before the table grows."""
        return max(1024, 1 << (2 * runs).bit_length())

    def add(self, run_hash: int, position: int) -> None:
        if position != len(self._hashes):
            raise ValueError("positions are added in order")
        self._hashes.append(run_hash)
        if 3 * (self._filled + 1) > 2 * len(self._slots):
            self._grow()
        self._place(run_hash, position + 1)

    def find(self, run_hash: int) -> list:
        slots, mask = self._slots, len(self._slots) - 1
        found, slot = [], run_hash & mask
        while (value := slots[slot]) != 0:
            if value > 0 and self._hashes[value - 1] == run_hash:
                found.append(value - 1)
            slot = (slot + 1) & mask
        return found

    def remove(self, run_hash: int, position: int) -> None:
        slots, mask = self._slots, len(self._slots) - 1
        slot = run_hash & mask
        while (value := slots[slot]) != position + 1:
            if value == 0:
                return
            slot = (slot + 1) & mask
        slots[slot] = -1

    def _place(self, run_hash: int, value: int) -> None:
        slots, mask = self._slots, len(self._slots) - 1
        slot = run_hash & mask
        while slots[slot] > 0:
            slot = (slot + 1) & mask
        if slots[slot] == 0:
            self._filled += 1
        slots[slot] = value

    def _grow(self) -> None:
        """Rehash the runs kept (not the freed slots) into a table with room."""
        kept = [value for value in self._slots if value > 0]
        self._slots = array("q", bytes(8 * self._capacity(len(kept))))
        self._filled = 0
        for value in kept:
            self._place(self._hashes[value - 1], value)


@dataclass(eq=False)
class _Offsets:
    """A run's record offsets as last scanned, and one scan at a time."""

    offsets: runfiles.RecordOffsets = field(default_factory=runfiles.RecordOffsets)
    scanning: DeferredLock = field(default_factory=DeferredLock)


@dataclass(eq=False)
class _Write(PendingWrite):
    """Bytes for one run file, queued for the disk thread."""

    run: RunState
    data: bytes
    #: How many records the run file holds before C{data}.
    position: int
    #: What the Deferred fires with once the bytes are durable.
    value: object = None
    #: Set for a start: the agent whose directory holds the new file.
    agent: Optional[AgentRuns] = None
    index_entry: Optional[bytes] = None
    #: Where the disk thread appended C{index_entry} in the agent's index.
    index_offset: Optional[int] = None
    #: The run's summary before this write changed it (None for a start):
    #: restored if the write fails.
    previous: Optional[RunSummary] = None
    #: The run's last write (its end): its file is closed after it.
    last: bool = False

    def __post_init__(self):
        PendingWrite.__init__(self)

    def done(self) -> None:
        """
        Drop what a settled write no longer needs: the run keeps its last
        write (reads check it), so what the write holds is kept per run.
        Its run too: an ended run let go of is freed at once, not by the
        cycle collector (which never sees what start-up froze).
        """
        self.run = self.deferred = self.data = self.value = self.previous = self.index_entry = None


@implementer(IRunStore)
class FileRunStore:
    """
    Runs as JSONL files under C{<data_dir>/runs/}; L{open} loads (and
    repairs) what is on disk.

    @param durability: C{"fsync"} acknowledges writes once on stable
        storage (in the journal); C{"none"} once handed to the operating
        system (they survive a daemon crash, not a power cut), with no
        journal and no fsync.
    @param checkpoint_bytes: how large the journal grows before it is
        checkpointed.
    @ivar on_commit: C{f(writes, seconds)}, called after each batch with its
        size and how long it took (the daemon's metrics).
    """

    def __init__(
        self, reactor, data_dir: str, durability: str = "fsync", checkpoint_bytes: int = CHECKPOINT_BYTES
    ):
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        self._reactor = reactor
        self.data_dir = data_dir
        self.runs_dir = os.path.join(data_dir, naming.RUNS)
        self._sync = durability == "fsync"
        #: The runs held in memory: open, or with a write on its way (the
        #: others are read back from their agent's index).
        self._runs = {}  # run_id -> RunState
        self._held = {}  # position among every agent's runs -> RunState
        self._agents = {}  # agent_id -> AgentRuns
        self._numbered = []  # the AgentRuns by number
        self._everyone = EveryRun()
        self._ids = RunIds()
        self._index_files = index.IndexFiles(INDEX_FILES_KEPT)
        #: Ids of runs found with damaged lines; their readable records are served.
        self.corrupt_runs = set()
        self._offsets = OrderedDict()  # run_id -> _Offsets, least recently read first
        self._queue = []
        self._committing = None  # the Deferred of the batch on disk
        # Files kept open by the batches (one at a time), least recently written first.
        self._run_files = _OpenFiles()  # run file -> [fd, size]
        self._indexes = _OpenFiles()  # agent directory -> [fd of its index, None]
        self._journal = None  # journal.Journal with --durability fsync, once open
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpointing = None  # the Deferred of the checkpoint under way
        self._closed = None
        self.on_commit = lambda writes, seconds: None
        self._lock_fd = None
        self._pool = ThreadPool(minthreads=1, maxthreads=4, name="car-file-store")

    def open(self) -> Deferred:
        """
        Load every agent's index (rebuilding the missing or stale ones), cut
        torn last lines off the runs left open. A bad file is logged and
        skipped, never fatal.
        """
        self._pool.start()
        d = self._in_thread(self._load)
        d.addCallback(self._loaded)

        def failed(failure):
            self._stop_threads()
            return failure

        d.addErrback(failed)
        return d

    def _journal_bytes(self) -> int:
        """What a journal file is preallocated to: room to pass the
        checkpoint size while the previous checkpoint still runs."""
        return max(2 * self._checkpoint_bytes, 64 * 1024)

    def _in_thread(self, f, *args):
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _load(self):
        os.makedirs(self.data_dir, mode=disk.DIR_MODE, exist_ok=True)
        if disk.make_directory(self.runs_dir) and self._sync:
            disk.sync_directory(self.data_dir)
        self._lock_fd = os.open(
            os.path.join(self.runs_dir, naming.LOCK),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
            disk.FILE_MODE,
        )
        try:
            os.fchmod(self._lock_fd, disk.FILE_MODE)  # owner bits a umask took
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"{self.runs_dir} is in use by another daemon")
        findings = index.Findings()
        number = journal.replay(self.runs_dir, self._sync, findings.notes)
        loaded = []
        for entry in sorted(os.scandir(self.runs_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir(follow_symlinks=False):
                findings.notes.append(f"{entry.path}: not an agent directory; ignored")
                continue
            try:
                agent = index.load_agent(entry.path, self._sync, findings)
            except OSError as e:
                findings.notes.append(f"{entry.path}: unreadable ({e}); its runs are not served")
                continue
            if agent is not None:
                loaded.append(agent)
        self._file_loaded(_without_duplicates(loaded, findings.notes))
        del loaded
        _give_back_memory()
        if self._sync:
            self._journal = journal.Journal(self.runs_dir, number, self._journal_bytes())
        return findings

    def _file_loaded(self, loaded: list) -> None:
        """
        On the disk thread, before anything uses the store: file the
        loaded runs, every agent's in start order. (Sorting is stable: runs
        of one agent started in one millisecond keep their order.)
        """
        # The long-lived objects first, then the transient ones: freed
        # together, their memory goes back to the system.
        for agent in loaded:
            runs = self._agents[agent.agent_id] = AgentRuns(agent.agent_id, agent.directory)
            runs.number = len(self._numbered)
            self._numbered.append(runs)
            runs.starts, runs.ends = agent.starts, agent.ends
            runs.fill(agent.statuses)
        order = _start_order(loaded)
        # Each run (in the agents' order, as loaded) is the n-th of its agent's.
        agent_of, local_of = array("I"), array("I")
        for agent, runs in zip(loaded, self._numbered):
            agent_of.extend(itertools.repeat(runs.number, len(agent)))
            local_of.extend(range(len(agent)))
        overall_of = array("I", bytes(4 * len(order)))
        for overall, n in enumerate(order):
            overall_of[n] = overall
        base = 0
        for agent, runs in zip(loaded, self._numbered):
            runs.overall = overall_of[base : base + len(agent)]
            base += len(agent)
        everyone = self._everyone
        everyone.agents = array("I", map(agent_of.__getitem__, order))
        everyone.locals = array("I", map(local_of.__getitem__, order))
        hashes = array("q", itertools.chain.from_iterable(agent.hashes for agent in loaded))
        self._ids = RunIds(array("q", map(hashes.__getitem__, order)))
        statuses = bytes(itertools.chain.from_iterable(agent.statuses for agent in loaded))
        everyone.fill(bytes(map(statuses.__getitem__, order)))
        del order
        for agent, runs in zip(loaded, self._numbered):
            for local, run in agent.held.items():
                run.overall = runs.overall[local]
                self._runs[run.run_id] = self._held[run.overall] = run

    def _loaded(self, findings):
        self.corrupt_runs |= findings.corrupt
        for note in findings.notes:
            log.warn("file store: {note}", note=note)
        log.info(
            "file store: {runs} runs of {agents} agents in {path} ({held} held in memory)",
            runs=self._everyone.size,
            agents=len(self._agents),
            path=self.runs_dir,
            held=len(self._runs),
        )

    # Writes

    def start_run(self, started):
        if self._closed is not None:
            return fail(RuntimeError("the file store is closed"))
        run_id = started["run_id"]
        if run_id in self._runs or self._ids.find(hash(run_id)):
            return fail(RunExists(run_id))
        agent_id = started["agent_id"]
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = AgentRuns(agent_id, os.path.join(self.runs_dir, naming.encode_name(agent_id)))
        run = self._runs[run_id] = RunState(
            run_id=run_id,
            agent_id=agent_id,
            path=os.path.join(agent.directory, naming.encode_name(run_id) + naming.RUN_SUFFIX),
            intent=started["intent"],
            started_at=started["started_at"],
        )
        write = _Write(
            run, runfiles.encode_line(started), 0, agent=agent, index_entry=run.start_entry()
        )
        return self._submit(write)

    def _started(self, write: _Write) -> None:
        """File a run once its start is durable (it stays held: it is open)."""
        run = write.run
        agent = self._agents.get(run.agent_id)
        if agent is None:
            agent = self._agents[run.agent_id] = write.agent
            agent.number = len(self._numbered)
            self._numbered.append(agent)
        local = agent.add(run.status)
        run.overall = self._everyone.add(run.status)
        agent.starts.append(-1 if write.index_offset is None else write.index_offset)
        agent.ends.append(-1)
        agent.overall.append(run.overall)
        self._everyone.agents.append(agent.number)
        self._everyone.locals.append(local)
        self._ids.add(hash(run.run_id), run.overall)
        self._held[run.overall] = run

    def _not_started(self, write: _Write, error):
        """Forget a run whose start failed; what its Deferred fails with."""
        if self._runs.get(write.run.run_id) is write.run:
            del self._runs[write.run.run_id]
        if isinstance(error, FileExistsError):
            return RunExists(write.run.run_id)
        return error

    def _open_run(self, run_id) -> RunState:
        run = self._runs.get(run_id)
        if run is None:
            # Every run not held in memory has ended.
            raise RunTerminal(run_id) if self._ids.find(hash(run_id)) else RunNotFound(run_id)
        if run.status != "in_progress":
            raise RunTerminal(run_id)
        return run

    def append_turns(self, run_id, turns, max_turns):
        try:
            run = self._open_run(run_id)
        except (RunNotFound, RunTerminal) as e:
            return fail(e)
        base = run.turn_count
        if base + len(turns) > max_turns:
            return fail(TurnLimitReached(run_id))
        stamped = [dict(t, index=base + i) for i, t in enumerate(turns)]
        data = b"".join(runfiles.encode_line(record) for record in stamped)
        write = _Write(run, data, 1 + base, value=stamped, previous=run.summary())
        run.turn_count = base + len(turns)
        return self._submit(write)

    def end_run(self, run_id, ended):
        try:
            run = self._open_run(run_id)
        except (RunNotFound, RunTerminal) as e:
            return fail(e)
        previous = run.summary()
        position = 1 + run.turn_count
        run.status = status_of(ended)
        run.ended_at = ended["ended_at"]
        if ended["termination"] == "outcome":
            run.outcome_status = ended["outcome"]["status"]
        self._moved(run, "in_progress")
        write = _Write(
            run,
            runfiles.encode_line(ended),
            position,
            index_entry=run.end_entry(),
            previous=previous,
            last=True,
        )
        return self._submit(write)

    def _ended(self, write: _Write) -> None:
        """
        Let an ended run go from memory once its end is durable and both
        its index entries are known: it is read back from the index.
        """
        run = write.run
        if run.overall is not None and write.index_offset is not None and self._runs.get(run.run_id) is run:
            agent = self._agents[run.agent_id]
            local = self._everyone.locals[run.overall]
            if agent.starts[local] >= 0:
                agent.ends[local] = write.index_offset
                del self._runs[run.run_id], self._held[run.overall]

    def _moved(self, run: RunState, old_status: str) -> None:
        """Re-file a run whose status changed in the indexes, once filed."""
        if run.overall is not None:
            local = self._everyone.locals[run.overall]
            self._agents[run.agent_id].moved(local, old_status, run.status)
            self._everyone.moved(run.overall, old_status, run.status)

    def _submit(self, write: _Write) -> Deferred:
        if self._closed is not None:
            return fail(RuntimeError("the file store is closed"))
        self._queue.append(write)
        write.run.last_write = write
        if self._committing is None:
            self._commit_next()
        return write.deferred

    def _commit_next(self) -> None:
        batch, self._queue = self._queue, []
        rotate = (
            self._journal is not None
            and self._checkpointing is None
            and self._journal.size >= self._checkpoint_bytes
        )
        self._committing = self._in_thread(self._write_batch, batch, rotate)
        self._committing.addBoth(self._committed, batch, time.monotonic())

    def _committed(self, outcome, batch, started):
        self._committing = None
        self.on_commit(len(batch), time.monotonic() - started)
        if isinstance(outcome, Failure):
            log.failure("file store: a batch of writes failed", outcome)
            errors, notes, sealed = [outcome.value] * len(batch), [], None
        else:
            errors, notes, sealed = outcome
        if sealed is not None:
            self._checkpointing = self._in_thread(journal.checkpoint, sealed)
            self._checkpointing.addBoth(self._checkpointed)
        dependent, undone = [], set()
        for write, error in zip(batch, errors):
            if error is not None and write.run not in undone:
                undone.add(write.run)
                dependent.extend(self._roll_back(write, error))
        if self._queue:
            self._commit_next()
        for note in notes:
            log.warn("file store: {note}", note=note)
        for write, error in [*zip(batch, errors), *dependent]:
            if write.agent is not None:
                if error is None:
                    self._started(write)
                else:
                    error = self._not_started(write, error)
            elif write.last and error is None:
                self._ended(write)
            write.settle(write.value if error is None else _write_error(error))
            write.done()
        if self._committing is None and self._closed is not None and not self._closed.called:
            self._closed.callback(None)

    def _checkpointed(self, outcome) -> None:
        self._checkpointing = None
        if isinstance(outcome, Failure):
            log.failure(
                "file store: a checkpoint failed; its journal is replayed at the next start", outcome
            )

    def _roll_back(self, write: _Write, error) -> list:
        """
        Undo the first failed write of a run in memory: restore the run as
        it was before it, and take the run's queued writes (built on the
        failed one) out of the queue. A failed start is undone by
        L{_not_started}.

        @return: the queued writes taken out, each with C{error}.
        """
        run = write.run
        if write.previous is not None:
            old_status = run.status
            run.take_summary(write.previous)
            if old_status != run.status:
                self._moved(run, old_status)
        dependent = [queued for queued in self._queue if queued.run is run]
        self._queue = [queued for queued in self._queue if queued.run is not run]
        return [(queued, error) for queued in dependent]

    def _write_batch(self, batch, rotate: bool):
        """
        On a disk thread: write a batch to the run files, make it durable
        in the journal with one fdatasync (the run files are synced by a
        checkpoint, in the background), then index it. With C{rotate}, a
        new journal file is begun first and the old one returned, for the
        checkpoint. Without a journal (C{--durability none}) nothing is
        synced.

        A file that failed, or every file if the journal append failed, is
        put back as it was before the batch: cut back to its old size, or
        removed if the batch created it.

        @return: the error of each write (None when durable), notes, and
            the journal generation to checkpoint (or None).
        """
        files = {}  # path -> [fd, size]
        sizes = {}  # path -> size before the batch; None for a file it created
        broken = {}  # path -> the error that broke the file
        notes = []
        directories = set()
        sealed = None
        if rotate:
            try:
                sealed = self._journal.rotate()
            except OSError as e:
                notes.append(f"no new journal file ({e}); the journal grows until one can be made")
        try:
            for write in batch:
                path = write.run.path
                if path in broken:
                    continue
                try:
                    if write.agent is not None:
                        self._prepare(write.agent, directories)
                        files[path] = [disk.create_file(path), 0]
                        sizes[path] = None
                        directories.add(write.agent.directory)
                    elif path not in files:
                        files[path] = self._run_files.pop(path) or _open_run_file(path)
                        sizes[path] = files[path][1]
                    opened = files[path]
                    disk.write_all(opened[0], write.data)
                    opened[1] += len(write.data)
                except OSError as e:
                    broken[path] = e
            if self._journal is not None:
                self._journal_batch(batch, files, broken, directories)
            for path in broken.keys() & files.keys():
                try:
                    self._put_back(path, files[path][0], sizes[path])
                except OSError as e:
                    notes.append(f"{path}: a failed write could not be undone ({e})")
        finally:
            self._keep_open(batch, files, broken)
        errors = [broken.get(write.run.path) for write in batch]
        return errors, notes + self._index(batch, errors), sealed

    def _keep_open(self, batch, files: dict, broken: dict) -> None:
        """
        Keep the batch's run files open for the runs' next writes; close
        those of the runs it ended and those a failure broke (reopened, and
        measured afresh, by the next write).
        """
        ended = {write.run.path for write in batch if write.last}
        for path, opened in files.items():
            if path in broken or path in ended:
                os.close(opened[0])
            else:
                self._run_files.keep(path, opened)

    def _journal_batch(self, batch, files: dict, broken: dict, directories: set) -> None:
        """Append the batch's written records to the journal; on failure, break every file."""
        prefix = len(self.runs_dir) + 1
        frames = b"".join(
            journal.frame(write.run.path[prefix:].encode("ascii"), write.position, write.data)
            for write in batch
            if write.run.path not in broken
        )
        if not frames:
            return
        try:
            self._journal.append(frames, files.keys() - broken.keys(), directories)
        except OSError as e:
            for path in files:
                broken.setdefault(path, e)

    def _put_back(self, path: str, fd: int, size: Optional[int]) -> None:
        """Remove a file a failed batch created, or cut it back to C{size}."""
        if size is None:
            os.unlink(path)
        else:
            os.ftruncate(fd, size)
            if self._sync:
                os.fsync(fd)

    def _index(self, batch, errors) -> list:
        """
        Append the index entries of the durable writes, one write per
        agent directory; notes on failures.
        """
        entries = {}
        for write, error in zip(batch, errors):
            if error is None and write.index_entry is not None:
                entries.setdefault(os.path.dirname(write.run.path), []).append(write)
        notes = []
        for directory, writes in entries.items():
            lines = b"".join(w.index_entry for w in writes)
            opened = self._indexes.pop(directory)
            try:
                if opened is None:
                    opened = [index.open_index(directory), None]
                disk.write_all(opened[0], lines)
                # Where this descriptor's appends ended, whoever else appends.
                offset = os.lseek(opened[0], 0, os.SEEK_CUR) - len(lines)
            except OSError as e:
                notes.append(f"{directory}: index not updated ({e}); rebuilt at next start")
                if opened is not None:
                    os.close(opened[0])
                continue
            self._indexes.keep(directory, opened)
            for write in writes:
                write.index_offset = offset
                offset += len(write.index_entry)
        return notes

    def _prepare(self, agent: AgentRuns, directories: set) -> None:
        """Create an agent's directory and index, unless done already."""
        if agent.agent_id in self._agents or os.path.exists(
            os.path.join(agent.directory, naming.INDEX)
        ):
            return
        if disk.make_directory(agent.directory):
            directories.add(self.runs_dir)
        index = os.path.join(agent.directory, naming.INDEX)
        fd = disk.create_file(index, exclusive=False)
        try:
            disk.write_all(fd, runfiles.encode_line({"agent_id": agent.agent_id}))
        except OSError:
            os.unlink(index)
            raise
        finally:
            os.close(fd)

    # Reads

    def get_run(self, run_id):
        run = self._runs.get(run_id)
        if run is not None:
            return succeed(run.summary())
        return self._stored(run_id)

    def _stored(self, run_id) -> Deferred:
        """The summary of a run not held in memory, read back from its index; None if none."""
        places = [self._place(overall) for overall in self._ids.find(hash(run_id))]
        if not places:
            return succeed(None)
        d = self._in_thread(self._index_files.read_runs, places)
        d.addCallback(lambda found: next((s for s in found if s is not None and s.run_id == run_id), None))
        return d

    def _place(self, overall: int) -> tuple:
        """Where a run's index entries lie: C{(agent_id, directory, start, end)}."""
        agent = self._numbered[self._everyone.agents[overall]]
        local = self._everyone.locals[overall]
        return agent.agent_id, agent.directory, agent.starts[local], agent.ends[local]

    def read_records(self, run_id, cursor, limit):
        run = self._runs.get(run_id)
        if run is not None:
            d = Deferred.fromCoroutine(self._read_records(run, cursor, limit))
        else:
            d = self._stored(run_id)
            d.addCallback(self._read_stored_records, run_id, cursor, limit)
        d.addErrback(self._pruned_while_read, run_id)
        return d

    def _read_stored_records(self, summary: Optional[RunSummary], run_id, cursor: int, limit: int):
        if summary is None:
            raise RunNotFound(run_id)
        run = index.run_of(summary, self._agents[summary.agent_id].directory)
        return Deferred.fromCoroutine(self._read_records(run, cursor, limit))

    def _pruned_while_read(self, failure, run_id):
        if failure.check(FileNotFoundError) and not self._known(run_id):
            return fail(RunNotFound(run_id))
        return failure

    def _known(self, run_id) -> bool:
        """Whether the store may hold C{run_id} (held, or an id of its hash kept)."""
        return run_id in self._runs or bool(self._ids.find(hash(run_id)))

    async def _read_records(self, run: RunState, cursor: int, limit: int):
        """
        One page by byte offset: scan only the lines written since the last
        scan, then read only the page's bytes. A run file that is not a
        regular file serves no records.
        """
        if run.last_write is not None and not run.last_write.settled:
            await run.last_write.wait()
            if run.overall is None and self._runs.get(run.run_id) is not run:
                raise RunNotFound(run.run_id)  # its start failed
        try:
            for _ in range(2):
                kept = self._offsets_of(run)
                offsets = kept.offsets
                if not offsets.covers(cursor, limit, PAGE_READ_BYTES):
                    offsets = await self._scan(run, kept, cursor, limit)
                count = offsets.page(cursor, limit, PAGE_READ_BYTES)
                records = await self._in_thread(
                    runfiles.read_records_at, run.path, offsets, cursor, count
                )
                if records is not None:
                    return records, cursor + len(records)
                self._offsets.pop(run.run_id, None)  # the file changed: scan it afresh
        except disk.NotRegularFile:
            self._mark_corrupt(run, "not a regular file")
            return [], cursor
        raise RuntimeError(f"{run.path} changed while it was read")

    def _offsets_of(self, run: RunState) -> _Offsets:
        kept = self._offsets.get(run.run_id)
        if kept is None:
            kept = self._offsets[run.run_id] = _Offsets()
            if len(self._offsets) > OFFSETS_KEPT:
                self._offsets.popitem(last=False)
        else:
            self._offsets.move_to_end(run.run_id)
        return kept

    async def _scan(self, run: RunState, kept: _Offsets, cursor: int, limit: int):
        """
        Scan a run file past C{kept} as far as the page needs, one scan of
        a run at a time. The result is kept only if no write to the run was
        on its way meanwhile: a failed write's bytes may yet be cut off.
        """
        async with kept.scanning:
            if kept.offsets.covers(cursor, limit, PAGE_READ_BYTES):
                return kept.offsets  # scanned while this one waited
            last_write = run.last_write
            quiet = last_write is None or last_write.settled
            offsets = await self._in_thread(
                runfiles.scan_records,
                run.path,
                kept.offsets,
                cursor,
                limit,
                PAGE_READ_BYTES,
                quiet and run.status != "in_progress",
            )
            if quiet and run.last_write is last_write:
                kept.offsets = offsets
        if offsets.damaged:
            self._mark_corrupt(run, f"damaged line(s) {list(offsets.damaged)}")
        elif not offsets.started:
            self._mark_corrupt(run, "no readable started record")
        return offsets

    def _mark_corrupt(self, run: RunState, finding: str) -> None:
        if run.run_id not in self.corrupt_runs:
            self.corrupt_runs.add(run.run_id)
            log.warn(
                "file store: {path}: {finding}; run marked corrupt", path=run.path, finding=finding
            )

    def list_runs(self, agent_id, cursor, limit, status):
        runs = self._everyone if agent_id is None else self._agents.get(agent_id)
        try:
            if runs is None:
                parse_position_cursor(cursor, 0)
                return succeed(([], None))
            chosen, cursor = runs.chosen(cursor, limit, status)
        except ValueError as e:
            return fail(e)
        if runs is not self._everyone:
            chosen = [runs.overall[local] for local in chosen]
        held = [self._held.get(overall) for overall in chosen]
        page = [None if run is None else run.summary() for run in held]
        places = [self._place(overall) for overall, run in zip(chosen, held) if run is None]
        if not places:
            return succeed((page, cursor))
        d = self._in_thread(self._index_files.read_runs, places)
        d.addCallback(self._page, page, cursor)
        return d

    def _page(self, stored: list, page: list, cursor):
        """A page with the runs read back from the indexes filled in."""
        stored = iter(stored)
        filled = []
        for summary in page:
            if summary is None:
                summary = next(stored)
                if summary is None:
                    log.warn("file store: an index no longer holds a run it held at start; not listed")
                    continue
            filled.append(summary)
        return filled, cursor

    def open_runs(self):
        return succeed(
            [run.summary() for run in self._runs.values() if run.status == "in_progress"]
        )

    # Retention

    def prune_runs(self, ended_before, limit):
        if self._closed is not None:
            return fail(RuntimeError("the file store is closed"))
        d = self._prunable(ended_before, limit)
        d.addCallback(self._prune, ended_before)
        return d

    def _prunable(self, ended_before: str, limit) -> Deferred:
        """
        The runs ended before the cut: C{(agent, position, run)} each, the
        held ones first, then those read from the indexes on a disk thread
        (over copies of the offsets: a C-speed copy, so a store of millions
        of runs never holds the reactor for long).
        """
        found = []
        for run in self._runs.values():
            if run.overall is not None and _is_prunable(run, ended_before):
                found.append((self._agents[run.agent_id], self._everyone.locals[run.overall], run))
        if limit is not None and len(found) >= limit:
            return succeed(found[:limit])
        agents = [(agent, array("q", agent.starts), array("q", agent.ends)) for agent in self._numbered]
        more = None if limit is None else limit - len(found)
        d = self._in_thread(_stored_prunable, agents, ended_before, more)
        d.addCallback(lambda stored: found + stored)
        return d

    def _prune(self, candidates, ended_before):
        """Forget the runs (still prunable) at once, then delete their files."""
        runs = []
        for agent, local, run in candidates:
            if run.overall is not None:  # held in memory (one read back has none)
                if self._runs.get(run.run_id) is not run or not _is_prunable(run, ended_before):
                    continue
                del self._runs[run.run_id], self._held[run.overall]
            elif agent.ends[local] < 0:
                continue  # pruned meanwhile
            overall = agent.overall[local]
            agent.remove(local, run.status)
            self._everyone.remove(overall, run.status)
            agent.starts[local] = agent.ends[local] = -1
            self._ids.remove(hash(run.run_id), overall)
            self.corrupt_runs.discard(run.run_id)
            self._offsets.pop(run.run_id, None)
            runs.append(run)
        d = self._in_thread(self._delete_runs, runs)
        d.addCallback(self._deleted, runs)
        return d

    def _delete_runs(self, runs) -> list:
        """
        On a disk thread: unlink each run file (the run is gone once its
        file is), make that durable, then note the drops in the indexes.
        A crash before the index entries leaves an index out of step with
        the files, which the next start rebuilds from the files.

        @return: notes on what failed.
        """
        notes = []
        directories = {}
        for run in runs:
            try:
                os.unlink(run.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                notes.append(f"{run.path}: not deleted ({e}); the run is back at the next start")
                continue
            directories.setdefault(os.path.dirname(run.path), []).append(run.drop_entry())
        for directory, entries in directories.items():
            try:
                if self._sync:
                    disk.sync_directory(directory)
                index.append_to_index(directory, b"".join(entries))
            except OSError as e:
                notes.append(f"{directory}: index not updated ({e}); rebuilt at next start")
        return notes

    def _deleted(self, notes, runs) -> list:
        for note in notes:
            log.warn("file store: {note}", note=note)
        return [run.run_id for run in runs]

    def count_prunable(self, ended_before):
        d = self._prunable(ended_before, None)
        d.addCallback(len)
        return d

    def close(self):
        """
        Finish the queued writes and the checkpoint under way, checkpoint
        the journal (so a clean stop leaves none), then stop the disk threads.
        """
        if self._closed is None:
            self._closed = Deferred()
            if self._committing is None:
                self._closed.callback(None)
            self._closed.addCallback(lambda _: Deferred.fromCoroutine(self._finish()))
        d = Deferred()
        self._closed.addCallback(lambda _: d.callback(None))
        return d

    async def _finish(self) -> None:
        if self._checkpointing is not None:
            await self._checkpointing
        if self._journal is not None:
            try:
                await self._in_thread(self._journal.close)
            except Exception:
                log.failure("file store: the last checkpoint failed; the journal is replayed at the next start")
            self._journal = None
        self._stop_threads()

    def _stop_threads(self) -> None:
        self._pool.stop()
        self._index_files.close()
        self._run_files.close()
        self._indexes.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _OpenFiles:
    """
    Files kept open between batches, by path: C{[fd, size]} (the size a
    run file has; None for an index). Used by one batch at a time.
    """

    def __init__(self):
        self._open = OrderedDict()  # least recently kept first

    def pop(self, path: str) -> Optional[list]:
        """Take a file out (the batch puts it back with L{keep}, or closes it)."""
        return self._open.pop(path, None)

    def keep(self, path: str, opened: list) -> None:
        """Keep a file open, closing the least recently kept beyond the bound."""
        self._open[path] = opened
        if len(self._open) > OPEN_FILES_KEPT:
            os.close(self._open.popitem(last=False)[1][0])

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1][0])


def _open_run_file(path: str) -> list:
    """An existing run file opened to append: C{[fd, size]}."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        return [fd, os.fstat(fd).st_size]
    except BaseException:
        os.close(fd)
        raise


def _write_error(error: BaseException) -> BaseException:
    """What a failed write's Deferred fails with: the disk's errors, as one."""
    if isinstance(error, OSError) and not isinstance(error, FileExistsError):
        return StoreWriteFailed(error.strerror or str(error))
    return error


def _is_prunable(run: RunState, ended_before: str) -> bool:
    """
    Ended before the cut, and its terminal record durable. (The disk thread's
    scan may see a run mid-change; the reactor thread checks again.)
    """
    return (
        run.status != "in_progress"
        and isinstance(run.ended_at, str)
        and run.ended_at < ended_before
        and (run.last_write is None or run.last_write.settled)
    )


def _start_order(loaded: list) -> array:
    """
    The loaded runs' numbers (in the agents' order, as loaded) in start
    order; runs started in the same millisecond keep their load order.
    Times of the daemon's own form (C{YYYY-MM-DDTHH:MM:SS.mmmZ}) sort as one
    integer each, with the run's number in its low bits, one agent's
    strings at a time: a million runs' strings all at once would be the
    start-up's peak. Any other form sorts as text.
    """
    total = sum(len(agent) for agent in loaded)
    shift = max(total.bit_length(), 1)
    keys, number = [], 0
    for agent in loaded:
        for started_at in json.loads(agent.started_at):
            digits = started_at.translate(_TIME_SEPARATORS)
            if len(started_at) != 24 or len(digits) != 17 or not (digits.isascii() and digits.isdigit()):
                return _start_order_as_text(loaded)
            keys.append(int(digits) << shift | number)
            number += 1
    keys.sort()
    return array("I", map(((1 << shift) - 1).__and__, keys))


#: What L{_start_order} drops from a time to leave its digits.
_TIME_SEPARATORS = str.maketrans("", "", "-T:.Z")


def _start_order_as_text(loaded: list) -> array:
    """L{_start_order} for times of any form: their strings, sorted."""
    started = list(itertools.chain.from_iterable(json.loads(agent.started_at) for agent in loaded))
    return array("I", sorted(range(len(started)), key=started.__getitem__))


def _give_back_memory() -> None:
    """
    Hand back to the system the memory loading freed: the C allocator
    (glibc's) keeps it otherwise, about as much again as a store of a
    million runs holds. Elsewhere, nothing to do.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _stored_prunable(agents: list, ended_before: str, limit) -> list:
    """
    On a disk thread: up to C{limit} runs read back from the indexes that
    ended before the cut, C{(agent, position, run)} each.
    """
    found = []
    for agent, starts, ends in agents:
        left = None if limit is None else limit - len(found)
        try:
            ended = index.read_ended(agent.agent_id, agent.directory, starts, ends, ended_before, left)
        except OSError:
            continue  # an index gone since start: its runs are not listed either
        found.extend((agent, local, run) for local, run in ended)
        if len(found) == limit:
            break
    return found


def _without_duplicates(loaded: list, notes: list) -> list:
    """
    The loaded agents without the runs an earlier agent holds too (found by
    the hash of their id, checked by the id): such a run is not served.
    """
    hashes = sorted(itertools.chain.from_iterable(agent.hashes for agent in loaded))
    shared = {h for h, following in zip(hashes, itertools.islice(hashes, 1, None)) if h == following}
    del hashes
    if not shared:
        return loaded
    seen, kept = set(), []
    for agent in loaded:
        positions = [n for n, h in enumerate(agent.hashes) if h in shared]
        entries = index.read_entries(agent.directory, [agent.starts[n] for n in positions])
        doubled = set()
        for n, entry in zip(positions, entries):
            run_id = entry.get("start") if entry is not None else None
            if not isinstance(run_id, str):
                continue
            if run_id in seen:
                path = os.path.join(agent.directory, naming.encode_name(run_id) + naming.RUN_SUFFIX)
                notes.append(f"{path}: run {run_id!r} is also elsewhere; not served")
                doubled.add(n)
            seen.add(run_id)
        kept.append(agent.without(doubled) if doubled else agent)
    return kept
