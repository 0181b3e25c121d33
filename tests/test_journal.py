"""
The file store's write-ahead journal: frames and their torn tails, replay
into the run files (never twice, whatever the run files already hold),
checkpoints, and a store restarted over a journal a crash left.
"""

import os
import shutil

from twisted.internet import reactor
from twisted.trial import unittest

from car_twisted.records import ended_record
from car_twisted.store import journal, runfiles
from car_twisted.store.file import FileRunStore
from tests.store_conformance import started, turn
from tests.support import SUCCESS_OUTCOME, wait_for, run_file


def journal_names(runs_dir):
    return sorted(n for n in os.listdir(runs_dir) if n.startswith(journal.PREFIX))


def read(path):
    with open(path, "rb") as f:
        return f.read()


class ReplayTests(unittest.TestCase):
    """journal.replay on journals and run files written by hand."""

    def setUp(self):
        self.runs_dir = self.mktemp()
        os.makedirs(os.path.join(self.runs_dir, "agent-a"))
        self.notes = []

    def write_journal(self, number, data):
        with open(os.path.join(self.runs_dir, f"{journal.PREFIX}{number}"), "wb") as f:
            f.write(data)

    def lines(self, *names):
        return b"".join(runfiles.encode_line({"record": name}) for name in names)

    def run_file(self, name="run-1"):
        return os.path.join(self.runs_dir, "agent-a", name + ".jsonl")

    def test_torn_tail_is_cut(self):
        """Frames after the last intact one (cut short, or failing their
        checksum) are never replayed; the intact ones before are, and the
        journal is gone afterwards."""
        whole = journal.frame(b"agent-a/run-1.jsonl", 0, self.lines("started"))
        second = journal.frame(b"agent-a/run-1.jsonl", 1, self.lines("turn"))
        damaged = bytearray(second)
        damaged[-3] ^= 0xFF
        for tail in (second[:-4], second[:5], bytes(damaged)):
            if os.path.exists(self.run_file()):
                os.unlink(self.run_file())
            self.write_journal(1, whole + tail)
            self.assertEqual(journal.read_frames(whole + tail)[1], len(whole))
            self.assertEqual(journal.replay(self.runs_dir, True, self.notes), 2)
            self.assertEqual(read(self.run_file()), self.lines("started"))
            self.assertEqual(journal_names(self.runs_dir), [])
        self.assertIn(f"cut off a torn tail ({len(tail)} bytes)", self.notes[-2])

    def test_replay_writes_only_what_the_run_file_lacks(self):
        """A frame writes only records past the run file's readable
        records: a file that kept everything is not changed, a file that
        lost its tail (or its torn last line) gets exactly the rest, a
        missing file is created by its start, and replaying twice adds
        nothing."""
        frames = journal.frame(b"agent-a/run-1.jsonl", 0, self.lines("started")) + journal.frame(
            b"agent-a/run-1.jsonl", 1, self.lines("turn", "ended")
        )
        whole = self.lines("started", "turn", "ended")
        for on_disk in (whole, self.lines("started", "turn") + b'{"rec', self.lines("started"), None):
            if on_disk is None:
                os.unlink(self.run_file())
            else:
                with open(self.run_file(), "wb") as f:
                    f.write(on_disk)
            for _ in range(2):
                self.write_journal(7, frames)
                journal.replay(self.runs_dir, True, self.notes)
                self.assertEqual(read(self.run_file()), whole)

    def test_frames_continue_across_journals(self):
        """Journals are replayed oldest first, and a frame already
        replayed from an older journal is not written again."""
        self.write_journal(3, journal.frame(b"agent-a/run-1.jsonl", 0, self.lines("started")))
        self.write_journal(
            12,
            journal.frame(b"agent-a/run-1.jsonl", 0, self.lines("started"))
            + journal.frame(b"agent-a/run-1.jsonl", 1, self.lines("turn")),
        )
        self.assertEqual(journal.replay(self.runs_dir, True, self.notes), 13)
        self.assertEqual(read(self.run_file()), self.lines("started", "turn"))

    def test_a_gap_is_not_filled(self):
        """A run file missing, or holding fewer records than a frame
        continues from, is left alone with a note: records are never
        written at the wrong position."""
        self.write_journal(1, journal.frame(b"agent-a/run-1.jsonl", 2, self.lines("turn")))
        with open(self.run_file("run-2"), "wb") as f:
            f.write(self.lines("started"))
        self.write_journal(2, journal.frame(b"agent-a/run-2.jsonl", 3, self.lines("turn")))
        journal.replay(self.runs_dir, True, self.notes)
        self.assertFalse(os.path.exists(self.run_file()))
        self.assertEqual(read(self.run_file("run-2")), self.lines("started"))
        self.assertIn("missing, and the journal does not start it", self.notes[0])
        self.assertIn("holds 1 records, the journal continues at 3", self.notes[1])

    def test_new_agent_directory_is_private(self):
        """A start replayed for an agent whose directory was lost creates
        the directory 0700 and the run file 0600."""
        self.write_journal(1, journal.frame(b"agent-b/run-1.jsonl", 0, self.lines("started")))
        journal.replay(self.runs_dir, True, self.notes)
        path = os.path.join(self.runs_dir, "agent-b", "run-1.jsonl")
        self.assertEqual(read(path), self.lines("started"))
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)


class StoreJournalTests(unittest.TestCase):
    """The file store writing its journal, checkpointing it, and
    restarting over one a crash left."""

    def setUp(self):
        self.data_dir = self.mktemp()
        self.runs_dir = os.path.join(self.data_dir, "runs")

    async def open(self, **kwargs):
        store = FileRunStore(reactor, self.data_dir, **kwargs)
        self.addCleanup(store.close)
        await store.open()
        return store

    async def crash(self, store):
        """
        Close C{store} as if the daemon had been killed before any
        checkpoint: the journal files as they were are put back after the
        clean close removed them.
        """
        kept = self.mktemp()
        os.mkdir(kept)
        for name in journal_names(self.runs_dir):
            shutil.copy(os.path.join(self.runs_dir, name), kept)
        await store.close()
        for name in os.listdir(kept):
            shutil.copy(os.path.join(kept, name), self.runs_dir)

    async def one_run(self, store):
        record = started()
        run_id = record["run_id"]
        await store.start_run(record)
        await store.append_turns(run_id, [turn("0"), turn("1")], 10)
        await store.append_turns(run_id, [turn("2")], 10)
        await store.end_run(run_id, ended_record("outcome", outcome=SUCCESS_OUTCOME))
        return run_id, run_file(store, run_id)

    async def test_restart_over_the_journal_never_duplicates(self):
        """Restarted over the journal a crash left, the store replays it
        into the run files: a run file that kept every record is
        unchanged, one that lost its unsynced tail, or was never synced
        into existence, is completed; each serves its records once, and
        the replayed journal is gone."""
        for damage in ("none", "lost its tail", "lost"):
            self.setUp()
            store = await self.open()
            run_id, path = await self.one_run(store)
            whole = read(path)
            await self.crash(store)
            self.assertEqual(journal_names(self.runs_dir), [f"{journal.PREFIX}1"])
            if damage == "lost its tail":
                os.truncate(path, whole.index(b"\n") + 5)
            elif damage == "lost":
                os.unlink(path)
            store = await self.open()
            self.assertEqual(read(path), whole, damage)
            records, _ = await store.read_records(run_id, 0, 10)
            self.assertEqual(
                [r["record"] for r in records], ["started", "turn", "turn", "turn", "ended"], damage
            )
            self.assertEqual((await store.get_run(run_id)).status, "completed")
            self.assertEqual(journal_names(self.runs_dir), [f"{journal.PREFIX}2"])
            self.assertEqual(store.corrupt_runs, set())
            await store.close()

    async def test_crash_during_a_checkpoint(self):
        """A crash while a checkpoint synced the run files leaves the old
        journal beside the new one: both are replayed, oldest first, and
        no record is written twice."""
        store = await self.open(checkpoint_bytes=1)
        self.patch(journal, "checkpoint", lambda generation: os.close(generation.fd))
        run_ids = []
        for _ in range(3):
            run_id, path = await self.one_run(store)
            run_ids.append((run_id, path, read(path)))
        self.assertGreater(len(journal_names(self.runs_dir)), 2)
        self.patch(journal.Journal, "close", lambda journal: os.close(journal.current.fd))
        await store.close()
        for _, path, _ in run_ids[1:]:
            os.unlink(path)
        store = await self.open()
        for run_id, path, whole in run_ids:
            self.assertEqual(read(path), whole)
            records, _ = await store.read_records(run_id, 0, 10)
            self.assertEqual(len(records), 5)
        self.assertEqual(len(journal_names(self.runs_dir)), 1)

    async def test_checkpoint_syncs_run_files_then_drops_the_journal(self):
        """Once the journal passes checkpoint_bytes, the next batch begins
        a new journal file; the old one is deleted only after every run
        file and directory it wrote was fsynced."""
        events = []
        real_fsync, real_unlink = os.fsync, os.unlink
        self.patch(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
        self.patch(os, "unlink", lambda path: (events.append(("unlink", path)), real_unlink(path)))
        store = await self.open(checkpoint_bytes=1)
        run_id, path = await self.one_run(store)
        await wait_for(lambda: store._checkpointing is None, "the checkpoints")
        self.assertEqual(len(journal_names(self.runs_dir)), 1)
        first = os.path.join(self.runs_dir, f"{journal.PREFIX}1")
        dropped = events.index(("unlink", first))
        synced = {p for kind, p in events[:dropped] if kind == "fsync"}
        self.assertIn(os.path.realpath(path), synced)
        self.assertIn(os.path.realpath(os.path.dirname(path)), synced)
        self.assertIn(os.path.realpath(self.runs_dir), synced)
        await store.close()
        self.assertEqual(journal_names(self.runs_dir), [])
