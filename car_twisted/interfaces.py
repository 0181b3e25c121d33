"""
The run store interface, the run summary it hands out, and the exceptions
its Deferreds fail with.

A store keeps each run as an ordered list of JSON-ready records: one
``started`` record, then ``turn`` / ``model_turn`` records, then at most one
``ended`` record. Stores know nothing about sessions or the wire; the run
service decides who may do what, the store keeps the records safe.
"""

from dataclasses import asdict, dataclass
from typing import Optional

from zope.interface import Interface

#: The run statuses a summary (and ``runs.list``'s filter) can carry.
RUN_STATUSES = ("in_progress", "completed", "incomplete", "cancelled")


class RunStoreError(Exception):
    """Base of the errors a store's Deferreds fail with."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        self.run_id = run_id


class RunNotFound(RunStoreError):
    """No run has this id."""


class RunExists(RunStoreError):
    """A run with this id was already started."""


class RunTerminal(RunStoreError):
    """The run already has its terminal ``ended`` record."""


class TurnLimitReached(RunStoreError):
    """The run cannot take that many more turns."""


@dataclass(frozen=True)
class RunSummary:
    """One run as ``runs.list`` shows it."""

    run_id: str
    agent_id: str
    intent: str
    started_at: str
    ended_at: Optional[str]
    status: str
    outcome_status: Optional[str]
    turn_count: int

    def to_json(self) -> dict:
        return asdict(self)


def summarize(records: list) -> RunSummary:
    """
    Summarize a run from its records (the first must be ``started``).

    Stores may keep summaries up to date incrementally instead; this is the
    definition they must agree with.
    """
    started = records[0]
    ended = records[-1] if records[-1]["record"] == "ended" else None
    turns = sum(1 for r in records if r["record"] in ("turn", "model_turn"))
    return RunSummary(
        run_id=started["run_id"],
        agent_id=started["agent_id"],
        intent=started["intent"],
        started_at=started["started_at"],
        ended_at=ended["ended_at"] if ended else None,
        status=status_of(ended),
        outcome_status=(
            ended["outcome"]["status"]
            if ended and ended["termination"] == "outcome"
            else None
        ),
        turn_count=turns,
    )


def status_of(ended: Optional[dict]) -> str:
    """The run status implied by a run's ``ended`` record (or its absence)."""
    if ended is None:
        return "in_progress"
    return {
        "outcome": "completed",
        "incomplete": "incomplete",
        "cancelled": "cancelled",
    }[ended["termination"]]


class IRunStore(Interface):
    """
    Durable storage for runs and their records.

    Every method returns a Deferred. Calls that concern one run take effect
    in the order they were made, even when the caller does not wait for one
    to fire before making the next, and their Deferreds fire in that order.
    A Deferred that fires means the change is as durable as the store
    promises (on stable storage, for the file store).
    """

    def start_run(started):
        """
        Create a run from its ``started`` record (a dict with at least
        ``run_id``, ``agent_id``, ``intent`` and ``started_at``).

        @return: Deferred firing with None; fails with L{RunExists} if a run
            with that id exists.
        """

    def append_turns(run_id, turns, max_turns):
        """
        Append ``turn`` / ``model_turn`` records, stamping each with its
        ``index`` (0-based, one sequence per run), all or nothing.

        @return: Deferred firing with the index of the first appended record;
            fails with L{RunNotFound}, L{RunTerminal}, or L{TurnLimitReached}
            if the run would then hold more than C{max_turns} turns.
        """

    def end_run(run_id, ended):
        """
        Append the run's terminal ``ended`` record, unless it has one: the
        first terminal record wins, for ever.

        @return: Deferred firing with None; fails with L{RunNotFound} or
            L{RunTerminal}.
        """

    def get_run(run_id):
        """
        @return: Deferred firing with the run's L{RunSummary}, or None if no
            run has this id.
        """

    def read_records(run_id, cursor, limit):
        """
        Read a run's records from position C{cursor} (0 is the ``started``
        record), at most C{limit} of them.

        @return: Deferred firing with C{(records, next_cursor)} where
            C{next_cursor} is the position after the last record returned;
            fails with L{RunNotFound}.
        """

    def list_runs(agent_id, cursor, limit, status):
        """
        One page of an agent's runs, newest first (runs started in the same
        millisecond keep their start order, the later one first).

        @param cursor: None for the first page, else a C{next_cursor} this
            store returned for the same query.
        @param status: None, or one of L{RUN_STATUSES} to filter by.
        @return: Deferred firing with C{(summaries, next_cursor)}, where
            C{next_cursor} is a string, or None on the last page. A cursor the
            store cannot read fails with C{ValueError}.
        """

    def open_runs():
        """
        @return: Deferred firing with the L{RunSummary} of every run that
            has no terminal record.
        """

    def prune_runs(ended_before, limit):
        """
        Delete up to C{limit} ended runs whose ``ended_at`` is before
        C{ended_before} (a timestamp as L{car_twisted.records.now} writes
        them, compared as a string). Each run goes whole: once the Deferred
        fires it is in no C{get_run}, C{read_records}, C{list_runs} or
        C{open_runs} answer, and a crash at any point leaves it either whole
        or gone. Open runs are never pruned. Pages of C{list_runs} already
        handed out stay valid: their cursors skip the pruned runs.

        @return: Deferred firing with the ids of the runs deleted; fewer
            than C{limit} means no such run is left.
        """

    def count_prunable(ended_before):
        """
        @return: Deferred firing with how many runs L{prune_runs} would
            delete for C{ended_before} now.
        """

    def close():
        """
        Finish pending writes and release resources.

        @return: Deferred firing with None once everything acknowledged is
            durable.
        """
