"""
The file store: one JSONL file per run under C{<data-dir>/runs/}, durable
before it acknowledges, the daemon's default store.

Writes are validated and applied to the in-memory state at call time (so
calls on a run take effect in call order), then queued for the disk. One
batch at a time goes to a disk thread, which writes every queued record,
fsyncs the touched files and the directories that gained entries, then
appends the agents' index entries. Everything queued while a
batch is on disk forms the next batch: concurrent writers share flushes.
See docs/storage.md.
"""

import bisect
import fcntl
import itertools
import os
from dataclasses import dataclass, field
from typing import Optional

from twisted.internet.defer import Deferred, fail, succeed
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
    RunTerminal,
    TurnLimitReached,
    status_of,
)
from car_twisted.store import layout
from car_twisted.store.layout import RunState
from car_twisted.store.memory import parse_position_cursor

log = Logger()

DURABILITIES = ("fsync", "none")


class AgentRuns:
    """One agent's durable runs in start order, with positions by status."""

    def __init__(self, agent_id: str, directory: str):
        self.agent_id = agent_id
        self.directory = directory
        #: The runs by position; a pruned run leaves None, so cursors stay valid.
        self.runs = []
        self._present = []  # positions of the runs not pruned
        self._positions = {status: [] for status in RUN_STATUSES}

    def add(self, run: RunState) -> None:
        run.position = len(self.runs)
        self.runs.append(run)
        self._present.append(run.position)
        self._positions[run.status].append(run.position)

    def remove(self, run: RunState) -> None:
        """Forget a pruned run."""
        self.runs[run.position] = None
        for positions in (self._present, self._positions[run.status]):
            del positions[bisect.bisect_left(positions, run.position)]

    def moved(self, run: RunState, old_status: str) -> None:
        """Re-file a run whose status changed."""
        if run.position is None:
            return
        positions = self._positions[old_status]
        del positions[bisect.bisect_left(positions, run.position)]
        bisect.insort(self._positions[run.status], run.position)

    def page(self, cursor, limit: int, status: Optional[str]):
        """Newest first from below C{cursor}; cost grows with C{limit} only."""
        below = parse_position_cursor(cursor, len(self.runs))
        positions = self._present if status is None else self._positions[status]
        end = bisect.bisect_left(positions, below)
        chosen = positions[max(end - limit, 0) : end][::-1]
        more = end - limit > 0
        page = [self.runs[position].summary() for position in chosen]
        return page, (str(chosen[-1]) if more else None)


@dataclass(eq=False)
class _Write:
    """Bytes for one run file, queued for the disk thread."""

    run: RunState
    data: bytes
    #: What the Deferred fires with once the bytes are durable.
    value: object = None
    #: Set for a start: the agent whose directory holds the new file.
    agent: Optional[AgentRuns] = None
    index_entry: Optional[bytes] = None
    result: Deferred = field(default_factory=Deferred)
    finished: bool = False
    #: Reads of this run waiting for the write to finish.
    waiters: list = field(default_factory=list)

    def finish(self, error: Optional[BaseException]) -> None:
        self.finished = True
        for waiter in self.waiters:
            waiter.callback(None)
        if error is None:
            self.result.callback(self.value)
        else:
            self.result.errback(error)


@implementer(IRunStore)
class FileRunStore:
    """
    Runs as JSONL files under C{<data_dir>/runs/}. Build it with
    L{FileRunStore.open}, which loads (and repairs) what is on disk.

    @param durability: C{"fsync"} acknowledges writes once on stable
        storage; C{"none"} once handed to the operating system (they survive
        a daemon crash, not a power cut).
    """

    def __init__(self, reactor, data_dir: str, durability: str = "fsync"):
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        self._reactor = reactor
        self.data_dir = data_dir
        self.runs_dir = os.path.join(data_dir, layout.RUNS)
        self._sync = durability == "fsync"
        self._runs = {}  # run_id -> RunState
        self._agents = {}  # agent_id -> AgentRuns
        #: Ids of runs found with damaged lines; their readable records are served.
        self.corrupt_runs = set()
        self._queue = []
        self._committing = None  # the Deferred of the batch on disk
        self._closed = None
        self._lock_fd = None
        self._pool = ThreadPool(minthreads=1, maxthreads=4, name="car-file-store")
        self._pool.start()

    @classmethod
    def open(cls, reactor, data_dir: str, durability: str = "fsync") -> Deferred:
        """
        Open the store in C{data_dir}: load every agent's index (rebuilding
        the missing or stale ones), cut torn last lines off the runs left
        open. A bad file is logged and skipped, never fatal.

        @return: Deferred firing with the store.
        """
        store = cls(reactor, data_dir, durability)
        d = store._in_thread(store._load)
        d.addCallback(store._loaded)

        def failed(failure):
            store._stop_threads()
            return failure

        d.addErrback(failed)
        return d

    def _in_thread(self, f, *args):
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _load(self):
        os.makedirs(self.data_dir, mode=layout.DIR_MODE, exist_ok=True)
        if layout.make_directory(self.runs_dir) and self._sync:
            layout.sync_directory(self.data_dir)
        self._lock_fd = os.open(
            os.path.join(self.runs_dir, layout.LOCK),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
            layout.FILE_MODE,
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"{self.runs_dir} is in use by another daemon")
        findings = layout.Findings()
        loaded = []
        for entry in sorted(os.scandir(self.runs_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir(follow_symlinks=False):
                findings.notes.append(f"{entry.path}: not an agent directory; ignored")
                continue
            try:
                agent = layout.load_agent(entry.path, self._sync, findings)
            except OSError as e:
                findings.notes.append(f"{entry.path}: unreadable ({e}); its runs are not served")
                continue
            if agent is not None:
                loaded.append((entry.path, *agent))
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
        self.corrupt_runs |= findings.corrupt
        for note in findings.notes:
            log.warn("file store: {note}", note=note)
        log.info(
            "file store: {runs} runs of {agents} agents in {path}",
            runs=len(self._runs),
            agents=len(self._agents),
            path=self.runs_dir,
        )
        return self

    # Writes

    def start_run(self, started):
        run_id = started["run_id"]
        if run_id in self._runs:
            return fail(RunExists(run_id))
        agent_id = started["agent_id"]
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = AgentRuns(agent_id, os.path.join(self.runs_dir, layout.encode_name(agent_id)))
        run = self._runs[run_id] = RunState(
            run_id=run_id,
            agent_id=agent_id,
            path=os.path.join(agent.directory, layout.encode_name(run_id) + layout.RUN_SUFFIX),
            intent=started["intent"],
            started_at=started["started_at"],
        )
        write = _Write(run, layout.encode_line(started), agent=agent, index_entry=run.start_entry())
        d = self._submit(write)
        d.addCallbacks(self._started, self._not_started, (write,), errbackArgs=(write,))
        return d

    def _started(self, _, write: _Write):
        self._agents.setdefault(write.run.agent_id, write.agent).add(write.run)

    def _not_started(self, failure, write: _Write):
        if self._runs.get(write.run.run_id) is write.run:
            del self._runs[write.run.run_id]
        if failure.check(FileExistsError):
            return fail(RunExists(write.run.run_id))
        return failure

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
        data = b"".join(layout.encode_line(dict(t, index=base + i)) for i, t in enumerate(turns))
        run.turn_count = base + len(turns)
        return self._submit(_Write(run, data, value=base))

    def end_run(self, run_id, ended):
        try:
            run = self._open_run(run_id)
        except (RunNotFound, RunTerminal) as e:
            return fail(e)
        run.status = status_of(ended)
        run.ended_at = ended["ended_at"]
        if ended["termination"] == "outcome":
            run.outcome_status = ended["outcome"]["status"]
        agent = self._agents.get(run.agent_id)
        if agent is not None:
            agent.moved(run, "in_progress")
        return self._submit(_Write(run, layout.encode_line(ended), index_entry=run.end_entry()))

    def _submit(self, write: _Write) -> Deferred:
        if self._closed is not None:
            return fail(RuntimeError("the file store is closed"))
        self._queue.append(write)
        write.run.last_write = write
        if self._committing is None:
            self._commit_next()
        return write.result

    def _commit_next(self) -> None:
        batch, self._queue = self._queue, []
        self._committing = self._in_thread(self._write_batch, batch)
        self._committing.addBoth(self._committed, batch)

    def _committed(self, outcome, batch):
        self._committing = None
        if self._queue:
            self._commit_next()
        if isinstance(outcome, Failure):
            log.failure("file store: a batch of writes failed", outcome)
            errors, notes = [outcome.value] * len(batch), []
        else:
            errors, notes = outcome
        for note in notes:
            log.warn("file store: {note}", note=note)
        for write, error in zip(batch, errors):
            write.finish(error)
        if self._committing is None and self._closed is not None and not self._closed.called:
            self._closed.callback(None)

    def _write_batch(self, batch):
        """
        On a disk thread: write a batch, make it durable, index it. Every
        file is written before any is fsynced, so the first fsync commits
        the whole batch to the journal and the others find little left to
        do; then each directory that gained entries is fsynced once.

        @return: the error of each write (None when durable), and notes.
        """
        files = {}  # path -> fd
        broken = {}  # path -> the error that broke the file
        directories = set()
        try:
            for write in batch:
                path = write.run.path
                if path in broken:
                    continue
                try:
                    if write.agent is not None:
                        self._prepare(write.agent, directories)
                        files[path] = layout.create_file(path)
                        directories.add(write.agent.directory)
                    elif path not in files:
                        files[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                    layout.write_all(files[path], write.data)
                except OSError as e:
                    broken[path] = e
            if self._sync:
                for path, fd in files.items():
                    try:
                        os.fsync(fd)
                    except OSError as e:
                        broken.setdefault(path, e)
                for directory in directories:
                    try:
                        layout.sync_directory(directory)
                    except OSError as e:
                        for path in files:
                            if os.path.dirname(path) == directory:
                                broken.setdefault(path, e)
        finally:
            for fd in files.values():
                os.close(fd)
        errors = [broken.get(write.run.path) for write in batch]
        return errors, self._index(batch, errors)

    def _index(self, batch, errors) -> list:
        """Append the index entries of the durable writes; notes on failures."""
        entries = {}
        for write, error in zip(batch, errors):
            if error is None and write.index_entry is not None:
                entries.setdefault(os.path.dirname(write.run.path), []).append(write.index_entry)
        notes = []
        for directory, lines in entries.items():
            try:
                layout.append_to_index(directory, b"".join(lines))
            except OSError as e:
                notes.append(f"{directory}: index not updated ({e}); rebuilt at next start")
        return notes

    def _prepare(self, agent: AgentRuns, directories: set) -> None:
        """Create an agent's directory and index, unless done already."""
        if agent.agent_id in self._agents or os.path.exists(
            os.path.join(agent.directory, layout.INDEX)
        ):
            return
        if layout.make_directory(agent.directory):
            directories.add(self.runs_dir)
        fd = layout.create_file(os.path.join(agent.directory, layout.INDEX), exclusive=False)
        try:
            layout.write_all(fd, layout.encode_line({"agent_id": agent.agent_id}))
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
        d = Deferred()
        if run.last_write is not None and not run.last_write.finished:
            run.last_write.waiters.append(d)
        else:
            d.callback(None)
        d.addCallback(lambda _: self._in_thread(layout.read_run_file, run.path))
        d.addCallback(self._page_of_records, run, cursor, limit)
        d.addErrback(self._pruned_while_read, run)
        return d

    def _pruned_while_read(self, failure, run: RunState):
        if failure.check(FileNotFoundError) and self._runs.get(run.run_id) is not run:
            return fail(RunNotFound(run.run_id))
        return failure

    def _page_of_records(self, run_file, run, cursor, limit):
        if run_file.damaged and run.run_id not in self.corrupt_runs:
            self.corrupt_runs.add(run.run_id)
            log.warn(
                "file store: {path}: damaged line(s) {lines}; run marked corrupt",
                path=run.path,
                lines=run_file.damaged,
            )
        page = run_file.records[cursor : cursor + limit]
        return page, cursor + len(page)

    def list_runs(self, agent_id, cursor, limit, status):
        agent = self._agents.get(agent_id)
        try:
            if agent is None:
                parse_position_cursor(cursor, 0)
                return succeed(([], None))
            return succeed(agent.page(cursor, limit, status))
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
            agent = self._agents.get(run.agent_id)
            if agent is not None and run.position is not None:
                agent.remove(run)
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
                    layout.sync_directory(directory)
                layout.append_to_index(directory, b"".join(entries))
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
        """Finish the queued writes, then stop the disk threads."""
        if self._closed is None:
            self._closed = Deferred()
            if self._committing is None:
                self._closed.callback(None)
            self._closed.addCallback(lambda _: self._stop_threads())
        d = Deferred()
        self._closed.addCallback(lambda _: d.callback(None))
        return d

    def _stop_threads(self) -> None:
        self._pool.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _is_prunable(run: RunState, ended_before: str) -> bool:
    """
    Ended before the cut, and its terminal record durable. (The disk thread's
    scan may see a run mid-change; the reactor thread checks again.)
    """
    return (
        run.status != "in_progress"
        and isinstance(run.ended_at, str)
        and run.ended_at < ended_before
        and (run.last_write is None or run.last_write.finished)
    )


def _prunable(runs, ended_before: str, limit) -> list:
    return list(itertools.islice((r for r in runs if _is_prunable(r, ended_before)), limit))
