"""A run store that keeps everything in memory: for tests and ephemeral use."""

import itertools

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from car_twisted.interfaces import (
    IRunStore,
    RunExists,
    RunNotFound,
    RunTerminal,
    TurnLimitReached,
    summarize,
)
from car_twisted.store.cursors import parse_position_cursor


@implementer(IRunStore)
class MemoryRunStore:
    """Runs as lists of records in a dict; every call completes at once."""

    def __init__(self):
        self._records = {}  # run_id -> [record]
        # agent_id -> [run_id] in start order, and every run_id in start
        # order; a pruned run leaves None, so cursors stay valid.
        self._by_agent = {}
        self._started = []

    def open(self):
        return succeed(None)

    def start_run(self, started):
        run_id = started["run_id"]
        if run_id in self._records:
            return fail(RunExists(run_id))
        self._records[run_id] = [dict(started)]
        self._by_agent.setdefault(started["agent_id"], []).append(run_id)
        self._started.append(run_id)
        return succeed(None)

    def _open(self, run_id):
        records = self._records.get(run_id)
        if records is None:
            raise RunNotFound(run_id)
        if records[-1]["record"] == "ended":
            raise RunTerminal(run_id)
        return records

    def append_turns(self, run_id, turns, max_turns):
        try:
            records = self._open(run_id)
        except (RunNotFound, RunTerminal) as e:
            return fail(e)
        base = len(records) - 1  # the started record, then the turns
        if base + len(turns) > max_turns:
            return fail(TurnLimitReached(run_id))
        stamped = [dict(t, index=base + i) for i, t in enumerate(turns)]
        records.extend(stamped)
        return succeed([dict(r) for r in stamped])

    def end_run(self, run_id, ended):
        try:
            records = self._open(run_id)
        except (RunNotFound, RunTerminal) as e:
            return fail(e)
        records.append(dict(ended))
        return succeed(None)

    def get_run(self, run_id):
        records = self._records.get(run_id)
        return succeed(summarize(records) if records else None)

    def read_records(self, run_id, cursor, limit):
        records = self._records.get(run_id)
        if records is None:
            return fail(RunNotFound(run_id))
        page = records[cursor : cursor + limit]
        return succeed(([dict(r) for r in page], cursor + len(page)))

    def list_runs(self, agent_id, cursor, limit, status):
        run_ids = self._started if agent_id is None else self._by_agent.get(agent_id, [])
        try:
            position = parse_position_cursor(cursor, len(run_ids))
        except ValueError as e:
            return fail(e)
        page = []
        while position > 0 and len(page) < limit:
            position -= 1
            if run_ids[position] is None:
                continue
            summary = summarize(self._records[run_ids[position]])
            if status is None or summary.status == status:
                page.append(summary)
        return succeed((page, str(position) if position > 0 else None))

    def open_runs(self):
        return succeed(
            [
                summarize(records)
                for records in self._records.values()
                if records[-1]["record"] != "ended"
            ]
        )

    def _prunable(self, ended_before):
        for run_id, records in self._records.items():
            if records[-1]["record"] == "ended" and records[-1]["ended_at"] < ended_before:
                yield run_id

    def prune_runs(self, ended_before, limit):
        pruned = list(itertools.islice(self._prunable(ended_before), limit))
        for run_id in pruned:
            records = self._records.pop(run_id)
            for run_ids in (self._by_agent[records[0]["agent_id"]], self._started):
                run_ids[run_ids.index(run_id)] = None
        return succeed(pruned)

    def count_prunable(self, ended_before):
        return succeed(sum(1 for _ in self._prunable(ended_before)))

    def close(self):
        return succeed(None)
