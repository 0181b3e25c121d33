"""
Live trace following: which sessions follow which runs, and delivery of
each newly durable record to them as a ``runs.trace.event`` notification.

A follower that is still taking its snapshot buffers events; when the
snapshot is read, the buffered events it does not already hold extend it,
so the snapshot and the stream meet with no gap and no duplicate. A live
follower remembers the cursor it has been sent up to: a record at or before
it (published twice, by this daemon and by a catch-up read) is not sent again.
"""

from car_twisted.session import Session


class TraceFanout:
    def __init__(self):
        self._followers = {}  # run_id -> {Session: list (snapshotting) or int (live: cursor sent)}

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
        self._followers[run_id][session] = cursor
        return cursor

    def sent(self, run_id: str):
        """The lowest cursor the run's live followers were sent up to, or None."""
        cursors = [c for c in self._followers.get(run_id, {}).values() if isinstance(c, int)]
        return min(cursors, default=None)

    def followed(self) -> list:
        """The runs someone follows."""
        return list(self._followers)

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
            if isinstance(buffered, list):
                buffered.append((record, cursor))
            elif cursor > buffered:
                followers[session] = cursor
                session.notify("runs.trace.event", event)
        if status != "in_progress":
            for session in list(followers):
                if isinstance(followers.get(session), int):
                    self.unfollow(session, run_id)
