"""
Runs as rows of an SQL database, shared by the stores that keep them so:
ids and text stored as UTF-8 bytes (a lone surrogate from the wire kept as
it came), and a run's summary from its row.
"""

from car_twisted.interfaces import RunSummary


def to_bytes(text):
    """C{text} as stored (None stays None)."""
    return None if text is None else text.encode("utf-8", "surrogatepass")


def to_text(data):
    """Stored bytes as the text they were (None stays None)."""
    return None if data is None else bytes(data).decode("utf-8", "surrogatepass")


def summary_from_row(row) -> RunSummary:
    """The summary of a run from its row's C{run_id, agent_id, intent,
    started_at, ended_at, status, outcome_status, turn_count}."""
    run_id, agent_id, intent, started_at, ended_at, status, outcome_status, turns = row
    return RunSummary(
        run_id=to_text(run_id),
        agent_id=to_text(agent_id),
        intent=to_text(intent),
        started_at=to_text(started_at),
        ended_at=to_text(ended_at),
        status=status,
        outcome_status=outcome_status,
        turn_count=turns,
    )
