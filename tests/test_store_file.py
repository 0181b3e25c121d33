"""
The file store: the IRunStore conformance suite, plus what only a disk
shows: restart, torn and damaged files, the index, modes, path escapes,
fsync before acknowledging, and restart recovery.
"""

import gc
import json
import os
import re
import stat
import sys
import weakref
from array import array

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial import unittest

from car_twisted.interfaces import RunExists, RunNotFound, RunTerminal
from car_twisted.records import ended_record
from car_twisted.store import journal, naming, runfiles
from car_twisted.store.file import FileRunStore, RunIds, _start_order
from car_twisted.store.index import AgentLoad
from tests.store_conformance import HOSTILE_IDS, RunStoreConformance, started, turn
from tests.support import InProcessDaemon

OUTCOME = {"status": "success", "summary": "", "evidence": [], "metrics": {}, "timestamp": "t"}


class FileRunStoreConformanceTests(RunStoreConformance, unittest.TestCase):
    def make_store(self):
        store = FileRunStore(reactor, self.mktemp())
        self.addCleanup(store.close)
        return store


class FileStoreCase(unittest.TestCase):
    """A file store in a fresh directory, and helpers to look at it."""

    def setUp(self):
        self.data_dir = self.mktemp()

    async def open(self, **kwargs):
        store = FileRunStore(reactor, self.data_dir, **kwargs)
        self.addCleanup(store.close)
        await store.open()
        return store

    async def reopen(self, store, **kwargs):
        await store.close()
        return await self.open(**kwargs)

    async def fill(self, store, agent_id="agent-a"):
        """Three runs: ended with two turns, open with one turn, open bare."""
        ended, open_, bare = (started(agent_id=agent_id) for _ in range(3))
        await store.start_run(ended)
        await store.append_turns(ended["run_id"], [turn("1"), turn("2")], 10)
        await store.end_run(ended["run_id"], ended_record("outcome", outcome=OUTCOME))
        await store.start_run(open_)
        await store.append_turns(open_["run_id"], [turn("3")], 10)
        await store.start_run(bare)
        return [r["run_id"] for r in (ended, open_, bare)]

    def run_path(self, agent_id, run_id):
        return os.path.join(
            self.data_dir, "runs", naming.encode_name(agent_id), naming.encode_name(run_id) + ".jsonl"
        )

    def index_path(self, agent_id="agent-a"):
        return os.path.join(self.data_dir, "runs", naming.encode_name(agent_id), ".index")

    async def snapshot(self, store, run_ids, agent_id="agent-a"):
        """What a reader sees: summaries, records, and the listing."""
        return (
            [await store.get_run(r) for r in run_ids],
            [await store.read_records(r, 0, 100) for r in run_ids],
            await store.list_runs(agent_id, None, 100, None),
        )



class FileRunStoreTests(FileStoreCase):
    async def test_restart_serves_reads_from_disk(self):
        """A new store on the same directory serves the same summaries,
        records and listing as the store that wrote them."""
        store = await self.open()
        run_ids = await self.fill(store)
        before = await self.snapshot(store, run_ids)
        store = await self.reopen(store)
        self.assertEqual(await self.snapshot(store, run_ids), before)
        self.assertEqual([s.run_id for s in before[2][0]], run_ids[::-1])
        self.assertEqual(before[0][0].turn_count, 2)

    async def test_restart_lists_every_agent_in_start_order(self):
        """After a restart, every agent's runs list newest first across
        agents, as before it."""
        store = await self.open()
        ids = []
        for i in range(4):
            record = started(agent_id=f"agent-{i % 2}")
            record["started_at"] = f"2026-11-25T01:00:0{i}.000Z"
            await store.start_run(record)
            ids.append(record["run_id"])
        store = await self.reopen(store)
        page, _ = await store.list_runs(None, None, 10, None)
        self.assertEqual([s.run_id for s in page], ids[::-1])
        await store.close()

    async def test_restarted_store_continues_open_runs(self):
        """An open run loaded from disk takes more turns on its index
        sequence and its end, which survive another restart."""
        store = await self.open()
        _, open_id, _ = await self.fill(store)
        store = await self.reopen(store)
        self.assertEqual((await store.append_turns(open_id, [turn("4")], 10))[0]["index"], 1)
        await store.end_run(open_id, ended_record("incomplete", reason="x"))
        store = await self.reopen(store)
        summary = await store.get_run(open_id)
        self.assertEqual((summary.status, summary.turn_count), ("incomplete", 2))

    async def test_reads_wait_for_earlier_writes(self):
        """read_records issued right after writes, without waiting, sees them."""
        store = await self.open()
        record = started()
        store.start_run(record)
        store.append_turns(record["run_id"], [turn("a")], 10)
        records, cursor = await store.read_records(record["run_id"], 0, 10)
        self.assertEqual([r["record"] for r in records], ["started", "turn"])

    async def test_torn_last_line_is_cut_off(self):
        """A half-written last line is cut from the file at start; the run
        keeps its complete records and takes new ones on clean lines."""
        store = await self.open()
        _, open_id, _ = await self.fill(store)
        await store.close()
        path = self.run_path("agent-a", open_id)
        intact = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(b'{"record":"turn","prompt":"half')
        store = await self.open()
        self.assertEqual(os.path.getsize(path), intact)
        await store.append_turns(open_id, [turn("after")], 10)
        records, _ = await store.read_records(open_id, 0, 10)
        self.assertEqual([r.get("prompt") for r in records[1:]], ["3", "after"])
        with open(path, "rb") as f:
            self.assertEqual([json.loads(line)["record"] for line in f], ["started", "turn", "turn"])
        self.assertEqual(store.corrupt_runs, set())

    async def test_damaged_line_marks_run_corrupt(self):
        """A damaged line inside a run file marks the run corrupt; its
        readable records are still served and the store still starts."""
        store = await self.open()
        ended_id, open_id, _ = await self.fill(store)
        await store.close()
        for run_id in (ended_id, open_id):
            path = self.run_path("agent-a", run_id)
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
            lines[1] = b"\x00garbage{"
            with open(path, "wb") as f:
                f.write(b"\n".join(lines))
        store = await self.open()
        self.assertEqual(store.corrupt_runs, {open_id})
        records, _ = await store.read_records(ended_id, 0, 10)
        self.assertEqual([r.get("prompt") for r in records], [None, "2", None])
        self.assertEqual(records[-1]["termination"], "outcome")
        self.assertEqual(store.corrupt_runs, {open_id, ended_id})
        records, _ = await store.read_records(open_id, 0, 10)
        self.assertEqual([r["record"] for r in records], ["started"])

    async def test_bad_files_never_stop_the_start(self):
        """Unreadable run files, stray files and a damaged index are
        skipped or repaired; every good run is still served."""
        store = await self.open()
        run_ids = await self.fill(store)
        await store.close()
        agent_dir = os.path.dirname(self.index_path())
        with open(os.path.join(agent_dir, "nothing-readable.jsonl"), "wb") as f:
            f.write(b"not json\n")
        with open(os.path.join(self.data_dir, "runs", "stray-file"), "wb") as f:
            f.write(b"x")
        os.mkdir(os.path.join(self.data_dir, "runs", "empty-agent"))
        with open(self.index_path(), "ab") as f:
            f.write(b"{broken\n")
        store = await self.open()
        page, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual([s.run_id for s in page], run_ids[::-1])

    async def test_missing_index_is_rebuilt(self):
        """Without its index an agent's runs are listed in the same order,
        with the same summaries, and the index is written again."""
        store = await self.open()
        run_ids = await self.fill(store)
        await store.end_run(run_ids[2], ended_record("cancelled", reason_digest="00"))
        listing = await store.list_runs("agent-a", None, 10, None)
        await store.close()
        os.unlink(self.index_path())
        store = await self.open()
        self.assertEqual(await store.list_runs("agent-a", None, 10, None), listing)
        self.assertTrue(os.path.exists(self.index_path()))
        store = await self.reopen(store)
        self.assertEqual(await store.list_runs("agent-a", None, 10, None), listing)

    async def test_stale_index_is_caught_up(self):
        """An index behind its run files (entries lost in a crash) is
        caught up from the files: lost starts and lost ends alike, and the
        index is written back."""
        store = await self.open()
        run_ids = await self.fill(store)
        with open(self.index_path(), "rb") as f:
            early = f.read()
        later = started()
        await store.start_run(later)
        await store.end_run(run_ids[1], ended_record("incomplete", reason="x"))
        listing = await store.list_runs("agent-a", None, 10, None)
        await store.close()
        with open(self.index_path(), "wb") as f:
            f.write(early)
        store = await self.open()
        self.assertEqual(await store.list_runs("agent-a", None, 10, None), listing)
        await store.close()
        with open(self.index_path(), "rb") as f:
            entries = [json.loads(line) for line in f]
        with open(self.index_path(), "wb") as f:
            f.write(b"".join(runfiles.encode_line(e) for e in entries if e.get("end") != run_ids[1]))
        store = await self.open()
        self.assertEqual((await store.get_run(run_ids[1])).status, "incomplete")
        self.assertEqual(await store.list_runs("agent-a", None, 10, None), listing)
        with open(self.index_path(), "rb") as f:
            self.assertIn(run_ids[1], [json.loads(line).get("end") for line in f])

    async def test_files_and_directories_are_private(self):
        """Even under a permissive umask, directories are 0700 and files 0600."""
        self.addCleanup(os.umask, os.umask(0))
        store = await self.open()
        await self.fill(store)
        await store.start_run(started(agent_id="x" * 600, run_id="y" * 600))
        modes = {}
        for root, dirs, files in os.walk(self.data_dir):
            for name in dirs + files:
                path = os.path.join(root, name)
                modes[path] = stat.S_IMODE(os.lstat(path).st_mode)
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)
        self.assertGreater(len(modes), 8)
        for path, mode in modes.items():
            expected = 0o700 if os.path.isdir(path) else 0o600
            self.assertEqual(mode, expected, path)

    async def test_owner_bits_a_umask_takes_are_restored(self):
        """Under a umask that takes the owner's own bits away, run files,
        indexes and the journal are still 0600 and directories 0700, and
        the store writes and reads them."""
        self.addCleanup(os.umask, os.umask(0o277))
        store = await self.open()
        _, open_id, _ = await self.fill(store)
        await store.append_turns(open_id, [turn("more")], 10)
        for root, dirs, files in os.walk(self.data_dir):
            for name in dirs + files:
                path = os.path.join(root, name)
                expected = 0o700 if os.path.isdir(path) else 0o600
                self.assertEqual(stat.S_IMODE(os.lstat(path).st_mode), expected, path)
        store = await self.reopen(store)
        self.assertEqual((await store.get_run(open_id)).turn_count, 2)

    async def test_hostile_ids_stay_inside_runs(self):
        """No agent or run id creates anything outside runs/ or deeper than
        runs/<agent-dir>/<run-file>, and every name is of the safe alphabet."""
        sandbox = self.mktemp()
        os.mkdir(sandbox)
        self.data_dir = os.path.join(sandbox, "data")
        store = await self.open()
        for n, hostile in enumerate(HOSTILE_IDS):
            await store.start_run(started(run_id=hostile, agent_id=hostile))
            await store.start_run(started(run_id=f"{hostile}-{n}", agent_id="agent-a"))
        self.assertEqual(os.listdir(sandbox), ["data"])
        self.assertEqual(os.listdir(self.data_dir), ["runs"])
        runs = os.path.join(self.data_dir, "runs")
        agent_dirs = [n for n in os.listdir(runs) if not n.startswith(".")]
        self.assertEqual(len(agent_dirs), len(HOSTILE_IDS) + 1)
        for agent_dir in agent_dirs:
            self.assertRegex(agent_dir, r"^[a-z0-9_%~-]{1,120}$")
            self.assertTrue(os.path.isdir(os.path.join(runs, agent_dir)))
            for name in os.listdir(os.path.join(runs, agent_dir)):
                self.assertRegex(name, r"^([a-z0-9_%~-]{1,120}\.jsonl|\.index)$")
                self.assertTrue(os.path.isfile(os.path.join(runs, agent_dir, name)))
        store = await self.reopen(store)
        for hostile in HOSTILE_IDS:
            page, _ = await store.list_runs(hostile, None, 10, None)
            self.assertEqual([s.run_id for s in page], [hostile])

    def test_names_decode_back_to_their_ids(self):
        """Plain names decode to exactly their id; long ids get a hashed name
        that decodes to nothing (the id is kept inside) and stays short."""
        for identifier in HOSTILE_IDS + ["", "\ud800", "%41", "a~b"]:
            name = naming.encode_name(identifier)
            self.assertTrue(re.fullmatch(r"[a-z0-9_%~-]{1,120}", name), name)
            if len(identifier) < 40:
                self.assertEqual(naming.decode_name(name), identifier)
        self.assertIsNone(naming.decode_name(naming.encode_name("x" * 600)))
        self.assertNotEqual(naming.encode_name("x" * 600), naming.encode_name("x" * 601))
        self.assertNotEqual(naming.encode_name("AGENT"), naming.encode_name("agent"))
        for foreign in ["..", "A", "%4", "%61", "%zz", "é"]:
            self.assertIsNone(naming.decode_name(foreign), foreign)

    def journal_frames(self):
        """The frames of the journal files in runs/: (path, position, lines)."""
        runs = os.path.join(self.data_dir, "runs")
        frames = []
        for name in sorted(os.listdir(runs)):
            if name.startswith(journal.PREFIX):
                with open(os.path.join(runs, name), "rb") as f:
                    frames += journal.read_frames(f.read())[0]
        return frames

    async def test_acknowledged_only_after_journal_sync(self):
        """A write is acknowledged once its records are in the run file and
        in the journal, and the journal was fdatasynced after them; the run
        file itself is not synced before the acknowledgement.
        --durability none syncs nothing and keeps no journal."""
        synced = []
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)
            self.patch(os, name, lambda fd, real=real: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
        store = await self.open()
        record = started()
        run_id = record["run_id"]
        relative = f"agent-a/{naming.encode_name(run_id)}.jsonl"
        path = os.path.realpath(self.run_path("agent-a", run_id))

        def at_acknowledgement(_):
            with open(path, "rb") as f:
                return list(synced), self.journal_frames(), f.read()

        d = store.start_run(record)
        d.addCallback(at_acknowledgement)
        synced_at_ack, frames, data = await d
        self.assertEqual(frames, [(relative, 0, runfiles.encode_line(record))])
        self.assertEqual(data, runfiles.encode_line(record))
        self.assertTrue(os.path.basename(synced_at_ack[-1]).startswith(journal.PREFIX))
        self.assertNotIn(path, synced_at_ack)
        del synced[:]
        d = store.append_turns(run_id, [turn("a"), turn("b")], 10)
        d.addCallback(at_acknowledgement)
        synced_at_ack, frames, data = await d
        lines = data.split(b"\n")
        self.assertEqual(frames[1:], [(relative, 1, lines[1] + b"\n" + lines[2] + b"\n")])
        self.assertEqual([os.path.basename(p)[: len(journal.PREFIX)] for p in synced_at_ack], [journal.PREFIX])
        store = await self.reopen(store, durability="none")
        del synced[:]
        await self.fill(store, agent_id="agent-b")
        self.assertEqual(synced, [])
        self.assertEqual(self.journal_frames(), [])

    async def test_concurrent_writes_share_flushes(self):
        """Starts issued together are committed in a few batches, one
        journal fdatasync each, with no file or directory fsync before
        they are acknowledged."""
        syncs = []
        for name in ("fsync", "fdatasync"):
            real = getattr(os, name)
            self.patch(os, name, lambda fd, name=name, real=real: (syncs.append(name), real(fd)))
        store = await self.open()
        await store.start_run(started())
        del syncs[:]
        await gatherResults([store.start_run(started()) for _ in range(40)])
        self.assertLessEqual(len(syncs), 2)
        self.assertEqual(set(syncs), {"fdatasync"})
        page, _ = await store.list_runs("agent-a", None, 100, None)
        self.assertEqual(len(page), 41)

    async def test_settled_writes_are_not_kept(self):
        """Once a write is acknowledged, the store keeps neither its
        Deferred nor what it wrote: a run costs its summary, not its last
        write's records."""
        store = await self.open()
        record = started()
        await store.start_run(record)
        d = store.append_turns(record["run_id"], [turn("x" * 1000)], 10)
        results = []
        d.addCallback(results.append)
        acknowledged = weakref.ref(d)
        del d
        await store.start_run(started())  # committed after the turns (awaited: held by this coroutine)
        gc.collect()
        self.assertIsNone(acknowledged())
        stamped = results.pop()
        self.assertEqual(sys.getrefcount(stamped), 2)  # this frame's, and the call's
        self.assertEqual(stamped[0]["index"], 0)

    async def test_an_ended_run_is_freed_without_the_cycle_collector(self):
        """A run the store lets go of once its end is durable is freed by
        reference counting alone: it and its last write form no cycle, so
        it cannot outlive a gc.freeze() either."""
        store = await self.open()
        record = started()
        await store.start_run(record)
        ended = weakref.ref(store._runs[record["run_id"]])
        gc.disable()
        self.addCleanup(gc.enable)
        await store.end_run(record["run_id"], ended_record("incomplete", reason="x"))
        await store.start_run(started())  # the end's batch is wound up by now
        self.assertNotIn(record["run_id"], store._runs)
        self.assertIsNone(ended())

    async def test_open_run_files_and_indexes_stay_open(self):
        """A run's file is opened once for all its writes and closed when
        the run ends; an agent's index is opened once for all its entries;
        a closed store holds none of them open."""
        opened = []
        real_open = os.open
        self.patch(os, "open", lambda path, *args: (opened.append(path), real_open(path, *args))[1])
        store = await self.open()
        first, second = started(), started()
        await store.start_run(first)
        await store.append_turns(first["run_id"], [turn("1")], 10)
        await store.append_turns(first["run_id"], [turn("2")], 10)
        await store.start_run(second)
        await store.end_run(first["run_id"], ended_record("outcome", outcome=OUTCOME))
        run_path = self.run_path("agent-a", first["run_id"])
        self.assertEqual(opened.count(run_path), 1)
        self.assertEqual(opened.count(self.index_path()), 2)  # created, then appended to
        self.assertNotIn(os.path.abspath(run_path), open_paths())
        self.assertIn(os.path.abspath(self.run_path("agent-a", second["run_id"])), open_paths())
        await store.close()
        self.assertEqual([p for p in open_paths() if p.startswith(os.path.abspath(self.data_dir))], [])
        self.assertEqual(
            [r["record"] for r in runfiles.read_run_file(run_path).records], ["started", "turn", "turn", "ended"]
        )

    async def test_second_daemon_on_the_same_directory_is_refused(self):
        """Two stores never write the same directory at once."""
        await self.open()
        with self.assertRaises(RuntimeError):
            await FileRunStore(reactor, self.data_dir).open()

    async def test_recovery_ends_open_runs(self):
        """RunService.recover() ends every run a crashed daemon left open
        with reason "daemon restarted", leaves ended runs alone, and the
        ends are durable."""
        store = await self.open()
        ended_id, open_id, bare_id = await self.fill(store)
        store = await self.reopen(store)
        daemon = InProcessDaemon(store)
        self.assertEqual(await daemon.runs.recover(), 2)
        self.assertEqual(daemon.clock.getDelayedCalls(), [])
        store = await self.reopen(store)
        self.assertEqual(await store.open_runs(), [])
        self.assertEqual((await store.get_run(ended_id)).status, "completed")
        for run_id in (open_id, bare_id):
            records, _ = await store.read_records(run_id, 0, 10)
            self.assertEqual(
                (records[-1]["termination"], records[-1]["reason"]),
                ("incomplete", "daemon restarted"),
            )
        self.assertEqual(await InProcessDaemon(store).runs.recover(), 0)


class HeldRunsTests(FileStoreCase):
    """
    Only open runs are held in memory; ended runs are listed and read back
    from their agent's index (docs/storage.md, "What is held in memory").
    """

    async def mixed(self, store):
        """Eight runs of two agents, started a second apart: five end (two
        statuses), three stay open. Their ids, and the open ones."""
        ids, open_ids = [], set()
        for i in range(8):
            record = started(agent_id=f"agent-{i % 2}")
            record["started_at"] = f"2026-11-25T01:00:0{i}.000Z"
            await store.start_run(record)
            ids.append(record["run_id"])
            if i in (1, 4, 6):
                open_ids.add(record["run_id"])
            elif i % 3:
                await store.end_run(record["run_id"], ended_record("outcome", outcome=OUTCOME))
            else:
                await store.append_turns(record["run_id"], [turn("1")], 10)
                await store.end_run(record["run_id"], ended_record("cancelled", reason="x"))
        return ids, open_ids

    async def pages(self, store, agent_id, status, limit=3):
        """Every page of a listing, by cursor: the run ids."""
        listed, cursor = [], None
        while True:
            page, cursor = await store.list_runs(agent_id, cursor, limit, status)
            listed.extend(s.run_id for s in page)
            if cursor is None:
                return listed

    async def listings(self, store):
        return {
            (agent_id, status): await self.pages(store, agent_id, status)
            for agent_id in (None, "agent-0", "agent-1")
            for status in (None, "in_progress", "completed", "cancelled")
        }

    async def test_only_open_runs_are_held(self):
        """Once its end is durable a run leaves memory, and after a restart
        only the open runs are loaded whole, yet every listing (each
        agent's and everyone's, by status, page by page), get_run and
        read_records serve the ended runs as before."""
        store = await self.open()
        ids, open_ids = await self.mixed(store)
        self.assertEqual(set(store._runs), open_ids)
        summaries = [await store.get_run(run_id) for run_id in ids]
        self.assertEqual([s.status for s in summaries].count("in_progress"), 3)
        self.assertEqual(summaries[0].turn_count, 1)
        listings = await self.listings(store)
        self.assertEqual(listings[None, None], ids[::-1])
        self.assertEqual(listings["agent-1", None], ids[1::2][::-1])
        self.assertEqual(listings[None, "cancelled"], [ids[3], ids[0]])
        self.assertEqual(listings["agent-0", "in_progress"], [ids[6], ids[4]])
        records = [await store.read_records(run_id, 0, 10) for run_id in ids]
        store = await self.reopen(store)
        self.assertEqual(set(store._runs), open_ids)
        self.assertEqual(await self.listings(store), listings)
        self.assertEqual([await store.get_run(run_id) for run_id in ids], summaries)
        self.assertEqual([await store.read_records(run_id, 0, 10) for run_id in ids], records)
        with self.assertRaises(RunTerminal):
            await store.append_turns(ids[0], [turn()], 10)
        with self.assertRaises(RunExists):
            await store.start_run(started(run_id=ids[0], agent_id="agent-2"))

    async def test_pruned_runs_leave_the_index_across_restart(self):
        """Pruning ended runs read back from the index takes them out of
        every listing, get_run and read_records; cursors handed out
        before stay valid; a restart agrees; and a pruned id can start
        again."""
        store = await self.open()
        ids, open_ids = await self.mixed(store)
        store = await self.reopen(store)
        _, cursor = await store.list_runs(None, None, 3, None)
        self.assertEqual(await store.count_prunable("2099-01-01T00:00:00.000Z"), 5)
        pruned = await store.prune_runs("2099-01-01T00:00:00.000Z", 2)
        pruned += await store.prune_runs("2099-01-01T00:00:00.000Z", 10)
        self.assertEqual(sorted(pruned), sorted(set(ids) - open_ids))
        self.assertEqual(await store.count_prunable("2099-01-01T00:00:00.000Z"), 0)
        expected = [run_id for run_id in ids[::-1] if run_id in open_ids]
        self.assertEqual(await self.pages(store, None, None), expected)
        rest, _ = await store.list_runs(None, cursor, 10, None)
        self.assertEqual([s.run_id for s in rest], expected[1:])
        self.assertIsNone(await store.get_run(ids[0]))
        with self.assertRaises(RunNotFound):
            await store.read_records(ids[0], 0, 10)
        listings = await self.listings(store)
        store = await self.reopen(store)
        self.assertEqual(await self.listings(store), listings)
        self.assertIsNone(await store.get_run(ids[0]))
        await store.start_run(started(run_id=ids[0], agent_id="agent-2"))
        self.assertEqual((await store.get_run(ids[0])).agent_id, "agent-2")

    async def test_runs_ended_while_running_are_read_back_after_prune(self):
        """Runs that end while the store runs are read back from the index
        by the offsets the disk thread noted, next to pruned ones."""
        store = await self.open()
        ids, open_ids = await self.mixed(store)
        await store.prune_runs("2099-01-01T00:00:00.000Z", 1)
        for run_id in sorted(open_ids):
            await store.end_run(run_id, ended_record("incomplete", reason="x"))
        self.assertEqual(store._runs, {})
        page, _ = await store.list_runs(None, None, 10, "incomplete")
        self.assertEqual({s.run_id for s in page}, open_ids)
        self.assertEqual({s.status for s in page}, {"incomplete"})
        self.assertEqual(len(await self.pages(store, None, None)), 7)

    async def test_a_run_in_two_agents_is_served_once(self):
        """A run file copied into another agent's directory (and index)
        is found at start, by its id, and not served twice."""
        store = await self.open()
        ids, _ = await self.mixed(store)
        await store.close()
        source = self.run_path("agent-0", ids[0])
        with open(source, "rb") as f:
            records = [json.loads(line) for line in f]
        records[0]["agent_id"] = "agent-1"
        with open(self.run_path("agent-1", ids[0]), "wb") as f:
            f.write(b"".join(runfiles.encode_line(r) for r in records))
        os.unlink(self.index_path("agent-1"))  # rebuilt with the copy
        store = await self.open()
        everyone = await self.pages(store, None, None)
        self.assertEqual(sorted(everyone), sorted(ids))
        self.assertEqual((await store.get_run(ids[0])).agent_id, "agent-0")

    async def test_an_index_line_of_two_entries_is_rebuilt(self):
        """An index line that is not exactly one entry makes the index
        stale (entries are found by their line's offset): it is rebuilt."""
        store = await self.open()
        ids, _ = await self.mixed(store)
        listings = await self.listings(store)
        await store.close()
        with open(self.index_path("agent-0"), "rb") as f:
            lines = f.read().split(b"\n")
        lines[1:3] = [lines[1] + b"," + lines[2]]
        with open(self.index_path("agent-0"), "wb") as f:
            f.write(b"\n".join(lines))
        store = await self.open()
        self.assertEqual(await self.listings(store), listings)

    async def test_an_index_changed_under_the_store(self):
        """An index cut short while the store runs loses the ended runs it
        no longer holds from listings (with a warning) and get_run, and
        fails nothing."""
        store = await self.open()
        ids, open_ids = await self.mixed(store)
        store = await self.reopen(store)
        with open(self.index_path("agent-0"), "rb") as f:
            header = f.readline()
        with open(self.index_path("agent-0"), "wb") as f:
            f.write(header)
        listed = await self.pages(store, None, None)
        self.assertEqual(listed, [r for r in ids[::-1] if r in open_ids or ids.index(r) % 2])
        self.assertIsNone(await store.get_run(ids[0]))
        self.assertEqual(len(self.flushLoggedErrors()), 0)


def agent_load(times: list) -> AgentLoad:
    """An agent as loaded, with runs started at C{times}."""
    return AgentLoad("a", "a", starts=array("q", range(len(times))), started_at=json.dumps(times))


class StartOrderTests(unittest.TestCase):
    def test_the_order_is_the_times_text_order_and_stable(self):
        """Loaded runs are put in the order of their start times' text, runs
        of one millisecond in load order, whether the times are all of the
        daemon's own form (sorted as numbers) or not (sorted as text)."""
        own = [f"2026-11-25T04:{m:02d}:{s:02d}.{ms:03d}Z" for m, s, ms in [(5, 1, 9), (4, 59, 999), (5, 1, 9), (0, 0, 0)]]
        others = ["2026-11-25T04:05:01.009Z", "2026-11-25T04:05:01Z", "2026-11-25T04:05:01.009+00:00"]
        for times in ([own[:2], own[2:]], [own[:2], others, own[2:]]):
            flat = [t for agent in times for t in agent]
            order = _start_order([agent_load(agent) for agent in times])
            self.assertEqual(list(order), sorted(range(len(flat)), key=flat.__getitem__), times)
        self.assertEqual(list(_start_order([agent_load(own[:2]), agent_load(own[2:])])), [3, 1, 0, 2])


class RunIdsTests(unittest.TestCase):
    """The store's compact id table: hashes to positions."""

    def test_finds_every_position_of_a_hash_through_growth_and_removal(self):
        ids = RunIds()
        hashes = [(n * 0x9E3779B97F4A7C15) % 2**63 - 2**62 for n in range(5000)]
        hashes[4999] = hashes[18]  # two runs whose ids hash alike
        for position, run_hash in enumerate(hashes):
            ids.add(run_hash, position)
        self.assertEqual(ids.find(hashes[18]), [18, 4999])
        self.assertEqual(ids.find(12345), [])
        for position in range(0, 5000, 3):
            ids.remove(hashes[position], position)
        for position in range(3000):
            ids.add(position, 5000 + position)  # grows past the removed slots
        for position, run_hash in enumerate(hashes[:4999]):
            found = ids.find(run_hash)
            self.assertEqual(position in found, position % 3 != 0, position)
        self.assertEqual(ids.find(hashes[18]), [4999])
        self.assertEqual(RunIds(array("q", hashes)).find(hashes[18]), [18, 4999])


def open_paths() -> list:
    """The files this process holds open."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(os.path.join("/proc/self/fd", fd)))
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return paths
