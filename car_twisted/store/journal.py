"""
The file store's write-ahead journal: one append-only file under
C{runs/}, shared by every run and agent. A write is acknowledged once it is
in the journal (one C{fdatasync} per group commit); the run files are
written without syncing them, synced later by a checkpoint, and brought up
to date from the journal at start after a crash. See docs/storage.md.

    runs/.journal-<n>    frames: length, CRC-32, run position, run file, lines

A frame is C{<length u32><crc32 u32>} then its body, C{<position u64>
<path length u16><path><lines>}: C{position} is the number of records the
run file held before these lines, C{path} the run file's path under
C{runs/}. A frame cut short or failing its checksum ends the journal: a
torn tail, never acknowledged.

A journal file is created filled with zeros (which end it as a torn tail
would) and written in place: an fdatasync then flushes data only, with no
file-system metadata to commit, so it does not also commit the run files
the batch created.

Plain blocking file work: the store runs it in its own threads.
"""

import errno
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass, field

from car_twisted import disk
from car_twisted.store import runfiles

PREFIX = ".journal-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d{1,12})")
_HEADER = struct.Struct("<II")
_BODY = struct.Struct("<QH")
#: The only paths a frame may name: runs/<agent-dir>/<run-file>.jsonl.
_RUN_PATH = re.compile(rb"[a-z0-9_%~-]{1,120}/[a-z0-9_%~-]{1,120}\.jsonl")


def frame(relative_path: bytes, position: int, lines: bytes) -> bytes:
    """One journal frame: C{lines} for the run file at record C{position}."""
    body = _BODY.pack(position, len(relative_path)) + relative_path + lines
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def read_frames(data: bytes):
    """
    The complete, intact frames of a journal: C{([(path, position, lines)],
    length)}, C{length} the bytes they take; what follows is a torn tail.
    """
    frames, offset = [], 0
    while offset + _HEADER.size <= len(data):
        length, checksum = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        body = data[offset + _HEADER.size : end]
        if end > len(data) or length < _BODY.size or zlib.crc32(body) != checksum:
            break
        position, path_length = _BODY.unpack_from(body)
        path = body[_BODY.size : _BODY.size + path_length]
        if not _RUN_PATH.fullmatch(path):
            break
        frames.append((path.decode("ascii"), position, body[_BODY.size + path_length :]))
        offset = end
    return frames, offset


@dataclass(eq=False)
class Generation:
    """One journal file, and what its frames wrote that is not synced yet."""

    path: str
    fd: int
    size: int = 0
    #: Run files written, and directories that gained entries, since it began.
    files: set = field(default_factory=set)
    directories: set = field(default_factory=set)


class Journal:
    """
    The journal being appended to. One batch at a time calls L{append} and
    L{rotate}; L{checkpoint} of a sealed generation may run beside them.
    """

    def __init__(self, runs_dir: str, number: int, preallocate: int):
        self.runs_dir = runs_dir
        self._number = number
        self._preallocate = preallocate
        self.current = self._create()

    @property
    def size(self) -> int:
        return self.current.size

    def _create(self) -> Generation:
        """
        A new journal file of zeros, durable with its name in C{runs/}. On
        a disk without room for the zeros it starts empty and grows.
        """
        path = os.path.join(self.runs_dir, f"{PREFIX}{self._number}")
        fd = disk.create_file(path)
        try:
            try:
                zeros = bytes(min(self._preallocate, 1024 * 1024))
                for offset in range(0, self._preallocate, len(zeros)):
                    disk.write_all(fd, zeros[: self._preallocate - offset])
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                os.ftruncate(fd, 0)
            os.fsync(fd)
            disk.sync_directory(self.runs_dir)
            in_place = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return Generation(path, in_place)

    def append(self, frames: bytes, files, directories) -> None:
        """
        Append frames and make them durable. On failure their place is
        zeroed again (and that made durable) before the error is raised, so
        a failed write leaves nothing to replay.
        """
        generation = self.current
        try:
            disk.write_at(generation.fd, frames, generation.size)
            os.fdatasync(generation.fd)
        except OSError:
            disk.write_at(generation.fd, bytes(len(frames)), generation.size)
            os.fdatasync(generation.fd)
            raise
        generation.size += len(frames)
        generation.files.update(files)
        generation.directories.update(directories)

    def rotate(self) -> Generation:
        """Begin a new journal file; the old one is returned to checkpoint."""
        self._number += 1
        try:
            fresh = self._create()
        except BaseException:
            self._number -= 1
            raise
        sealed, self.current = self.current, fresh
        return sealed

    def close(self) -> None:
        """Checkpoint the journal being appended to: no journal is left."""
        checkpoint(self.current)


def checkpoint(generation: Generation) -> None:
    """
    Sync every run file and directory a generation wrote, then delete it:
    what it held is in the run files for good. On an error the journal
    file stays, to be replayed at the next start.
    """
    try:
        for path in generation.files:
            _sync_file(path)
        for directory in generation.directories:
            _sync_file(directory)
    finally:
        os.close(generation.fd)
    os.unlink(generation.path)


def _sync_file(path: str) -> None:
    """fsync a file or directory if it is still there (a failed start is removed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            os.fsync(fd)
    finally:
        os.close(fd)


def replay(runs_dir: str, sync: bool, notes: list) -> int:
    """
    Bring the run files up to date from the journals a crash left, oldest
    first, then delete them. Idempotent: a frame writes only the records
    past its run file's readable records (a torn last line is cut first),
    so a record is never written twice, and a crash during replay only
    means replaying again.

    @return: the number the next journal takes.
    """
    numbers = sorted(
        int(match.group(1))
        for match in map(_NAME.fullmatch, os.listdir(runs_dir))
        if match is not None
    )
    replay = _Replay(sync, notes)
    for number in numbers:
        path = os.path.join(runs_dir, f"{PREFIX}{number}")
        try:
            with disk.open_regular(path) as f:
                data = f.read()
        except OSError as e:
            notes.append(f"{path}: unreadable journal ({e}); not replayed")
            continue
        frames, length = read_frames(data)
        if data[length:].strip(b"\0"):
            notes.append(f"{path}: cut off a torn tail ({len(data) - length} bytes)")
        for relative, position, lines in frames:
            replay.apply(os.path.join(runs_dir, relative), position, lines)
    replay.finish()
    if numbers:
        notes.append(f"replayed {len(numbers)} journal file(s) a crash left: {replay}")
    for number in numbers:
        os.unlink(os.path.join(runs_dir, f"{PREFIX}{number}"))
    return numbers[-1] + 1 if numbers else 1


class _Replay:
    """Frames applied to the run files, and what they wrote."""

    def __init__(self, sync: bool, notes: list):
        self._sync = sync
        self._notes = notes
        self._held = {}  # run file -> readable records it holds; None: not written
        self._directories = set()  # directories that gained entries
        self._written = set()  # run files replay wrote records into
        self._records = 0

    def apply(self, path: str, position: int, lines: bytes) -> None:
        """Write the records of one frame its run file does not hold yet."""
        if path not in self._held:
            self._held[path] = self._records_held(path, position)
        count = self._held[path]
        if count is None:
            return
        if count < position:
            self._notes.append(
                f"{path}: holds {count} records, the journal continues at {position}; not replayed"
            )
            self._held[path] = None
            return
        records = lines.split(b"\n")[:-1]
        missing = records[count - position :]
        if missing:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                disk.write_all(fd, b"".join(line + b"\n" for line in missing))
            finally:
                os.close(fd)
            self._written.add(path)
            self._records += len(missing)
        self._held[path] = max(count, position + len(records))

    def _records_held(self, path: str, position: int):
        """
        How many readable records a run file holds, its torn last line cut
        off; a missing file is created if the frame starts it (position 0).
        None if the file cannot be written.
        """
        try:
            run_file = runfiles.read_run_file(path)
        except FileNotFoundError:
            if position != 0:
                self._notes.append(f"{path}: missing, and the journal does not start it; not replayed")
                return None
            agent_dir = os.path.dirname(path)
            if disk.make_directory(agent_dir):
                self._directories.add(os.path.dirname(agent_dir))
            os.close(disk.create_file(path))
            self._directories.add(agent_dir)
            return 0
        except OSError as e:
            self._notes.append(f"{path}: unreadable ({e}); the journal is not replayed into it")
            return None
        if run_file.torn:
            self._notes.append(f"{path}: cut off a torn last line ({run_file.torn} bytes)")
            runfiles.cut_torn_line(path, run_file, self._sync)
        return len(run_file.records)

    def finish(self) -> None:
        """
        Sync every run file the journals name, written now or before the
        crash (then perhaps never synced), so the journals can go.
        """
        if self._sync:
            for path in [p for p, count in self._held.items() if count is not None]:
                _sync_file(path)
            for directory in self._directories:
                _sync_file(directory)

    def __str__(self) -> str:
        return (
            f"{len(self._held)} run file(s) checked,"
            f" {self._records} record(s) written into {len(self._written)} of them"
        )
