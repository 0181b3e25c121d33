"""
Live trace following: which sessions follow which runs, and delivery of
each newly durable record to them as a ``runs.trace.event`` notification.

A follower that is still taking its snapshot buffers events; when the
snapshot is read, the buffered events it does not already hold (by record
position) extend it, so the snapshot and the stream meet with no gap and no
duplicate. The events carry CAR's cursor, the run's turn count, which the
run service computes (see docs/protocol.md).
"""

from car_twisted.interfaces import position_after, turns_held
from car_twisted.session import Session


class TraceFanout:
    def __init__(self):
        self._followers = {}  # run_id -> {Session: list (snapshotting) or None (live)}

    def follow(self, session: Session, run_id: str) -> None:
        """Start following; events buffer until L{snapshot_taken}."""
        self._followers.setdefault(run_id, {})[session] = []
        session.following.add(run_id)

    def snapshot_taken(self, session: Session, run_id: str, records: list, position: int) -> None:
        """
        Merge the events that arrived while the snapshot was read into
        C{records} (in place), and switch the follower to live delivery.
        C{position} is the record position after the snapshot's records.
        """
        for event_position, record in self._followers[run_id][session]:
            if event_position > position:
                records.append(record)
                position = event_position
        self._followers[run_id][session] = None

    def unfollow(self, session: Session, run_id: str) -> bool:
        followers = self._followers.get(run_id, {})
        removed = followers.pop(session, False) is not False
        if not followers:
            self._followers.pop(run_id, None)
        session.following.discard(run_id)
        return removed

    def forget(self, session: Session) -> None:
        """A session closed: drop all it followed."""
        for run_id in list(session.following):
            self.unfollow(session, run_id)

    def publish(self, run_id: str, agent_id: str, record: dict, turns: int, status: str) -> None:
        """
        Deliver a durable record of a run that has C{turns} turns to the
        run's followers.
        """
        followers = self._followers.get(run_id)
        if not followers:
            return
        cursor = turns_held(record, turns)
        event = {"run_id": run_id, "agent_id": agent_id, "record": record, "cursor": cursor, "status": status}
        for session, buffered in list(followers.items()):
            if buffered is None:
                session.notify("runs.trace.event", event)
            else:
                buffered.append((position_after(record, turns), record))
        if status != "in_progress":
            for session in list(followers):
                if followers.get(session) is None:
                    self.unfollow(session, run_id)
