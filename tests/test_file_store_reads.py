"""
The file store's reads: a run file that is empty, truncated, a directory or
a FIFO gets a clear answer and never hangs; a page of a large run costs
the page's bytes, not the run's.
"""

import os
import shutil

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from car_twisted.errors import RunRefused
from car_twisted.records import ended_record
from car_twisted.store import naming, runfiles
from car_twisted.store.file import PAGE_READ_BYTES, FileRunStore
from tests.store_conformance import started, turn
from tests.support import SUCCESS_OUTCOME, InProcessDaemon, run_file

#: A bounded wait for what a FIFO could block for ever.
FIFO_PATIENCE = 5.0


def bytes_read() -> int:
    """Bytes this process has read through read system calls so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


class FileStoreReadTests(unittest.TestCase):
    def setUp(self):
        self.data_dir = self.mktemp()

    async def open(self):
        store = FileRunStore(reactor, self.data_dir)
        await store.open()
        self.addCleanup(store.close)
        return store

    async def two_runs(self, store):
        """An ended run with two turns and an open one: their ids."""
        ended, open_ = started(), started()
        await store.start_run(ended)
        await store.append_turns(ended["run_id"], [turn("1"), turn("2")], 10)
        await store.end_run(ended["run_id"], ended_record("outcome", outcome=SUCCESS_OUTCOME))
        await store.start_run(open_)
        await store.close()
        return ended["run_id"], open_["run_id"]

    def run_path(self, run_id, agent_id="agent-a"):
        return os.path.join(
            self.data_dir, "runs", naming.encode_name(agent_id), naming.encode_name(run_id) + ".jsonl"
        )

    def replace_with_fifo(self, path):
        """
        Put a FIFO at C{path}. Whatever blocks opening it is let go every
        L{FIFO_PATIENCE} seconds; the list returned is then not empty.
        """
        os.remove(path)
        os.mkfifo(path, 0o600)
        rescued = []
        calls = []

        def rescue():
            calls.append(reactor.callLater(FIFO_PATIENCE, rescue))
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return  # nobody is blocked opening it
            os.close(fd)
            rescued.append(path)

        calls.append(reactor.callLater(FIFO_PATIENCE, rescue))
        self.addCleanup(lambda: calls[-1].active() and calls[-1].cancel())
        return rescued

    async def daemon_with_run(self, turns):
        """A daemon on a file store, and a completed run with C{turns}."""
        store = await self.open()
        daemon = InProcessDaemon(store)
        session = daemon.session()
        run_id = (await daemon.runs.start(session, {"agent_id": "agent-a", "intent": "x"}))["run_id"]
        for batch in range(0, len(turns), 16):
            await daemon.runs.record_turns(session, {"run_id": run_id, "turns": turns[batch : batch + 16]})
        await daemon.runs.complete(session, {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        return store, daemon.parts.reader, session, run_id

    # A run file emptied or truncated to nothing

    async def test_subscribe_to_an_emptied_run_is_refused_clearly(self):
        """A run whose file was emptied is marked corrupt: runs.get_trace
        serves its readable records (none) and runs.subscribe refuses it
        with a message saying so, not an internal error."""
        store, reader, session, run_id = await self.daemon_with_run([{"prompt": "a"}])
        os.truncate(run_file(store, run_id), 0)
        trace = await reader.get_trace(session, {"run_id": run_id})
        self.assertEqual((trace["records"], trace["cursor"]), ([], 0))
        with self.assertRaisesRegex(RunRefused, "no readable records"):
            await reader.subscribe(session, {"run_id": run_id})
        self.assertIn(run_id, store.corrupt_runs)
        self.assertEqual(session.following, set())

    async def test_file_emptied_after_it_was_read(self):
        """A file emptied after its records were read (and their offsets
        kept) serves no records from then on, and the run is marked
        corrupt."""
        ended, _ = await self.two_runs(await self.open())
        store = await self.open()
        self.assertEqual(len((await store.read_records(ended, 0, 100))[0]), 4)
        os.truncate(self.run_path(ended), 0)
        self.assertEqual(await store.read_records(ended, 0, 100), ([], 0))
        self.assertEqual(await store.read_records(ended, 2, 100), ([], 2))
        self.assertIn(ended, store.corrupt_runs)

    async def test_file_cut_short_after_it_was_read(self):
        """A file cut back after its records were read serves the records
        it still holds, at their positions."""
        ended, _ = await self.two_runs(await self.open())
        store = await self.open()
        records, _ = await store.read_records(ended, 0, 100)
        path = self.run_path(ended)
        with open(path, "rb") as f:
            lines = f.readlines()
        with open(path, "wb") as f:
            f.writelines(lines[:2])
        self.assertEqual(await store.read_records(ended, 1, 100), (records[1:2], 2))

    # A run file that is a directory or a FIFO

    async def test_directory_run_file_hides_only_its_run(self):
        """An open run whose file became a directory is not served, with
        one warning naming it; the agent's other runs still are."""
        ended, open_ = await self.two_runs(await self.open())
        os.remove(self.run_path(open_))
        os.mkdir(self.run_path(open_))
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = await self.open()
        runs, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual([r.run_id for r in runs], [ended])
        self.assertEqual(len((await store.read_records(ended, 0, 100))[0]), 4)
        warnings = [formatEvent(e) for e in events if self.run_path(open_) in formatEvent(e)]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("not a regular file", warnings[0])

    async def test_fifo_run_file_does_not_block_start(self):
        """An open run whose file became a FIFO is skipped at start, without
        waiting on the FIFO; the agent's other runs are served."""
        ended, open_ = await self.two_runs(await self.open())
        rescued = self.replace_with_fifo(self.run_path(open_))
        store = await self.open()
        self.assertEqual(rescued, [], "the start waited on the FIFO")
        runs, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual([r.run_id for r in runs], [ended])

    async def test_fifo_run_file_does_not_block_an_index_rebuild(self):
        """Rebuilding an agent's index skips a FIFO named like a run file
        without waiting on it."""
        ended, open_ = await self.two_runs(await self.open())
        os.remove(os.path.join(os.path.dirname(self.run_path(ended)), ".index"))
        rescued = self.replace_with_fifo(self.run_path(open_))
        store = await self.open()
        self.assertEqual(rescued, [], "the start waited on the FIFO")
        runs, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual([r.run_id for r in runs], [ended])

    async def test_fifo_index_does_not_block_start(self):
        """An agent index that is a FIFO is rebuilt from the run files
        without waiting on it."""
        ended, open_ = await self.two_runs(await self.open())
        rescued = self.replace_with_fifo(
            os.path.join(os.path.dirname(self.run_path(ended)), ".index")
        )
        store = await self.open()
        self.assertEqual(rescued, [], "the start waited on the FIFO")
        runs, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual({r.run_id for r in runs}, {ended, open_})

    async def test_fifo_file_of_an_ended_run_is_never_read(self):
        """An ended run whose file became a FIFO (not read at start) serves
        no records and is marked corrupt, without waiting on the FIFO."""
        ended, _ = await self.two_runs(await self.open())
        rescued = self.replace_with_fifo(self.run_path(ended))
        store = await self.open()
        self.assertEqual(await store.read_records(ended, 0, 100), ([], 0))
        self.assertEqual(rescued, [], "the read waited on the FIFO")
        self.assertIn(ended, store.corrupt_runs)

    async def test_directory_file_of_an_ended_run_serves_nothing(self):
        """An ended run whose file became a directory serves no records and
        is marked corrupt."""
        ended, _ = await self.two_runs(await self.open())
        shutil.move(self.run_path(ended), self.mktemp())
        os.mkdir(self.run_path(ended))
        store = await self.open()
        self.assertEqual(await store.read_records(ended, 0, 100), ([], 0))
        self.assertIn(ended, store.corrupt_runs)

    # Reading a large run

    async def big_run(self, store, turns, text_bytes):
        """A run of C{turns} turns of about C{text_bytes} each: its id."""
        record = started()
        await store.start_run(record)
        body = "x" * text_bytes
        for batch in range(0, turns, 50):
            await store.append_turns(
                record["run_id"], [turn(body) for _ in range(min(50, turns - batch))], 5000
            )
        return record["run_id"]

    async def test_a_page_reads_the_page_not_the_run(self):
        """Paging through a 1.2 MB run reads, per page of ten 4 KiB records,
        a small multiple of the page's bytes, never the whole file, from
        the start and again at an earlier position."""
        store = await self.open()
        run_id = await self.big_run(store, 300, 4096)
        self.assertGreater(os.path.getsize(run_file(store, run_id)), 1_200_000)
        page_bytes = 10 * 4200
        for cursor in list(range(0, 300, 10)) + [150, 20]:
            before = bytes_read()
            records, next_cursor = await store.read_records(run_id, cursor, 10)
            self.assertEqual((len(records), next_cursor), (10, cursor + 10))
            self.assertEqual(records[0].get("index"), cursor - 1 if cursor else None)
            self.assertLess(bytes_read() - before, 3 * page_bytes + 64 * 1024, cursor)

    async def test_a_page_stops_at_its_byte_budget(self):
        """A page asked for more records than fit its byte budget holds only
        those that fit; paging on returns every record once, in order."""
        store = await self.open()
        run_id = await self.big_run(store, 300, 8192)
        with open(run_file(store, run_id), "rb") as f:
            expected = [runfiles.parse_record(line) for line in f]
        records, cursor = [], 0
        while True:
            before = bytes_read()
            page, cursor = await store.read_records(run_id, cursor, 5000)
            if not page:
                break
            self.assertLess(sum(len(runfiles.encode_line(r)) for r in page), PAGE_READ_BYTES + 1)
            self.assertLess(bytes_read() - before, 3 * PAGE_READ_BYTES)
            records.extend(page)
        self.assertEqual(records, expected)
        self.assertEqual(cursor, len(expected))

    async def test_large_snapshot_refused_before_reading_it_all(self):
        """runs.subscribe on a 4 MB run is refused as too large after
        reading a bounded part of it, not the whole file."""
        turns = [{"prompt": "y" * 20_000} for _ in range(300)]
        store, reader, session, run_id = await self.daemon_with_run(turns)
        size = os.path.getsize(run_file(store, run_id))
        self.assertGreater(size, 4_000_000)
        before = bytes_read()
        with self.assertRaisesRegex(RunRefused, "too large"):
            await reader.subscribe(session, {"run_id": run_id})
        self.assertLess(bytes_read() - before, size // 2)
