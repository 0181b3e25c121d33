"""
Who may read and write which runs: the one access rule of the run service
and the readers (``docs/security.md`` explains the roles).
"""

from typing import Optional

from car_twisted.interfaces import RunSummary
from car_twisted.outcomes import then
from car_twisted.session import Session


class AccessPolicy:
    """
    The read and write rules. C{auth_enabled} is False under ``--no-auth``,
    where every session reads every run.
    """

    def __init__(self, auth_enabled: bool):
        self._auth_enabled = auth_enabled

    def may_read(self, session: Session, agent_id: Optional[str]) -> bool:
        """
        Whether C{session} may read C{agent_id}'s runs (every agent's when
        None). The host reads all; a session bound to an agent reads only
        that agent's runs; an unbound session reads all when it holds the
        daemon secret or auth is off.
        """
        if session.role == "host":
            return True
        if session.agent_id is not None:
            return session.agent_id == agent_id
        return session.authenticated or not self._auth_enabled

    def visible_run(self, store, session: Session, run_id: str):
        """
        The run's summary from C{store} if it exists and C{session} may read
        it, else None (an outcome: L{then}).
        """
        return then(store.get_run(run_id), lambda summary: self._readable(session, summary))

    def _readable(self, session: Session, summary: Optional[RunSummary]) -> Optional[RunSummary]:
        if summary is None or not self.may_read(session, summary.agent_id):
            return None
        return summary

    def may_write(self, session: Session, producer: Optional[Session], agent_id: str) -> bool:
        """
        Whether C{session} may write to an open run of C{agent_id} that
        C{producer} (None once it left) is producing: its producer, or any
        session of the same agent.
        """
        return producer is session or agent_id == session.agent_id

    def may_prune(self, session: Session) -> bool:
        """Whether C{session} may delete old runs: the host, or anyone with auth off."""
        return session.role == "host" or not self._auth_enabled
