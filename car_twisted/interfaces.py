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
#: The records that are turns: they count toward a run's turns.
TURN_RECORDS = frozenset({"turn", "model_turn"})


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


class StoreWriteFailed(Exception):
    """
    The store could not write (disk full, I/O error): nothing of the write
    was kept, on disk or in memory, so the same call may be retried.
    """

    def __init__(self, detail: str):
        super().__init__(detail)
        #: What went wrong, e.g. C{"No space left on device"}.
        self.detail = detail


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
    turns = sum(1 for r in records if r["record"] in TURN_RECORDS)
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


# Positions. A run's records stand in one sequence: ``started`` at 0, the
# turn with index i at i + 1, then ``ended``. runs.get_trace's cursor is a
# position in it; runs.subscribe's cursor (CAR's) counts turns only.


def end_position(turns: int) -> int:
    """Where the ``ended`` record of a run with C{turns} turns stands."""
    return 1 + turns


def position_after(record: dict, turns: int) -> int:
    """The position after C{record}, in a run that has C{turns} turns."""
    if record["record"] in TURN_RECORDS:
        return record["index"] + 2
    return end_position(turns) + 1 if record["record"] == "ended" else 1


def turns_held(record: dict, turns: int) -> int:
    """
    CAR's subscription cursor once a follower holds C{record}: the turns so
    far. A turn counts itself; ``started`` and ``ended`` leave C{turns}.
    """
    return record["index"] + 1 if record["record"] in TURN_RECORDS else turns


class IRunStore(Interface):
    """
    Durable storage for runs and their records.

    Every method returns a Deferred. Calls that concern one run take effect
    in the order they were made, even when the caller does not wait for one
    to fire before making the next, and their Deferreds fire in that order.
    A Deferred that fires means the change is as durable as the store
    promises (on stable storage, for the file store). A write the store
    could not make fails with L{StoreWriteFailed} and changes nothing, so
    the same call can be made again.
    """

    def open():
        """
        Load or create what the store keeps; called once, before any other
        method (the daemon does it before it listens).

        @return: Deferred firing with None once the store is ready; it fails
            if the store cannot be used, with an error whose message says
            why in one line.
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

        @return: Deferred firing with the appended records as stored, each
            with its C{index} (copies: the caller may keep them); fails with L{RunNotFound}, L{RunTerminal}, or L{TurnLimitReached}
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
            C{next_cursor} is the position after the last record returned
            (a store may bound a page's bytes, so a page may hold fewer
            records before the run's end; an empty page is the end);
            fails with L{RunNotFound}.
        """

    def list_runs(agent_id, cursor, limit, status):
        """
        One page of an agent's runs (every agent's when C{agent_id} is
        None), newest first (runs started in the same millisecond keep
        their start order, the later one first).

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
        Finish pending writes and release resources; called once, after
        L{open} succeeded.

        @return: Deferred firing with None once everything acknowledged is
            durable.
        """


class ISharedRunStore(IRunStore):
    """
    A run store several daemons share (the PostgreSQL store). Each store
    object is one daemon: it owns the runs it starts until another daemon
    adopts them.
    """

    def recover():
        """
        At start, end the open runs of dead daemons (never a live peer's).

        @return: Deferred firing with how many runs were ended.
        """

    def start_heartbeat():
        """
        Keep this daemon alive in its peers' eyes until L{leave}; each beat
        also ends the open runs of daemons whose lease expired.
        """

    def leave():
        """
        Stop heartbeating and watching.

        @return: Deferred firing once stopped.
        """

    def watch(on_change, on_reconnect):
        """
        Call C{on_change(run_id)} for each change another daemon makes to a
        run, and C{on_reconnect()} when changes may have been missed.

        @return: Deferred firing once watching.
        """

    def release(run_id):
        """
        Mark an open run this daemon owns as having no producer: another
        daemon may adopt it (C{runs.resume}).

        @return: Deferred firing with None.
        """

    def adopt(run_id):
        """
        Make this daemon the owner of an open run that has no producer (or
        whose daemon is dead).

        @return: Deferred firing with True if this daemon now owns it.
        """

    def end_own_run(run_id, ended):
        """
        L{IRunStore.end_run}, but only while this daemon owns the run (a
        producer's window ran out here while another daemon adopted it).

        @return: Deferred firing with None; fails with L{RunTerminal} also
            when another daemon owns the run.
        """

    def owns(run_id):
        """@return: Deferred firing with whether this daemon owns the run."""
