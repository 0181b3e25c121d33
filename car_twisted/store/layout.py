"""
The file store's on-disk layout: names for ids, run files, agent indexes.

    <data-dir>/runs/<agent-dir>/<run-file>.jsonl   one JSON record per line
    <data-dir>/runs/<agent-dir>/.index             the agent's runs, in start order (and drops)
    <data-dir>/runs/.lock                          held by the daemon using the store

Everything here is plain blocking file work: the store runs it in its own
threads, never on the reactor thread.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from car_twisted.interfaces import RUN_STATUSES, RunSummary, summarize

RUNS = "runs"
INDEX = ".index"
LOCK = ".lock"
RUN_SUFFIX = ".jsonl"
DIR_MODE = 0o700
FILE_MODE = 0o600

#: Bytes a name keeps as they are. Upper case is escaped too, so ids that
#: differ only in case stay distinct on case-insensitive filesystems, and
#: "." is escaped, so no name is ".", ".." or hidden.
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
_HEX = frozenset("0123456789abcdef")
#: Longer encodings become a prefix, "~" and a digest: filesystems cap a
#: name at 255 bytes. "~" never appears in a plain encoding.
_LONGEST_PLAIN = 120
_HASHED_PREFIX = 64


def encode_name(identifier: str) -> str:
    """
    The file-system name for an agent or run id: only C{[a-z0-9_-%~]}, never
    empty, at most 120 characters. Plain names are reversed by
    L{decode_name}; a hashed (long) name is reversed by the record inside:
    the index header names its agent, the ``started`` record its run.
    """
    raw = identifier.encode("utf-8", "surrogatepass")
    name = "".join(chr(b) if b in _PLAIN else f"%{b:02x}" for b in raw) or "%"
    if len(name) > _LONGEST_PLAIN:
        name = f"{name[:_HASHED_PREFIX]}~{hashlib.sha256(raw).hexdigest()[:32]}"
    return name


def decode_name(name: str) -> Optional[str]:
    """The id a plain name encodes; None for a hashed or foreign name."""
    if name == "%":
        return ""
    raw = bytearray()
    i = 0
    while i < len(name):
        if name[i] == "%":
            digits = name[i + 1 : i + 3]
            if len(digits) != 2 or not _HEX.issuperset(digits) or int(digits, 16) in _PLAIN:
                return None
            raw.append(int(digits, 16))
            i += 3
        elif name[i].isascii() and ord(name[i]) in _PLAIN:
            raw.append(ord(name[i]))
            i += 1
        else:
            return None
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def encode_line(record: dict) -> bytes:
    """One record as one line: ASCII JSON, so no text can break the line."""
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


@dataclass(eq=False)
class RunState:
    """What the store keeps in memory about one run: its summary and file."""

    run_id: str
    agent_id: str
    path: str
    intent: str
    started_at: str
    ended_at: Optional[str] = None
    status: str = "in_progress"
    outcome_status: Optional[str] = None
    turn_count: int = 0
    #: Position in the agent's start order, once the start is durable.
    position: Optional[int] = None
    #: The last write to this run handed to the disk thread (reads wait for it).
    last_write: object = None

    def summary(self) -> RunSummary:
        return RunSummary(
            run_id=self.run_id,
            agent_id=self.agent_id,
            intent=self.intent,
            started_at=self.started_at,
            ended_at=self.ended_at,
            status=self.status,
            outcome_status=self.outcome_status,
            turn_count=self.turn_count,
        )

    def take_summary(self, summary: RunSummary) -> None:
        self.ended_at = summary.ended_at
        self.status = summary.status
        self.outcome_status = summary.outcome_status
        self.turn_count = summary.turn_count

    def start_entry(self) -> bytes:
        return encode_line(
            {"start": self.run_id, "intent": self.intent, "started_at": self.started_at}
        )

    def drop_entry(self) -> bytes:
        """The index entry of a pruned run."""
        return encode_line({"drop": self.run_id})

    def end_entry(self) -> bytes:
        return encode_line(
            {
                "end": self.run_id,
                "ended_at": self.ended_at,
                "status": self.status,
                "outcome_status": self.outcome_status,
                "turn_count": self.turn_count,
            }
        )


# Run files


@dataclass
class RunFile:
    """A run file as read: its readable records and what was wrong with it."""

    records: list
    #: 1-based numbers of complete lines that are not a readable record.
    damaged: list = field(default_factory=list)
    #: Bytes after the last newline: a write cut short by a crash.
    torn: int = 0


def read_run_file(path: str) -> RunFile:
    with open(path, "rb") as f:
        data = f.read()
    complete = data.rfind(b"\n") + 1
    records, damaged = [], []
    for number, line in enumerate(data[:complete].split(b"\n")[:-1], 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("record"), str):
            records.append(record)
        else:
            damaged.append(number)
    return RunFile(records, damaged, len(data) - complete)


def cut_torn_line(path: str, run_file: RunFile, sync: bool) -> None:
    """Cut a torn last line off: it was never acknowledged."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, os.fstat(fd).st_size - run_file.torn)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    run_file.torn = 0


def state_from_file(path: str, run_file: RunFile) -> Optional[RunState]:
    """The state of a run from its records; None if it has no ``started``."""
    records = run_file.records
    if not records or records[0]["record"] != "started":
        return None
    try:
        summary = summarize(records)
        run = RunState(
            run_id=summary.run_id,
            agent_id=summary.agent_id,
            path=path,
            intent=summary.intent,
            started_at=summary.started_at,
        )
        run.take_summary(summary)
    except (KeyError, TypeError, IndexError):
        return None
    if not all(isinstance(v, str) for v in (run.run_id, run.agent_id, run.intent, run.started_at)):
        return None
    return run


# Agent indexes


class StaleIndex(Exception):
    """An index that cannot be trusted: it must be rebuilt from the run files."""


def read_index(agent_dir: str) -> "tuple[str, list[RunState]]":
    """
    Read an agent's index: its agent id and its runs in start order.

    @raise StaleIndex: the index is missing, torn or damaged.
    """
    try:
        with open(os.path.join(agent_dir, INDEX), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StaleIndex("missing")
    if not data.endswith(b"\n"):
        raise StaleIndex("torn")
    runs = {}
    try:
        lines = [json.loads(line) for line in data.split(b"\n")[:-1]]
        agent_id = lines[0]["agent_id"]
        if not isinstance(agent_id, str):
            raise TypeError("agent_id")
        for entry in lines[1:]:
            if "start" in entry:
                run = RunState(
                    run_id=entry["start"],
                    agent_id=agent_id,
                    path=os.path.join(agent_dir, encode_name(entry["start"]) + RUN_SUFFIX),
                    intent=entry["intent"],
                    started_at=entry["started_at"],
                )
                if run.run_id in runs or not isinstance(run.intent, str):
                    raise ValueError("duplicate run")
                runs[run.run_id] = run
            elif "drop" in entry:
                del runs[entry["drop"]]
            else:
                run = runs[entry["end"]]
                run.ended_at = entry["ended_at"]
                run.status = entry["status"]
                run.outcome_status = entry["outcome_status"]
                run.turn_count = entry["turn_count"]
                if run.status not in RUN_STATUSES or type(run.turn_count) is not int:
                    raise ValueError("bad end entry")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise StaleIndex(f"damaged ({e.__class__.__name__})")
    return agent_id, list(runs.values())


def write_index(agent_dir: str, agent_id: str, runs: list, sync: bool) -> None:
    """Replace an agent's index atomically with one listing C{runs}."""
    temporary = os.path.join(agent_dir, INDEX + ".new")
    fd = create_file(temporary, exclusive=False)
    try:
        lines = [encode_line({"agent_id": agent_id})]
        for run in runs:
            lines.append(run.start_entry())
            if run.status != "in_progress":
                lines.append(run.end_entry())
        write_all(fd, b"".join(lines))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, os.path.join(agent_dir, INDEX))
    if sync:
        sync_directory(agent_dir)


def append_to_index(agent_dir: str, lines: bytes) -> None:
    """
    Append entries to an agent's index. Not synced: the index is rebuilt
    from the (synced) run files whenever it falls behind them.
    """
    fd = os.open(os.path.join(agent_dir, INDEX), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        write_all(fd, lines)
    finally:
        os.close(fd)


# Files and directories, created private


def create_file(path: str, exclusive: bool = True) -> int:
    """
    Create a file for writing with mode 0600 from the start. The fchmod only
    restores owner bits an unusual umask took away: the file is never wider.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_directory(path: str) -> bool:
    """Create a 0700 directory (never wider); False if it already existed."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    os.chmod(path, DIR_MODE)
    return True


def sync_directory(path: str) -> None:
    """Make the entries created in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# Loading


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


def load_agent(agent_dir: str, sync: bool, findings: Findings):
    """
    Load one agent directory: C{(agent_id, runs in start order)}, or None if
    it holds nothing to serve. Runs the index holds open are checked against
    their files; a missing, damaged or stale index is rebuilt from the files.
    """
    dir_name = os.path.basename(agent_dir)
    names = {n for n in os.listdir(agent_dir) if n.endswith(RUN_SUFFIX) and not n.startswith(".")}
    try:
        agent_id, indexed = read_index(agent_dir)
        if encode_name(agent_id) != dir_name:
            raise StaleIndex("names another agent")
        if {os.path.basename(run.path) for run in indexed} != names:
            raise StaleIndex("out of step with the run files")
    except StaleIndex as e:
        findings.notes.append(f"{agent_dir}: index {e}; rebuilt from the run files")
        return _rebuild(agent_dir, names, sync, findings)
    ended = []
    for run in indexed:
        if run.status == "in_progress":
            run_file = read_run_file(run.path)
            findings.check(run.path, run_file, sync)
            if run_file.damaged:
                findings.corrupt.add(run.run_id)
            state = state_from_file(run.path, run_file)
            if state is not None and state.run_id == run.run_id:
                run.take_summary(state.summary())
                if run.status != "in_progress":
                    ended.append(run.end_entry())
    if ended:
        append_to_index(agent_dir, b"".join(ended))
    return agent_id, indexed


def _rebuild(agent_dir: str, names: set, sync: bool, findings: Findings):
    dir_name = os.path.basename(agent_dir)
    try:
        agent_id, indexed = read_index(agent_dir)
        order = {run.run_id: i for i, run in enumerate(indexed)}
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
    write_index(agent_dir, agent_id, runs, sync)
    return agent_id, runs
