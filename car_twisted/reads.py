"""
The ``runs.*`` methods that read: a run's trace in pages, an agent's (or
every agent's) runs in pages, and live following (a snapshot, then events).
"""

from car_twisted.access import AccessPolicy
from car_twisted.errors import InvalidParams, RunRefused
from car_twisted.fanout import TraceFanout
from car_twisted.interfaces import RUN_STATUSES, TURN_RECORDS, end_position, status_of
from car_twisted.limits import MAX_FOLLOWED, MAX_TURNS_PER_RUN, PAGE_BYTES
from car_twisted.outcomes import as_deferred, then
from car_twisted.records import encoded_size, id_param, int_param
from car_twisted.session import Session


class RunReader:
    """
    Serves reads from the store, each through the access policy.

    @param fanout: the live followers, shared with the run service that
        publishes to them.
    @param on_followed: called with the run id once a follower of an open
        run has its snapshot (a store several daemons share: what other
        daemons wrote meanwhile must be read), or None.
    """

    def __init__(self, store, fanout: TraceFanout, policy: AccessPolicy, on_followed=None):
        self._store = store
        self._fanout = fanout
        self._policy = policy
        self._on_followed = on_followed

    def methods(self) -> dict:
        """The methods it serves, by wire name."""
        return {
            "runs.get_trace": self.get_trace,
            "runs.list": self.list_runs,
            "runs.subscribe": self.subscribe,
            "runs.unsubscribe": self.unsubscribe,
        }

    def get_trace(self, session: Session, params: dict):
        run_id = id_param(params, "run_id", required=True)
        cursor = int_param(params, "cursor", 0, 0, 2**31)
        limit = int_param(params, "limit", 500, 1, 5000)
        return then(
            self._policy.visible_run(self._store, session, run_id),
            lambda summary: self._trace_page(summary, run_id, cursor, limit),
        )

    def _trace_page(self, summary, run_id: str, cursor: int, limit: int):
        """A page of a run's trace, once its summary is known."""
        if summary is None:
            return {"run_id": run_id, "not_found": True}
        return then(
            self._store.read_records(run_id, cursor, limit),
            lambda page: _trace_answer(run_id, summary.agent_id, cursor, *page),
        )

    def list_runs(self, session: Session, params: dict):
        # Without agent_id: the bound agent's runs, or every agent's (None).
        agent_id = id_param(params, "agent_id") or session.agent_id
        if not self._policy.may_read(session, agent_id):
            raise InvalidParams(
                f"invalid params: this session may list only agent {session.agent_id!r}"
            )
        limit = int_param(params, "limit", 50, 1, 500)
        status = params.get("status")
        if status is not None and status not in RUN_STATUSES:
            raise InvalidParams(
                "invalid params: status must be one of " + ", ".join(RUN_STATUSES)
            )
        cursor = params.get("cursor")
        if cursor is not None and not (isinstance(cursor, str) and len(cursor) <= 512):
            raise InvalidParams("invalid params: cursor must be a next_cursor string")
        return then(
            self._store.list_runs(agent_id, cursor, limit, status),
            lambda page: _runs_answer(agent_id, *page),
            _unreadable_cursor,
        )

    async def subscribe(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        summary = await as_deferred(self._policy.visible_run(self._store, session, run_id))
        if summary is None:
            raise RunRefused(f"unknown run {run_id!r}")
        if run_id not in session.following and len(session.following) >= MAX_FOLLOWED:
            raise RunRefused(f"a session follows at most {MAX_FOLLOWED} runs; unsubscribe first")
        self._fanout.unfollow(session, run_id)
        self._fanout.follow(session, run_id)
        try:
            records, position = await self._snapshot(run_id)
        except BaseException:
            self._fanout.unfollow(session, run_id)
            raise
        if run_id not in session.following:
            raise RunRefused("the session closed or unsubscribed while subscribing")
        if records is None:
            self._fanout.unfollow(session, run_id)
            raise RunRefused(
                f"the trace of run {run_id} is too large to send in one answer; "
                "read it with runs.get_trace pages instead"
            )
        if not records:
            self._fanout.unfollow(session, run_id)
            raise RunRefused(
                f"run {run_id} has no readable records (its stored trace is damaged)"
            )
        self._fanout.snapshot_taken(session, run_id, records, position)
        status = status_of(records[-1] if records[-1]["record"] == "ended" else None)
        if status != "in_progress":
            self._fanout.unfollow(session, run_id)
        elif self._on_followed is not None:
            self._on_followed(run_id)
        turns = [r for r in records if r["record"] in TURN_RECORDS]
        return {
            "run_id": run_id,
            "agent_id": summary.agent_id,
            "turns_so_far": turns,
            "cursor": len(turns),
            "status": status,
        }

    async def _snapshot(self, run_id: str):
        """
        A followed run's records from the start, and the position after
        them: read page by page up to the records it held once followed
        (later ones reach the follower as events); None as soon as they
        exceed L{PAGE_BYTES}, so a large run is never read whole.
        """
        summary = await self._store.get_run(run_id)
        held = 0
        if summary is not None:
            held = end_position(summary.turn_count) + (summary.status != "in_progress")
        records, position = [], 0
        while len(records) < held:
            page, position = await self._store.read_records(run_id, position, MAX_TURNS_PER_RUN + 2)
            if not page:
                break
            records.extend(page)
            if _fitting(records) < len(records):
                return None, position
        return records, position

    def unsubscribe(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        return {"run_id": run_id, "removed": self._fanout.unfollow(session, run_id)}


def _trace_answer(run_id: str, agent_id: str, cursor: int, records: list, next_cursor: int) -> dict:
    """A page of a trace, cut to what fits in one answer."""
    kept = _fitting(records)
    if kept < len(records):
        records, next_cursor = records[:kept], cursor + kept
    return {
        "run_id": run_id,
        "agent_id": agent_id,
        "records": records,
        "cursor": next_cursor,
    }


def _runs_answer(agent_id: str, runs: list, next_cursor) -> dict:
    return {
        "agent_id": agent_id,
        "runs": [summary.to_json() for summary in runs],
        "next_cursor": next_cursor,
    }


def _unreadable_cursor(failure):
    if not failure.check(ValueError):
        return failure
    raise InvalidParams("invalid params: cursor is not a next_cursor this daemon returned")


def _fitting(records: list) -> int:
    """How many leading records fit in L{PAGE_BYTES} (at least one)."""
    size = 0
    for n, record in enumerate(records):
        size += encoded_size(record) + 1
        if n and size > PAGE_BYTES:
            return n
    return len(records)
