"""
``car-twisted export``: every ended run of a file or SQLite data directory,
filtered, as JSON Lines or to an OTLP collector; open runs are not exported.
"""

import io
import json
import os
import sqlite3

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from car_twisted.cli import parser
from car_twisted.export.command import Progress, export
from car_twisted.export.source import sqlite_page_query
from car_twisted.records import ended_record, started_record
from car_twisted.store.file import FileRunStore
from car_twisted.store.sqlite import DATABASE_NAME, SQLiteRunStore
from tests.otlp_receiver import OTLPReceiver
from tests.support import SUCCESS_OUTCOME

#: (run id, agent, started_at, ended?)
RUNS = [
    ("0190a000-0000-7000-8000-000000000001", "agent-a", "2026-01-01T10:00:00.000Z", True),
    ("0190a000-0000-7000-8000-000000000002", "agent-b", "2026-01-02T10:00:00.000Z", True),
    ("0190a000-0000-7000-8000-000000000003", "agent-a", "2026-01-03T10:00:00.000Z", True),
    ("0190a000-0000-7000-8000-000000000004", "agent-a", "2026-01-04T10:00:00.000Z", False),
]


class Terminal(io.StringIO):
    def isatty(self):
        return True


class ExportMixin:
    async def fill(self):
        """The L{RUNS} in a fresh data dir: each with a tool turn; their records."""
        self.data_dir = self.mktemp()
        store = self.make_store(self.data_dir)
        await store.open()
        expected = {}
        for run_id, agent, started_at, ends in RUNS:
            started = dict(started_record(run_id, agent, "c", "goal", None), started_at=started_at)
            await store.start_run(started)
            await store.append_turns(run_id, [{"record": "turn", "tool": "shell", "recorded_at": started_at}], 10)
            if ends:
                await store.end_run(run_id, ended_record("outcome", outcome=SUCCESS_OUTCOME))
            expected[run_id] = (await store.read_records(run_id, 0, 10))[0]
        await store.close()
        return expected

    def command(self, *argv, err=None, environ=None):
        args = parser().parse_args(["export", "--store", self.STORE, *argv])
        out, err = io.StringIO(), err or io.StringIO()
        status = export(args, environ or {}, out, err, self.data_dir)
        return status, out.getvalue(), err.getvalue()

    def exported(self, *argv):
        status, out, err = self.command("--format", "jsonl", *argv)
        self.assertEqual((status, err), (0, ""))
        return [json.loads(line) for line in out.splitlines()]

    async def test_jsonl_every_ended_run(self):
        """Each ended run is one line with its id, agent and every record;
        the open run is left out."""
        expected = await self.fill()
        lines = self.exported()
        self.assertEqual(
            sorted(lines, key=lambda line: line["run_id"]),
            [
                {"run_id": run_id, "agent_id": agent, "records": expected[run_id]}
                for run_id, agent, _, ends in RUNS
                if ends
            ],
        )

    async def test_filters(self):
        """--agent, --since and --until (start times, until exclusive) narrow the export."""
        await self.fill()
        ids = lambda *argv: sorted(line["run_id"][-1] for line in self.exported(*argv))
        self.assertEqual(ids("--agent", "agent-a"), ["1", "3"])
        self.assertEqual(ids("--since", "2026-01-02"), ["2", "3"])
        self.assertEqual(ids("--until", "2026-01-02T10:00:00Z"), ["1"])
        self.assertEqual(ids("--agent", "agent-a", "--since", "2026-01-02", "--until", "2026-01-05"), ["3"])
        self.assertEqual(ids("--agent", "nobody"), [])

    async def test_out_file(self):
        """--out writes the lines to a file instead."""
        await self.fill()
        path = self.mktemp()
        status, out, _ = self.command("--format", "jsonl", "--out", path)
        self.assertEqual((status, out), (0, ""))
        with open(path) as f:
            self.assertEqual(len(f.readlines()), 3)

    async def test_progress_only_on_a_terminal(self):
        """Progress goes to standard error when it is a terminal, never otherwise."""
        await self.fill()
        terminal = Terminal()
        status, _, _ = self.command("--format", "jsonl", err=terminal)
        self.assertEqual(status, 0)
        self.assertTrue(terminal.getvalue().endswith("\rexported 3 runs\n"))
        self.assertEqual(self.command("--format", "jsonl")[2], "")

    async def test_otlp(self):
        """--format otlp sends every ended run's spans to the collector."""
        await self.fill()
        receiver = await OTLPReceiver.listen(self)
        status, _, err = await deferToThread(
            self.command, "--format", "otlp", "--otlp-endpoint", receiver.base_url
        )
        self.assertEqual((status, err), (0, ""))
        roots = sorted(span.name for _, _, span in receiver.spans if not span.parent_span_id)
        self.assertEqual(roots, ["invoke_agent agent-a", "invoke_agent agent-a", "invoke_agent agent-b"])
        self.assertEqual(len(receiver.spans), 6)

    async def test_bad_input(self):
        """Bad times, mismatched options and a missing store are clear errors."""
        self.data_dir = self.mktemp()
        status, _, err = self.command("--format", "jsonl", "--since", "yesterday")
        self.assertEqual(status, 2)
        self.assertIn("--since", err)
        status, _, err = self.command("--format", "otlp")
        self.assertEqual(status, 2)
        self.assertIn("--otlp-endpoint", err)
        status, _, err = self.command("--format", "jsonl", "--otlp-endpoint", "http://x")
        self.assertEqual(status, 2)
        status, _, err = self.command("--format", "jsonl")
        self.assertEqual(status, 1)
        self.assertIn("no", err)


class FileExportTests(ExportMixin, unittest.TestCase):
    STORE = "file"

    def make_store(self, data_dir):
        return FileRunStore(reactor, data_dir)


class SQLiteExportTests(ExportMixin, unittest.TestCase):
    STORE = "sqlite"

    def make_store(self, data_dir):
        return SQLiteRunStore(data_dir, reactor)

    async def test_agent_read_in_order_from_its_index(self):
        """An agent's runs are paged in seq order from the agent's index,
        never sorted per page (which made a page of an agent with a million
        runs take 0.25 s instead of 1 ms)."""
        await self.fill()
        with sqlite3.connect(os.path.join(self.data_dir, DATABASE_NAME)) as db:
            # With statistics (a database someone ran ANALYZE on) SQLite
            # prefers the ended runs' index, which covers the query.
            db.execute("ANALYZE")
            for since in (None, "2026-01-02"):
                query, arguments = sqlite_page_query("agent-a", since, None)
                plan = [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + query, (0, *arguments))]
                self.assertEqual(plan, ["SEARCH runs USING INDEX runs_by_agent (agent_id=? AND seq>?)"])


class ProgressTests(unittest.TestCase):
    def test_progress_is_throttled(self):
        """On a terminal the count is redrawn at most every quarter second."""
        now = [0.0]
        terminal = Terminal()
        progress = Progress(terminal, lambda: now[0])
        for _ in range(3):
            progress.advance()
        now[0] = 0.3
        progress.advance()
        progress.done()
        self.assertEqual(terminal.getvalue(), "\rexported 1 runs\rexported 4 runs\rexported 4 runs\n")
