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
See docs/storage.md.
"""

import bisect
import fcntl
import itertools
import os
import time
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
#: Journal bytes after which the next batch begins a new journal file and
#: the old one is checkpointed.
CHECKPOINT_BYTES = 4 * 1024 * 1024
#: Files the batches keep open between writes, of each kind (the open runs'
#: files, the agents' indexes), the most recently written.
OPEN_FILES_KEPT = 64


class RunIndex:
    """Durable runs in start order, with positions by status."""

    def __init__(self):
        #: The runs by position; a pruned run leaves None, so cursors stay valid.
        self.runs = []
        self._position = {}  # run_id -> position in self.runs
        self._present = []  # positions of the runs not pruned
        self._positions = {status: [] for status in RUN_STATUSES}

    def add(self, run: RunState) -> None:
        position = self._position[run.run_id] = len(self.runs)
        self.runs.append(run)
        self._present.append(position)
        self._positions[run.status].append(position)

    def remove(self, run: RunState) -> None:
        """Forget a pruned run."""
        position = self._position.pop(run.run_id, None)
        if position is None:
            return
        self.runs[position] = None
        for positions in (self._present, self._positions[run.status]):
            del positions[bisect.bisect_left(positions, position)]

    def moved(self, run: RunState, old_status: str) -> None:
        """Re-file a run whose status changed."""
        position = self._position.get(run.run_id)
        if position is None:
            return
        positions = self._positions[old_status]
        del positions[bisect.bisect_left(positions, position)]
        bisect.insort(self._positions[run.status], position)

    def page(self, cursor, limit: int, status: Optional[str]):
        """Newest first from below C{cursor}; cost grows with C{limit} only."""
        below = parse_position_cursor(cursor, len(self.runs))
        positions = self._present if status is None else self._positions[status]
        end = bisect.bisect_left(positions, below)
        chosen = positions[max(end - limit, 0) : end][::-1]
        more = end - limit > 0
        page = [self.runs[position].summary() for position in chosen]
        return page, (str(chosen[-1]) if more else None)


class AgentRuns(RunIndex):
    """One agent's durable runs, and the directory they are kept in."""

    def __init__(self, agent_id: str, directory: str):
        super().__init__()
        self.agent_id = agent_id
        self.directory = directory


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
        """
        self.deferred = self.data = self.value = self.previous = self.index_entry = None


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
        self._runs = {}  # run_id -> RunState
        self._agents = {}  # agent_id -> AgentRuns
        self._everyone = RunIndex()  # every agent's runs
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
                loaded.append((entry.path, *agent))
        if self._sync:
            self._journal = journal.Journal(self.runs_dir, number, self._journal_bytes())
        return loaded, findings

    def _loaded(self, result):
        loaded, findings = result
        for directory, agent_id, runs in loaded:
            agent = self._agents[agent_id] = AgentRuns(agent_id, directory)
            for run in runs:
                if run.run_id in self._runs:
                    findings.notes.append(f"{run.path}: run {run.run_id!r} is also elsewhere; not served")
                    continue
                self._runs[run.run_id] = run
                agent.add(run)
        # Sorting is stable: runs of one agent started in one millisecond keep their order.
        for run in sorted(self._runs.values(), key=lambda run: run.started_at):
            self._everyone.add(run)
        self.corrupt_runs |= findings.corrupt
        for note in findings.notes:
            log.warn("file store: {note}", note=note)
        log.info(
            "file store: {runs} runs of {agents} agents in {path}",
            runs=len(self._runs),
            agents=len(self._agents),
            path=self.runs_dir,
        )

    # Writes

    def start_run(self, started):
        if self._closed is not None:
            return fail(RuntimeError("the file store is closed"))
        run_id = started["run_id"]
        if run_id in self._runs:
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
        self._agents.setdefault(write.run.agent_id, write.agent).add(write.run)
        self._everyone.add(write.run)

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
            raise RunNotFound(run_id)
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
        return self._submit(
            _Write(
                run,
                runfiles.encode_line(ended),
                position,
                index_entry=run.end_entry(),
                previous=previous,
                last=True,
            )
        )

    def _moved(self, run: RunState, old_status: str) -> None:
        """Re-file a run whose status changed in the indexes that hold it."""
        agent = self._agents.get(run.agent_id)
        if agent is not None:
            agent.moved(run, old_status)
        self._everyone.moved(run, old_status)

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
                entries.setdefault(os.path.dirname(write.run.path), []).append(write.index_entry)
        notes = []
        for directory, lines in entries.items():
            opened = self._indexes.pop(directory)
            try:
                if opened is None:
                    opened = [index.open_index(directory), None]
                disk.write_all(opened[0], b"".join(lines))
            except OSError as e:
                notes.append(f"{directory}: index not updated ({e}); rebuilt at next start")
                if opened is not None:
                    os.close(opened[0])
                continue
            self._indexes.keep(directory, opened)
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
        return succeed(run.summary() if run is not None else None)

    def read_records(self, run_id, cursor, limit):
        run = self._runs.get(run_id)
        if run is None:
            return fail(RunNotFound(run_id))
        d = Deferred.fromCoroutine(self._read_records(run, cursor, limit))
        d.addErrback(self._pruned_while_read, run)
        return d

    def _pruned_while_read(self, failure, run: RunState):
        if failure.check(FileNotFoundError) and self._runs.get(run.run_id) is not run:
            return fail(RunNotFound(run.run_id))
        return failure

    async def _read_records(self, run: RunState, cursor: int, limit: int):
        """
        One page by byte offset: scan only the lines written since the last
        scan, then read only the page's bytes. A run file that is not a
        regular file serves no records.
        """
        if run.last_write is not None and not run.last_write.settled:
            await run.last_write.wait()
            if self._runs.get(run.run_id) is not run:
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
            return succeed(runs.page(cursor, limit, status))
        except ValueError as e:
            return fail(e)

    def open_runs(self):
        return succeed(
            [run.summary() for run in self._runs.values() if run.status == "in_progress"]
        )

    # Retention

    def prune_runs(self, ended_before, limit):
        if self._closed is not None:
            return fail(RuntimeError("the file store is closed"))
        # The scan runs on a disk thread over a snapshot (a C-speed copy), so
        # a store of millions of runs never holds the reactor for long.
        d = self._in_thread(_prunable, list(self._runs.values()), ended_before, limit)
        d.addCallback(self._prune, ended_before)
        return d

    def _prune(self, candidates, ended_before):
        """Forget the runs (still prunable) at once, then delete their files."""
        runs = [
            run
            for run in candidates
            if self._runs.get(run.run_id) is run and _is_prunable(run, ended_before)
        ]
        for run in runs:
            del self._runs[run.run_id]
            self.corrupt_runs.discard(run.run_id)
            self._offsets.pop(run.run_id, None)
            self._agents[run.agent_id].remove(run)
            self._everyone.remove(run)
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
        d = self._in_thread(_prunable, list(self._runs.values()), ended_before, None)
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


def _prunable(runs, ended_before: str, limit) -> list:
    return list(itertools.islice((r for r in runs if _is_prunable(r, ended_before)), limit))
