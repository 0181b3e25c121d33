"""
Run files: one JSON record per line, read whole at recovery or a page at a
time by byte offset, and the in-memory state the store keeps per run.
Plain blocking file work: the store runs it in its own threads.
"""

import json
import os
from array import array
from dataclasses import dataclass, field
from typing import Optional

from car_twisted import disk
from car_twisted.interfaces import RunSummary, summarize


_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def encode_line(record: dict) -> bytes:
    """One record as one line: ASCII JSON, so no text can break the line."""
    return _ENCODER.encode(record).encode() + b"\n"


@dataclass(eq=False)
class RunState:
    """
    A run's summary and file: what the store keeps in memory about an open
    run, and reads back from the index for another.
    """

    run_id: str
    agent_id: str
    path: str
    intent: str
    started_at: str
    ended_at: Optional[str] = None
    status: str = "in_progress"
    outcome_status: Optional[str] = None
    turn_count: int = 0
    #: The last write to this run handed to the disk thread (reads wait for it).
    last_write: object = None
    #: Its position among every agent's runs, once the store filed it.
    overall: Optional[int] = None

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


@dataclass
class RunFile:
    """A run file as read: its readable records and what was wrong with it."""

    records: list
    #: 1-based numbers of complete lines that are not a readable record.
    damaged: list = field(default_factory=list)
    #: Bytes after the last newline: a write cut short by a crash.
    torn: int = 0


def parse_record(line: bytes) -> Optional[dict]:
    """The record a line holds, or None if it is damaged."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("record"), str):
        return record
    return None


def read_run_file(path: str) -> RunFile:
    with disk.open_regular(path) as f:
        data = f.read()
    complete = data.rfind(b"\n") + 1
    records, damaged = [], []
    for number, line in enumerate(data[:complete].split(b"\n")[:-1], 1):
        record = parse_record(line)
        if record is not None:
            records.append(record)
        else:
            damaged.append(number)
    return RunFile(records, damaged, len(data) - complete)


#: A longer line is damaged: a record is at most 256 KiB encoded, and its
#: ASCII escapes can triple that.
MAX_LINE = 1024 * 1024


@dataclass(frozen=True)
class RecordOffsets:
    """
    Where each readable record of a run file lies, for the complete lines
    scanned so far: a page is read by byte offset, not by reading the file.
    Never changed once built: a scan returns a new one.
    """

    #: Byte offsets where record N starts and where its line ends.
    starts: array = field(default_factory=lambda: array("q"))
    ends: array = field(default_factory=lambda: array("q"))
    #: Bytes and number of the complete lines scanned.
    scanned: int = 0
    lines: int = 0
    #: Whether the first readable record is a ``started`` record.
    started: bool = False
    #: 1-based numbers of the damaged lines the last scan found.
    damaged: tuple = ()
    #: Scanned after the run ended: the file will not grow.
    settled: bool = False

    def __len__(self) -> int:
        return len(self.starts)

    def page(self, cursor: int, limit: int, budget: int) -> int:
        """
        How many records from C{cursor} make one page: at most C{limit}, and
        at most C{budget} bytes of the file unless one record alone is more.
        """
        end = min(cursor + limit, len(self.starts))
        count = 0
        while cursor + count < end and (
            count == 0 or self.ends[cursor + count] - self.starts[cursor] <= budget
        ):
            count += 1
        return count

    def covers(self, cursor: int, limit: int, budget: int) -> bool:
        """Whether the page from C{cursor} is whole without scanning further."""
        count = self.page(cursor, limit, budget)
        return self.settled or count == limit or cursor + count < len(self.starts)


def scan_records(
    path: str, known: RecordOffsets, cursor: int, limit: int, budget: int, ended: bool
) -> RecordOffsets:
    """
    Extend C{known} with the complete lines written after it, parsing each
    once, until the page C{known.page(cursor, limit, budget)} is whole: a
    run read from its start is scanned no further than it is read. Start
    over if the file no longer continues the lines C{known} holds (it was
    truncated or replaced).

    @param ended: the run has ended, so a scan to the end settles it.
    """
    with disk.open_regular(path) as f:
        if known.scanned:
            f.seek(known.scanned - 1)
            if f.read(1) != b"\n":
                known = RecordOffsets()
                f.seek(0)
        starts, ends = array("q", known.starts), array("q", known.ends)
        lines, started, damaged = known.lines, known.started, []
        offset = position = known.scanned  # where the line starts, how far read
        overlong, settled = False, ended
        while True:
            if len(starts) >= cursor + limit or (
                len(starts) > cursor and ends[-1] - starts[cursor] > budget
            ):
                settled = False
                break
            chunk = f.readline(MAX_LINE)
            position += len(chunk)
            if not chunk.endswith(b"\n"):
                if len(chunk) < MAX_LINE:
                    break  # the end; a torn last line is left for a later scan
                overlong = True
                continue
            lines += 1
            record = None if overlong else parse_record(chunk)
            overlong = False
            if record is None:
                damaged.append(lines)
            else:
                if not starts:
                    started = record["record"] == "started"
                starts.append(offset)
                ends.append(position)
            offset = position
    return RecordOffsets(starts, ends, offset, lines, started, tuple(damaged), settled)


def read_records_at(path: str, offsets: RecordOffsets, cursor: int, count: int):
    """
    Read records C{cursor} to C{cursor + count} by their offsets, in one
    read of just their bytes.

    @return: the records, or None if the file no longer holds a record at
        each offset (it changed after the scan).
    """
    if not count:
        return []
    first, last = offsets.starts[cursor], offsets.ends[cursor + count - 1]
    before = 1 if first else 0
    with disk.open_regular(path) as f:
        data = os.pread(f.fileno(), last - first + before, first - before)
    if before and data[:1] != b"\n":
        return None
    records = []
    for n in range(cursor, cursor + count):
        line = data[offsets.starts[n] - first + before : offsets.ends[n] - first + before]
        record = parse_record(line) if line.find(b"\n") == len(line) - 1 else None
        if record is None:
            return None
        records.append(record)
    return records


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
