"""
The behaviour every L{IRunStore} must show: the interface's real definition.

Mix L{RunStoreConformance} into a L{twisted.trial.unittest.TestCase} that
defines C{make_store()} (returning a store, or a Deferred/coroutine of one)
and closes it in a cleanup.
"""

from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from car_twisted.interfaces import (
    IRunStore,
    RunExists,
    RunNotFound,
    RunSummary,
    RunTerminal,
    TurnLimitReached,
)
from car_twisted.records import ended_record, new_run_id, started_record

HOSTILE_IDS = [
    "../x",
    "../../etc",
    "/etc/passwd",
    ".",
    "..",
    "a\0b",
    "x" * 600,
    "été/ünïcode",
    "C:\\windows",
    "name:bulldozer-agent",
    "AGENT",
    "agent",
]


def started(run_id=None, agent_id="agent-a", intent="do it"):
    return started_record(run_id or new_run_id(), agent_id, "client-1", intent, None)


def turn(prompt="p"):
    return {"record": "turn", "prompt": prompt, "tool": None, "recorded_at": "t"}


class RunStoreConformance:
    """
    The IRunStore contract. A test case mixes it in and defines
    C{make_store()}, returning a new store that is not yet open (and
    arranging for it to be closed).
    """

    async def _store(self):
        store = self.make_store()
        await store.open()
        return store

    async def test_provides_interface(self):
        """The store and the summaries it returns provide what they claim."""
        store = await self._store()
        self.assertTrue(verifyObject(IRunStore, store))
        record = started()
        await store.start_run(record)
        summary = await store.get_run(record["run_id"])
        self.assertIsInstance(summary, RunSummary)
        self.assertEqual(
            summary.to_json(),
            {
                "run_id": record["run_id"],
                "agent_id": "agent-a",
                "intent": "do it",
                "started_at": record["started_at"],
                "ended_at": None,
                "status": "in_progress",
                "outcome_status": None,
                "turn_count": 0,
            },
        )

    async def test_unknown_run(self):
        """An unknown run: no summary, and reads and writes fail RunNotFound."""
        store = await self._store()
        self.assertIsNone(await store.get_run("nope"))
        with self.assertRaises(RunNotFound):
            await store.read_records("nope", 0, 10)
        with self.assertRaises(RunNotFound):
            await store.append_turns("nope", [turn()], 10)
        with self.assertRaises(RunNotFound):
            await store.end_run("nope", ended_record("incomplete", reason="x"))

    async def test_run_id_taken(self):
        """Starting a run whose id exists fails RunExists and keeps the first."""
        store = await self._store()
        record = started(intent="first")
        await store.start_run(record)
        with self.assertRaises(RunExists):
            await store.start_run(dict(record, intent="second"))
        self.assertEqual((await store.get_run(record["run_id"])).intent, "first")

    async def test_turns_are_indexed_per_run(self):
        """Turns get 0-based indices on one sequence per run; each append
        returns the records it stored, stamped, as they read back."""
        store = await self._store()
        a, b = started(), started()
        await store.start_run(a)
        await store.start_run(b)
        first = await store.append_turns(a["run_id"], [turn("1"), turn("2")], 10)
        self.assertEqual([r["index"] for r in first], [0, 1])
        self.assertEqual([r["index"] for r in await store.append_turns(b["run_id"], [turn("x")], 10)], [0])
        last = await store.append_turns(a["run_id"], [turn("3")], 10)
        self.assertEqual([r["index"] for r in last], [2])
        records, cursor = await store.read_records(a["run_id"], 0, 100)
        self.assertEqual(records[1:], first + last)
        self.assertEqual([r.get("index") for r in records], [None, 0, 1, 2])
        self.assertEqual([r.get("prompt") for r in records[1:]], ["1", "2", "3"])
        self.assertEqual(cursor, 4)
        self.assertEqual((await store.get_run(a["run_id"])).turn_count, 3)

    async def test_turn_limit_is_all_or_nothing(self):
        """An append that would pass max_turns fails and appends nothing."""
        store = await self._store()
        record = started()
        await store.start_run(record)
        await store.append_turns(record["run_id"], [turn()] * 3, 4)
        with self.assertRaises(TurnLimitReached):
            await store.append_turns(record["run_id"], [turn()] * 2, 4)
        self.assertEqual((await store.get_run(record["run_id"])).turn_count, 3)
        self.assertEqual((await store.append_turns(record["run_id"], [turn()], 4))[0]["index"], 3)

    async def test_first_terminal_record_wins(self):
        """Once ended, a run refuses another end and more turns, unchanged."""
        store = await self._store()
        record = started()
        run_id = record["run_id"]
        await store.start_run(record)
        outcome = {"status": "success", "summary": "", "evidence": [], "metrics": {}, "timestamp": "t"}
        await store.end_run(run_id, ended_record("outcome", outcome=outcome))
        with self.assertRaises(RunTerminal):
            await store.end_run(run_id, ended_record("incomplete", reason="connection closed"))
        with self.assertRaises(RunTerminal):
            await store.append_turns(run_id, [turn()], 10)
        summary = await store.get_run(run_id)
        self.assertEqual((summary.status, summary.outcome_status), ("completed", "success"))
        self.assertIsNotNone(summary.ended_at)
        records, _ = await store.read_records(run_id, 0, 10)
        self.assertEqual([r["record"] for r in records], ["started", "ended"])

    async def test_statuses(self):
        """Each termination maps to its run status."""
        store = await self._store()
        ids = {}
        for termination, details in [
            ("incomplete", {"reason": "connection closed"}),
            ("cancelled", {"reason_digest": "00"}),
        ]:
            record = started()
            await store.start_run(record)
            await store.end_run(record["run_id"], ended_record(termination, **details))
            ids[termination] = record["run_id"]
        self.assertEqual((await store.get_run(ids["incomplete"])).status, "incomplete")
        self.assertEqual((await store.get_run(ids["cancelled"])).status, "cancelled")

    async def test_calls_on_a_run_apply_in_call_order(self):
        """Start, turns and end issued without waiting all apply, in order."""
        store = await self._store()
        record = started()
        run_id = record["run_id"]
        results = await gatherResults(
            [
                store.start_run(record),
                store.append_turns(run_id, [turn("a")], 10),
                store.append_turns(run_id, [turn("b")], 10),
                store.end_run(run_id, ended_record("incomplete", reason="x")),
            ]
        )
        self.assertEqual(results[0], None)
        self.assertEqual([[r["index"] for r in results[n]] for n in (1, 2)], [[0], [1]])
        self.assertEqual(results[3], None)
        records, _ = await store.read_records(run_id, 0, 10)
        self.assertEqual([r["record"] for r in records], ["started", "turn", "turn", "ended"])

    async def test_calls_on_a_run_fire_in_call_order(self):
        """The Deferreds of calls on one run fire in the order of the calls
        (live followers see records in order)."""
        store = await self._store()
        record = started()
        run_id = record["run_id"]
        fired = []
        calls = [
            store.start_run(record),
            store.append_turns(run_id, [turn("a")], 10),
            store.append_turns(run_id, [turn("b")] * 3, 10),
            store.append_turns(run_id, [turn("c")], 10),
            store.end_run(run_id, ended_record("incomplete", reason="x")),
        ]
        for n, d in enumerate(calls):
            d.addCallback(lambda _, n=n: fired.append(n))
        await gatherResults(calls)
        self.assertEqual(fired, [0, 1, 2, 3, 4])

    async def test_read_records_pages(self):
        """read_records returns a window from cursor and the cursor after it."""
        store = await self._store()
        record = started()
        run_id = record["run_id"]
        await store.start_run(record)
        await store.append_turns(run_id, [turn(str(i)) for i in range(5)], 10)
        page, cursor = await store.read_records(run_id, 0, 2)
        self.assertEqual(([r["record"] for r in page], cursor), (["started", "turn"], 2))
        page, cursor = await store.read_records(run_id, cursor, 10)
        self.assertEqual(([r["index"] for r in page], cursor), ([1, 2, 3, 4], 6))
        page, cursor = await store.read_records(run_id, cursor, 10)
        self.assertEqual((page, cursor), ([], 6))

    async def test_records_are_copies(self):
        """Mutating what the store returned does not change the store."""
        store = await self._store()
        record = started()
        await store.start_run(record)
        record["intent"] = "changed by caller"
        page, _ = await store.read_records(record["run_id"], 0, 1)
        self.assertEqual(page[0]["intent"], "do it")
        page[0]["intent"] = "changed again"
        page, _ = await store.read_records(record["run_id"], 0, 1)
        self.assertEqual(page[0]["intent"], "do it")
        (stamped,) = await store.append_turns(record["run_id"], [turn("p")], 10)
        stamped["prompt"] = "changed by caller"
        page, _ = await store.read_records(record["run_id"], 1, 1)
        self.assertEqual(page[0]["prompt"], "p")

    async def test_list_runs_newest_first_with_cursor(self):
        """An agent's runs page newest first (start order breaks ties within
        a millisecond); the last page's cursor is None; others' runs absent."""
        store = await self._store()
        ids = []
        for i in range(7):
            record = started(intent=str(i))
            await store.start_run(record)
            ids.append(record["run_id"])
        await store.start_run(started(agent_id="agent-b"))
        seen, cursor = [], None
        while True:
            page, cursor = await store.list_runs("agent-a", cursor, 3, None)
            seen.extend(s.run_id for s in page)
            if cursor is None:
                break
        self.assertEqual(seen, ids[::-1])
        self.assertEqual(await store.list_runs("nobody", None, 10, None), ([], None))

    async def test_list_runs_status_filter(self):
        """The status filter keeps only runs with that status, still paged."""
        store = await self._store()
        ended = []
        for i in range(6):
            record = started()
            await store.start_run(record)
            if i % 2:
                await store.end_run(record["run_id"], ended_record("incomplete", reason="x"))
                ended.append(record["run_id"])
        seen, cursor = [], None
        for _ in range(10):
            page, cursor = await store.list_runs("agent-a", cursor, 2, "incomplete")
            seen.extend(s.run_id for s in page)
            if cursor is None:
                break
        self.assertEqual(seen, ended[::-1])
        page, _ = await store.list_runs("agent-a", None, 10, "in_progress")
        self.assertEqual(len(page), 3)

    async def test_list_runs_of_every_agent(self):
        """With agent None: every agent's runs, newest first, paged, and
        filtered by status (the runs ended later move to their status)."""
        store = await self._store()
        ids = []
        for i in range(5):
            record = started(agent_id=f"agent-{i % 2}")
            await store.start_run(record)
            ids.append(record["run_id"])
        await store.end_run(ids[1], ended_record("incomplete", reason="x"))
        seen, cursor = [], None
        while True:
            page, cursor = await store.list_runs(None, cursor, 2, None)
            seen.extend(s.run_id for s in page)
            if cursor is None:
                break
        self.assertEqual(seen, ids[::-1])
        page, _ = await store.list_runs(None, None, 10, "incomplete")
        self.assertEqual([s.run_id for s in page], [ids[1]])
        page, _ = await store.list_runs(None, None, 10, "in_progress")
        self.assertEqual([s.run_id for s in page], [ids[4], ids[3], ids[2], ids[0]])

    async def test_list_runs_bad_cursor(self):
        """A cursor the store never issued fails ValueError."""
        store = await self._store()
        await store.start_run(started())
        for cursor in ["garbage", "-1", "../../etc", "9" * 40]:
            with self.assertRaises(ValueError):
                await store.list_runs("agent-a", cursor, 10, None)

    async def test_open_runs(self):
        """open_runs lists exactly the runs with no terminal record."""
        store = await self._store()
        open_ids = set()
        for i in range(4):
            record = started(agent_id=f"agent-{i % 2}")
            await store.start_run(record)
            if i == 1:
                await store.end_run(record["run_id"], ended_record("incomplete", reason="x"))
            else:
                open_ids.add(record["run_id"])
        self.assertEqual({s.run_id for s in await store.open_runs()}, open_ids)

    async def test_hostile_ids_round_trip(self):
        """Agent and run ids of any shape are stored, listed and read back
        under exactly their own name, never confused with one another."""
        store = await self._store()
        for n, hostile in enumerate(HOSTILE_IDS):
            await store.start_run(started(run_id=f"run-{n}", agent_id=hostile))
            await store.start_run(started(run_id=hostile, agent_id=f"agent-{n}"))
        for n, hostile in enumerate(HOSTILE_IDS):
            page, _ = await store.list_runs(hostile, None, 10, None)
            self.assertEqual([s.run_id for s in page], [f"run-{n}"])
            records, _ = await store.read_records(hostile, 0, 10)
            self.assertEqual(records[0]["agent_id"], f"agent-{n}")
            self.assertEqual((await store.get_run(f"run-{n}")).agent_id, hostile)

    async def test_close(self):
        """close fires once pending work is done."""
        store = await self._store()
        await store.start_run(started())
        self.assertIsNone(await store.close())

    async def _runs_for_pruning(self, store):
        """Runs of agent-a in start order: ended long ago (x2), open since
        long ago, ended just now; and one of agent-b ended long ago."""
        old = "2020-01-01T00:00:00.000Z"
        ids = {}
        for name, agent_id, ended_at in [
            ("old1", "agent-a", old),
            ("old2", "agent-a", old),
            ("open", "agent-a", None),
            ("recent", "agent-a", "now"),
            ("other", "agent-b", old),
        ]:
            record = dict(started(agent_id=agent_id), started_at=old)
            await store.start_run(record)
            await store.append_turns(record["run_id"], [turn()], 10)
            if ended_at is not None:
                ended = ended_record("incomplete", reason="x")
                if ended_at != "now":
                    ended["ended_at"] = ended_at
                await store.end_run(record["run_id"], ended)
            ids[name] = record["run_id"]
        return ids

    async def test_prune_removes_old_ended_runs_whole(self):
        """Ended runs older than the cut go from every read; open runs
        (however old) and recent ones stay."""
        store = await self._store()
        ids = await self._runs_for_pruning(store)
        cut = "2021-01-01T00:00:00.000Z"
        self.assertEqual(await store.count_prunable(cut), 3)
        pruned = await store.prune_runs(cut, 10)
        self.assertEqual(sorted(pruned), sorted([ids["old1"], ids["old2"], ids["other"]]))
        for name in ("old1", "old2", "other"):
            self.assertIsNone(await store.get_run(ids[name]))
            with self.assertRaises(RunNotFound):
                await store.read_records(ids[name], 0, 10)
        page, _ = await store.list_runs("agent-a", None, 10, None)
        self.assertEqual([s.run_id for s in page], [ids["recent"], ids["open"]])
        self.assertEqual((await store.list_runs("agent-b", None, 10, None))[0], [])
        everyone, _ = await store.list_runs(None, None, 10, None)
        self.assertEqual([s.run_id for s in everyone], [ids["recent"], ids["open"]])
        ended, _ = await store.list_runs(None, None, 10, "incomplete")
        self.assertEqual([s.run_id for s in ended], [ids["recent"]])
        self.assertEqual([s.run_id for s in await store.open_runs()], [ids["open"]])
        records, _ = await store.read_records(ids["recent"], 0, 10)
        self.assertEqual([r["record"] for r in records], ["started", "turn", "ended"])
        self.assertEqual(await store.count_prunable(cut), 0)
        self.assertEqual(await store.prune_runs(cut, 10), [])

    async def test_prune_in_batches(self):
        """prune_runs deletes at most limit runs a call; a short answer means done."""
        store = await self._store()
        ids = await self._runs_for_pruning(store)
        cut = "2021-01-01T00:00:00.000Z"
        first = await store.prune_runs(cut, 2)
        second = await store.prune_runs(cut, 2)
        self.assertEqual((len(first), len(second)), (2, 1))
        self.assertEqual(
            sorted(first + second), sorted([ids["old1"], ids["old2"], ids["other"]])
        )

    async def test_list_cursor_survives_prune(self):
        """A list_runs cursor handed out before a prune still pages on from
        where it was: no surviving run skipped or repeated."""
        store = await self._store()
        ids = await self._runs_for_pruning(store)
        newer = started()
        await store.start_run(newer)
        first, cursor = await store.list_runs("agent-a", None, 2, None)
        self.assertEqual([s.run_id for s in first], [newer["run_id"], ids["recent"]])
        await store.prune_runs("2021-01-01T00:00:00.000Z", 10)
        rest, cursor = await store.list_runs("agent-a", cursor, 2, None)
        self.assertEqual([s.run_id for s in rest], [ids["open"]])
        self.assertIsNone(cursor)
        incomplete, _ = await store.list_runs("agent-a", None, 10, "incomplete")
        self.assertEqual([s.run_id for s in incomplete], [ids["recent"]])

    async def test_every_agent_cursor_survives_prune(self):
        """A list_runs cursor over every agent's runs, handed out before a
        prune, pages on past the pruned runs."""
        store = await self._store()
        ids = await self._runs_for_pruning(store)
        first, cursor = await store.list_runs(None, None, 1, None)
        self.assertEqual([s.run_id for s in first], [ids["other"]])
        await store.prune_runs("2021-01-01T00:00:00.000Z", 10)
        rest, cursor = await store.list_runs(None, cursor, 10, None)
        self.assertEqual([s.run_id for s in rest], [ids["recent"], ids["open"]])
        self.assertIsNone(cursor)
