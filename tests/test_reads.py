"""
runs.list and runs.get_trace paging, in process.
"""

from twisted.trial import unittest

from car_twisted.records import now
from tests.support import SUCCESS_OUTCOME, AuthDaemon, in_process


async def record_runs(ws, agent_id, count):
    """Start C{count} runs, completing every other one; their ids, oldest first."""
    run_ids = []
    for i in range(count):
        run_id = (await ws.call("runs.start", {"agent_id": agent_id, "intent": f"goal {i}"}))["run_id"]
        if i % 2 == 0:
            await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        run_ids.append(run_id)
    return run_ids


class ListPagingTests(unittest.TestCase):
    async def test_pages_cover_every_run_newest_first(self):
        """Following next_cursor with limit 2 yields every run once, newest
        first, and the last page's next_cursor is null."""
        daemon = in_process(self)
        ws = await daemon.connect()
        run_ids = await record_runs(ws, "agent-A", 5)
        seen, cursor, pages = [], None, 0
        while True:
            params = {"agent_id": "agent-A", "limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            page = await ws.call("runs.list", params)
            pages += 1
            self.assertLessEqual(len(page["runs"]), 2)
            seen += [r["run_id"] for r in page["runs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        self.assertEqual(seen, list(reversed(run_ids)))
        self.assertEqual(pages, 3)

    async def test_summary_shape(self):
        """A summary carries exactly the fields docs/protocol.md lists."""
        daemon = in_process(self)
        ws = await daemon.connect()
        (run_id,) = await record_runs(ws, "agent-A", 1)
        (summary,) = (await ws.call("runs.list", {"agent_id": "agent-A"}))["runs"]
        self.assertEqual(
            sorted(summary),
            sorted(["run_id", "agent_id", "intent", "started_at", "ended_at", "status", "outcome_status", "turn_count"]),
        )
        self.assertEqual(
            (summary["run_id"], summary["status"], summary["outcome_status"], summary["turn_count"]),
            (run_id, "completed", "success", 0),
        )

    async def test_status_filter(self):
        """status keeps only runs in that status."""
        daemon = in_process(self)
        ws = await daemon.connect()
        run_ids = await record_runs(ws, "agent-A", 4)
        open_ = await ws.call("runs.list", {"agent_id": "agent-A", "status": "in_progress"})
        self.assertEqual([r["run_id"] for r in open_["runs"]], [run_ids[3], run_ids[1]])
        done = await ws.call("runs.list", {"agent_id": "agent-A", "status": "completed"})
        self.assertEqual([r["run_id"] for r in done["runs"]], [run_ids[2], run_ids[0]])
        bad = await ws.call_raw("runs.list", {"agent_id": "agent-A", "status": "success"})
        self.assertEqual(bad["error"]["code"], -32602)

    async def test_limit_bounds(self):
        """limit must be an integer from 1 to 500: 1 and 500 work, 0, 501
        and "2" are -32602 naming limit."""
        daemon = in_process(self)
        ws = await daemon.connect()
        await record_runs(ws, "agent-A", 2)
        one = await ws.call("runs.list", {"agent_id": "agent-A", "limit": 1})
        self.assertEqual(len(one["runs"]), 1)
        self.assertIsNotNone(one["next_cursor"])
        await ws.call("runs.list", {"agent_id": "agent-A", "limit": 500})
        for limit in (0, 501, "2"):
            answer = await ws.call_raw("runs.list", {"agent_id": "agent-A", "limit": limit})
            self.assertEqual(answer["error"]["code"], -32602)
            self.assertIn("limit", answer["error"]["message"])

    async def test_unreadable_cursor_is_invalid_params(self):
        """A cursor the daemon never returned is -32602, not a crash."""
        daemon = in_process(self)
        ws = await daemon.connect()
        for cursor in ("not-a-cursor", 12, "x" * 600):
            answer = await ws.call_raw("runs.list", {"agent_id": "agent-A", "cursor": cursor})
            self.assertEqual(answer["error"]["code"], -32602, cursor)


class TracePagingTests(unittest.TestCase):
    async def test_cursor_pages_through_the_records(self):
        """get_trace with a cursor and limit returns the records in order,
        its cursor pointing past the last one returned."""
        daemon = in_process(self)
        ws = await daemon.connect()
        run_id = (await ws.call("runs.start", {"agent_id": "agent-A", "intent": "long"}))["run_id"]
        turns = [{"record": "turn", "tool": f"tool-{i}", "recorded_at": now()} for i in range(4)]
        await daemon.store.append_turns(run_id, turns, 2000)
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        first = await ws.call("runs.get_trace", {"run_id": run_id, "limit": 2})
        self.assertEqual([r["record"] for r in first["records"]], ["started", "turn"])
        self.assertEqual(first["cursor"], 2)
        rest = await ws.call("runs.get_trace", {"run_id": run_id, "cursor": first["cursor"]})
        self.assertEqual([r.get("index") for r in rest["records"]], [1, 2, 3, None])
        self.assertEqual(rest["records"][-1]["termination"], "outcome")
        self.assertEqual(rest["cursor"], 6)
        end = await ws.call("runs.get_trace", {"run_id": run_id, "cursor": 6})
        self.assertEqual((end["records"], end["cursor"]), ([], 6))

    async def test_bad_trace_paging_is_invalid_params(self):
        """A negative cursor or a zero limit is -32602."""
        daemon = in_process(self)
        ws = await daemon.connect()
        for params in ({"cursor": -1}, {"limit": 0}, {"cursor": "2"}):
            answer = await ws.call_raw("runs.get_trace", {"run_id": "r", **params})
            self.assertEqual(answer["error"]["code"], -32602, params)


class ListEveryAgentTests(unittest.TestCase):
    async def test_without_agent_id(self):
        """runs.list without agent_id: a host session lists every agent's
        runs newest first (agent_id null), with the status filter; a session
        bound to an agent still lists only its own."""
        auth = AuthDaemon.in_process(self)
        a, first = await auth.start_run("agent-A")
        b, second = await auth.start_run("agent-B")
        await b.call("runs.complete", {"run_id": second, "outcome": SUCCESS_OUTCOME})
        host = await auth.host()
        listed = await host.call("runs.list", {})
        self.assertEqual(([r["run_id"] for r in listed["runs"]], listed["agent_id"]), ([second, first], None))
        completed = await host.call("runs.list", {"status": "completed"})
        self.assertEqual([r["run_id"] for r in completed["runs"]], [second])
        own = await a.call("runs.list", {})
        self.assertEqual(([r["run_id"] for r in own["runs"]], own["agent_id"]), ([first], "agent-A"))
