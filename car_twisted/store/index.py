"""
An agent's index, and loading an agent's directory at start: the index
read and checked against the run files, torn lines cut, and a missing,
damaged or stale index rebuilt from the run files.
Plain blocking file work: the store runs it in its own threads.
"""

import itertools
import json
import operator
import os
import threading
from collections import OrderedDict
from array import array
from dataclasses import dataclass, field
from typing import Optional

from car_twisted import disk
from car_twisted.interfaces import RUN_STATUSES, RunSummary
from car_twisted.store.naming import INDEX, RUN_SUFFIX, decode_name, encode_name
from car_twisted.store.runfiles import (
    MAX_LINE,
    RunFile,
    RunState,
    cut_torn_line,
    encode_line,
    read_run_file,
    state_from_file,
)


class StaleIndex(Exception):
    """An index that cannot be trusted: it must be rebuilt from the run files."""


#: A run's status as one byte.
STATUS_CODES = {status: code for code, status in enumerate(RUN_STATUSES)}
OPEN = STATUS_CODES["in_progress"]


@dataclass(eq=False)
class AgentLoad:
    """
    One agent's runs as loading found them, in start order, held compactly:
    per run the hash of its id, its status and where its index entries lie
    (what a summary is read back from); the open runs whole.
    """

    agent_id: str
    directory: str
    hashes: array = field(default_factory=lambda: array("q"))
    statuses: bytearray = field(default_factory=bytearray)
    #: Offsets in the index of each run's start entry and of its end entry (-1: none).
    starts: array = field(default_factory=lambda: array("q"))
    ends: array = field(default_factory=lambda: array("q"))
    #: Each run's C{started_at}, for the every-agent order: one JSON array,
    #: not a million strings kept while the agents load.
    started_at: str = "[]"
    #: The open runs by position.
    held: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.starts)

    def without(self, positions: set) -> "AgentLoad":
        """The same runs but those at C{positions}."""
        kept = [n for n in range(len(self)) if n not in positions]
        started_at = json.loads(self.started_at)
        return AgentLoad(
            self.agent_id,
            self.directory,
            array("q", [self.hashes[n] for n in kept]),
            bytearray(self.statuses[n] for n in kept),
            array("q", [self.starts[n] for n in kept]),
            array("q", [self.ends[n] for n in kept]),
            json.dumps([started_at[n] for n in kept]),
            {k: self.held[n] for k, n in enumerate(kept) if n in self.held},
        )


def read_index(agent_dir: str) -> "tuple[AgentLoad, list, bytes]":
    """
    Read an agent's index: its runs in start order, their ids (in the same
    order) and the index's bytes.

    @raise StaleIndex: the index is missing, torn or damaged.
    """
    try:
        with disk.open_regular(os.path.join(agent_dir, INDEX)) as f:
            data = f.read()
    except FileNotFoundError:
        raise StaleIndex("missing")
    except disk.NotRegularFile:
        raise StaleIndex("not a regular file")
    if not data.endswith(b"\n"):
        raise StaleIndex("torn")
    run_ids, started, starts, ends, statuses = [], [], [], [], []
    where = {}  # run_id -> position
    dropped = set()
    try:
        lines = data.decode("ascii").split("\n")
        lines.pop()
        entries = _entries(lines)
        agent_id = entries[0]["agent_id"]
        if not isinstance(agent_id, str):
            raise TypeError("agent_id")
        offsets = itertools.accumulate(map((1).__add__, map(len, lines)), initial=0)
        next(offsets)
        for entry, offset in zip(itertools.islice(entries, 1, None), offsets):
            if "start" in entry:
                run_id = entry["start"]
                if run_id in where or not isinstance(entry["intent"], str):
                    raise ValueError("duplicate run")
                where[run_id] = len(run_ids)
                run_ids.append(run_id)
                started.append(entry["started_at"])
                starts.append(offset)
                ends.append(-1)
                statuses.append(OPEN)
            elif "drop" in entry:
                dropped.add(where.pop(entry["drop"]))
            else:
                position = where[entry["end"]]
                if type(entry["turn_count"]) is not int:
                    raise ValueError("bad end entry")
                statuses[position] = STATUS_CODES[entry["status"]]
                ends[position] = offset
        if not all(isinstance(at, str) for at in started):
            raise TypeError("started_at")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise StaleIndex(f"damaged ({e.__class__.__name__})")
    if dropped:
        kept = [n for n in range(len(run_ids)) if n not in dropped]
        run_ids, started, starts, ends, statuses = (
            [values[n] for n in kept] for values in (run_ids, started, starts, ends, statuses)
        )
    loaded = AgentLoad(
        agent_id,
        agent_dir,
        array("q", map(hash, run_ids)),
        bytearray(statuses),
        array("q", starts),
        array("q", ends),
        json.dumps(started),
    )
    return loaded, run_ids, data


_scan = json.JSONDecoder().scan_once


def _entries(lines: list) -> list:
    """
    Each index line's entry, parsed by the JSON decoder's scanner in one
    C-speed pass: a million lines are read at start.
    """
    # A line that is not JSON stops the scan early (StopIteration).
    scanned = list(map(_scan, lines, itertools.repeat(0)))
    if len(scanned) != len(lines) or list(map(operator.itemgetter(1), scanned)) != list(map(len, lines)):
        raise ValueError("not one JSON value a line")
    entries = list(map(operator.itemgetter(0), scanned))
    if set(map(type, entries)) != {dict}:
        raise ValueError("not an entry")
    return entries


def _entry(line: str) -> dict:
    """One index line's entry."""
    try:
        entry, end = _scan(line, 0)
    except StopIteration:
        raise ValueError("not JSON")
    if end != len(line) or not isinstance(entry, dict):
        raise ValueError("not an entry")
    return entry


def entry_at(data: bytes, offset: int) -> dict:
    """The index entry at C{offset} of an index's bytes."""
    return json.loads(data[offset : data.index(b"\n", offset)])


def run_at(agent_id: str, agent_dir: str, start: dict, end: Optional[dict]) -> RunState:
    """A run as its start entry (and end entry) in the index describe it."""
    run = RunState(
        run_id=start["start"],
        agent_id=agent_id,
        path=os.path.join(agent_dir, encode_name(start["start"]) + RUN_SUFFIX),
        intent=start["intent"],
        started_at=start["started_at"],
    )
    if end is not None:
        run.ended_at = end["ended_at"]
        run.status = end["status"]
        run.outcome_status = end["outcome_status"]
        run.turn_count = end["turn_count"]
    return run


def write_index(agent_dir: str, agent_id: str, runs: list, sync: bool) -> list:
    """
    Replace an agent's index atomically with one listing C{runs}.

    @return: the offsets of each run's start and end entry (-1: none).
    """
    temporary = os.path.join(agent_dir, INDEX + ".new")
    fd = disk.create_file(temporary, exclusive=False)
    try:
        lines = [encode_line({"agent_id": agent_id})]
        offset, offsets = len(lines[0]), []
        for run in runs:
            start, end = offset, -1
            lines.append(run.start_entry())
            offset += len(lines[-1])
            if run.status != "in_progress":
                end = offset
                lines.append(run.end_entry())
                offset += len(lines[-1])
            offsets.append((start, end))
        disk.write_all(fd, b"".join(lines))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, os.path.join(agent_dir, INDEX))
    if sync:
        disk.sync_directory(agent_dir)
    return offsets


def open_index(agent_dir: str) -> int:
    """
    Open an agent's index to append entries. They are not synced: the index
    is rebuilt from the (synced) run files whenever it falls behind them.
    """
    return os.open(os.path.join(agent_dir, INDEX), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def append_to_index(agent_dir: str, lines: bytes) -> int:
    """
    Append entries to an agent's index (see L{open_index}).

    @return: the offset the entries begin at.
    """
    fd = open_index(agent_dir)
    try:
        disk.write_all(fd, lines)
        # Where this descriptor's appends ended, whoever else appends.
        return os.lseek(fd, 0, os.SEEK_CUR) - len(lines)
    finally:
        os.close(fd)


def read_entries(agent_dir: str, offsets: list) -> list:
    """
    Read index entries at known C{offsets} (-1 for none), one C{pread}
    each: the entries, None where an offset holds no readable entry.
    """
    with disk.open_regular(os.path.join(agent_dir, INDEX)) as f:
        return [None if offset < 0 else _entry_read_at(f.fileno(), offset) for offset in offsets]


class IndexFiles:
    """
    The agents' indexes, open to read runs back: the most recently read
    are kept open (a page of every agent's runs may read 50 of them, and an
    open costs more than the reads). Used from the store's disk threads, one
    read at a time. An index is only ever appended to while the store runs.
    """

    def __init__(self, kept: int):
        self._kept = kept
        self._files = OrderedDict()  # agent_dir -> open file, least recently read first
        self._lock = threading.Lock()

    def read_runs(self, places: list) -> list:
        """
        Read runs' summaries back: C{places} holds C{(agent_id, agent_dir,
        start, end)} per run, the offsets of its start and end entry (-1:
        none). None for a run whose entries are no longer there, or whose
        index cannot be read.
        """
        runs = [None] * len(places)
        with self._lock:
            for n, (agent_id, agent_dir, start, end) in enumerate(places):
                try:
                    fd = self._file(agent_dir).fileno()
                except OSError:
                    continue
                runs[n] = _summary_of(
                    agent_id, _entry_read_at(fd, start), None if end < 0 else _entry_read_at(fd, end), end
                )
        return runs

    def _file(self, agent_dir: str):
        f = self._files.get(agent_dir)
        if f is None:
            f = self._files[agent_dir] = disk.open_regular(os.path.join(agent_dir, INDEX))
            if len(self._files) > self._kept:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(agent_dir)
        return f

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def read_ended(agent_id: str, agent_dir: str, starts, ends, ended_before: str, limit) -> list:
    """
    The runs whose end entry (at C{ends}, -1: none) says they ended before
    C{ended_before}, at most C{limit}: C{(position, run)} each.
    """
    found = []
    with disk.open_regular(os.path.join(agent_dir, INDEX)) as f:
        for position, end in enumerate(ends):
            if end < 0:
                continue
            ended = _entry_read_at(f.fileno(), end)
            at = ended.get("ended_at") if ended is not None else None
            if isinstance(at, str) and at < ended_before and ended.get("status") != "in_progress":
                summary = _summary_of(agent_id, _entry_read_at(f.fileno(), starts[position]), ended, end)
                if summary is not None:
                    found.append((position, run_of(summary, agent_dir)))
                    if len(found) == limit:
                        break
    return found


def _summary_of(agent_id: str, start, end, end_offset: int) -> Optional[RunSummary]:
    """The summary a run's entries hold, or None if they are not a run's start and end."""
    try:
        if end_offset < 0:
            return RunSummary(start["start"], agent_id, start["intent"], start["started_at"], None, "in_progress", None, 0)
        if end["end"] != start["start"] or end["status"] not in RUN_STATUSES:
            return None
        return RunSummary(
            run_id=start["start"],
            agent_id=agent_id,
            intent=start["intent"],
            started_at=start["started_at"],
            ended_at=end["ended_at"],
            status=end["status"],
            outcome_status=end["outcome_status"],
            turn_count=end["turn_count"],
        )
    except (KeyError, TypeError):
        return None


def run_of(summary: RunSummary, agent_dir: str) -> RunState:
    """A run read back from the index, to read its file."""
    run = RunState(
        run_id=summary.run_id,
        agent_id=summary.agent_id,
        path=os.path.join(agent_dir, encode_name(summary.run_id) + RUN_SUFFIX),
        intent=summary.intent,
        started_at=summary.started_at,
    )
    run.take_summary(summary)
    return run


def _entry_read_at(fd: int, offset: int) -> Optional[dict]:
    """The index entry at C{offset}: a line read a block at a time."""
    size, data = 512, b""
    while True:
        data += os.pread(fd, size, offset + len(data))
        end = data.find(b"\n")
        if end >= 0:
            try:
                return _entry(data[:end].decode("ascii"))
            except ValueError:
                return None
        if len(data) < size or len(data) > MAX_LINE:
            return None
        size *= 2


@dataclass
class Findings:
    """What loading found wrong, for the store to log on the reactor thread."""

    notes: list = field(default_factory=list)
    #: Ids of runs with damaged lines (their readable records are served).
    corrupt: set = field(default_factory=set)

    def check(self, path: str, run_file: RunFile, sync: bool) -> None:
        """Cut a torn last line off a run file and note damaged lines."""
        if run_file.torn:
            self.notes.append(f"{path}: cut off a torn last line ({run_file.torn} bytes)")
            cut_torn_line(path, run_file, sync)
        if run_file.damaged:
            self.notes.append(f"{path}: damaged line(s) {run_file.damaged}; run marked corrupt")


def load_agent(agent_dir: str, sync: bool, findings: Findings) -> Optional[AgentLoad]:
    """
    Load one agent directory: its runs in start order, or None if it holds
    nothing to serve. Runs the index holds open are checked against their
    files; a missing, damaged or stale index is rebuilt from the files.
    """
    dir_name = os.path.basename(agent_dir)
    names = {n for n in os.listdir(agent_dir) if n.endswith(RUN_SUFFIX) and not n.startswith(".")}
    try:
        loaded, run_ids, data = read_index(agent_dir)
        if encode_name(loaded.agent_id) != dir_name:
            raise StaleIndex("names another agent")
        if len(run_ids) != len(names) or set(map(operator.add, map(encode_name, run_ids), itertools.repeat(RUN_SUFFIX))) != names:
            raise StaleIndex("out of step with the run files")
    except StaleIndex as e:
        findings.notes.append(f"{agent_dir}: index {e}; rebuilt from the run files")
        return _rebuild(agent_dir, names, sync, findings)
    ended, unserved = [], set()
    for position in [n for n, status in enumerate(loaded.statuses) if status == OPEN]:
        end = loaded.ends[position]
        run = run_at(
            loaded.agent_id,
            agent_dir,
            entry_at(data, loaded.starts[position]),
            entry_at(data, end) if end >= 0 else None,
        )
        try:
            run_file = read_run_file(run.path)
            findings.check(run.path, run_file, sync)
        except OSError as e:
            findings.notes.append(f"{run.path}: unreadable ({e}); not served")
            unserved.add(position)
            continue
        if run_file.damaged:
            findings.corrupt.add(run.run_id)
        state = state_from_file(run.path, run_file)
        if state is not None and state.run_id == run.run_id:
            run.take_summary(state.summary())
        if run.status == "in_progress":
            loaded.held[position] = run
        else:
            ended.append((position, run))
    if ended:
        entries = [run.end_entry() for _, run in ended]
        offset = append_to_index(agent_dir, b"".join(entries))
        for (position, run), entry in zip(ended, entries):
            loaded.statuses[position] = STATUS_CODES[run.status]
            loaded.ends[position] = offset
            offset += len(entry)
    return loaded.without(unserved) if unserved else loaded


def _rebuild(agent_dir: str, names: set, sync: bool, findings: Findings) -> Optional[AgentLoad]:
    dir_name = os.path.basename(agent_dir)
    try:
        loaded, run_ids, _ = read_index(agent_dir)
        agent_id, order = loaded.agent_id, {run_id: i for i, run_id in enumerate(run_ids)}
    except StaleIndex:
        agent_id, order = decode_name(dir_name), {}
    if agent_id is not None and encode_name(agent_id) != dir_name:
        agent_id, order = decode_name(dir_name), {}
    runs = []
    for name in sorted(names):
        path = os.path.join(agent_dir, name)
        try:
            run_file = read_run_file(path)
            findings.check(path, run_file, sync)
        except OSError as e:
            findings.notes.append(f"{path}: unreadable ({e}); not served")
            continue
        run = state_from_file(path, run_file)
        if run is None:
            findings.notes.append(f"{path}: no readable started record; not served")
            continue
        if agent_id is None and encode_name(run.agent_id) == dir_name:
            agent_id = run.agent_id
        if encode_name(run.run_id) + RUN_SUFFIX != name or run.agent_id != agent_id:
            findings.notes.append(f"{path}: holds run {run.run_id!r} of another place; not served")
            continue
        if run_file.damaged:
            findings.corrupt.add(run.run_id)
        runs.append(run)
    if agent_id is None:
        return None
    runs.sort(
        key=lambda r: (0, order[r.run_id], "") if r.run_id in order else (1, r.started_at, r.run_id)
    )
    offsets = write_index(agent_dir, agent_id, runs, sync)
    return AgentLoad(
        agent_id,
        agent_dir,
        array("q", [hash(run.run_id) for run in runs]),
        bytearray(STATUS_CODES[run.status] for run in runs),
        array("q", [start for start, _ in offsets]),
        array("q", [end for _, end in offsets]),
        json.dumps([run.started_at for run in runs]),
        {n: run for n, run in enumerate(runs) if run.status == "in_progress"},
    )
