"""
Runs that other daemons write: what a daemon does when its store is shared
(an L{ISharedRunStore}, ``docs/deploy.md``).

A run's agent may write to its open run through any daemon, a cancel may
reach any daemon, and a follower on any daemon sees every record. The run
service keeps its live runs (those this daemon produces); this module does
the rest: writes to a run another daemon produces, and catching this
daemon's followers up on what other daemons wrote.
"""

from typing import Optional

from twisted.logger import Logger

from car_twisted.access import AccessPolicy
from car_twisted.fanout import TraceFanout
from car_twisted.interfaces import TURN_RECORDS, RunSummary, RunTerminal, status_of
from car_twisted.outcomes import as_deferred
from car_twisted.records import ended_record
from car_twisted.session import Session

log = Logger()

#: Records read at once when catching up on a run another daemon changed.
CATCH_UP_PAGE = 100


class SharedRuns:
    """
    Writes to runs another daemon produces, and the catch-up reads of what
    other daemons wrote.

    @param store: the shared store.
    @param fanout: this daemon's followers, caught up on other daemons' writes.
    @param policy: who may write to which run.
    """

    def __init__(self, store, fanout: TraceFanout, policy: AccessPolicy):
        self._store = store
        self._fanout = fanout
        self._policy = policy

    async def writable(self, session: Session, run_id: str) -> Optional[RunSummary]:
        """
        The summary of an open run this daemon does not produce that
        C{session} may write to (the same agent, as on one daemon), else None.
        """
        summary = await as_deferred(self._policy.visible_run(self._store, session, run_id))
        if (
            summary is None
            or summary.status != "in_progress"
            or not self._policy.may_write(session, None, summary.agent_id)
        ):
            return None
        return summary

    async def complete(self, session: Session, run_id: str, outcome: dict) -> bool:
        """Complete a run another daemon produces; False if C{session} may not."""
        if await self.writable(session, run_id) is None:
            return False
        try:
            await self._store.end_run(run_id, ended_record("outcome", outcome=outcome))
        except RunTerminal:
            return False
        if session.current_run_id == run_id:
            session.current_run_id = None
        return True

    async def cancel(self, session: Session, summary: RunSummary, key: str, digest: str) -> bool:
        """
        Cancel a run open in the store that this daemon does not produce
        (another daemon does, or its terminal record is on its way: then
        the store refuses, the first terminal record wins). False if it was
        not cancelled here.
        """
        if summary.status != "in_progress" or not (
            session.role == "host" or self._policy.may_write(session, None, summary.agent_id)
        ):
            return False
        ended = ended_record("cancelled", reason_digest=digest, idempotency_key=key)
        try:
            await self._store.end_run(summary.run_id, ended)
        except RunTerminal:
            return False
        log.debug("run {run_id} cancelled", run_id=summary.run_id)
        return True

    async def catch_up(self, run_id: str) -> Optional[RunSummary]:
        """
        Send this daemon's followers of C{run_id} the records they were not
        sent, read from the store a page at a time (memory per read stays
        bounded however far behind they are).

        @return: the run's summary as read first, or None if it is unknown.
        """
        summary = await self._store.get_run(run_id)
        if summary is None:
            return None
        position = self._fanout.sent(run_id)
        while position is not None:
            records, after = await self._store.read_records(run_id, position, CATCH_UP_PAGE)
            for at, record in enumerate(records, position):
                self._fanout.publish(run_id, summary.agent_id, record, *_turns_and_status(record, at))
            position = after if len(records) == CATCH_UP_PAGE else None
        return summary


def _turns_and_status(record: dict, position: int) -> tuple:
    """The run's turns and status once it holds C{record}, at C{position}."""
    if record["record"] in TURN_RECORDS:
        return record["index"] + 1, "in_progress"
    if record["record"] == "ended":
        return position - 1, status_of(record)
    return 0, "in_progress"
