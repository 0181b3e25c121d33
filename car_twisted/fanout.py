"""
Live trace following: which sessions follow which runs, and delivery of
each newly durable record to them as a ``runs.trace.event`` notification.

A follower that is still taking its snapshot buffers events; when the
snapshot is read, the buffered events it does not already hold extend it,
so the snapshot and the stream meet with no gap and no duplicate.
"""

from car_twisted.session import Session


class TraceFanout:
    def __init__(self):
        self._followers = {}  # run_id -> {Session: list (snapshotting) or None (live)}

    def follow(self, session: Session, run_id: str) -> None:
        """Start following; events buffer until L{snapshot_taken}."""
        self._followers.setdefault(run_id, {})[session] = []
        session.following.add(run_id)

    def snapshot_taken(self, session: Session, run_id: str, records: list, cursor: int) -> int:
        """
        Merge the events that arrived while the snapshot was read into
        C{records} (in place), switch the follower to live delivery, and
        return the cursor after the merged records.
        """
        buffered = self._followers[run_id][session]
        for record, event_cursor in buffered:
            if event_cursor > cursor:
                records.append(record)
                cursor = event_cursor
        self._followers[run_id][session] = None
        return cursor

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

    def publish(self, run_id: str, agent_id: str, record: dict, cursor: int, status: str) -> None:
        """Deliver a durable record at position C{cursor - 1} to the run's followers."""
        followers = self._followers.get(run_id)
        if not followers:
            return
        event = {"run_id": run_id, "agent_id": agent_id, "record": record, "cursor": cursor, "status": status}
        for session, buffered in list(followers.items()):
            if buffered is None:
                session.notify("runs.trace.event", event)
            else:
                buffered.append((record, cursor))
        if status != "in_progress":
            for session in list(followers):
                if followers.get(session) is None:
                    self.unfollow(session, run_id)
