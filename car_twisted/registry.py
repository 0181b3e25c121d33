"""
The run registry: the daemon's state, independent of any one connection.

It keeps the connected sessions and the runs this daemon is producing, and
implements the ``runs.*`` methods on top of an L{IRunStore}. The methods
make their in-memory changes synchronously, before their first wait on the
store, so requests from one session take effect in arrival order even though
they are answered whenever their writes are durable.
"""

import os
import uuid
from dataclasses import dataclass
from typing import Optional

from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from car_twisted.errors import InvalidParams, RunRefused
from car_twisted.interfaces import RUN_STATUSES, RunNotFound, RunTerminal
from car_twisted.records import (
    agent_slug,
    clip_text,
    ended_record,
    id_param,
    int_param,
    new_run_id,
    parse_outcome,
    started_record,
    text_param,
)
from car_twisted.session import Session

log = Logger()

#: The grace window after a producer's connection closes (seconds).
DEFAULT_GRACE = 0.25


@dataclass(eq=False)
class LiveRun:
    """An open run this daemon is producing."""

    run_id: str
    agent_id: str
    producer: Optional[Session]
    expiry: Optional[IDelayedCall] = None


class RunRegistry:
    """
    Sessions, live runs and the ``runs.*`` methods.

    @param clock: schedules the grace window (an L{IReactorTime}).
    @param environ: where C{CAR_AGENT_ID} is looked up, at each start.
    """

    def __init__(self, store, clock, grace=DEFAULT_GRACE, environ=os.environ):
        self.store = store
        self.sessions = {}  # client_id -> Session
        self._clock = clock
        self._grace = grace
        self._environ = environ
        self._live = {}  # run_id -> LiveRun
        self._writes = set()  # Deferreds of writes nobody waits for

    def methods(self) -> dict:
        """The JSON-RPC methods, by wire name."""
        return {
            "runs.start": self.start,
            "runs.complete": self.complete,
            "runs.get_trace": self.get_trace,
            "runs.list": self.list_runs,
        }

    # Sessions

    def open_session(self, peer: str, notify) -> Session:
        session = Session(client_id=uuid.uuid4().hex, peer=peer, notify=notify)
        self.sessions[session.client_id] = session
        return session

    def close_session(self, session: Session) -> None:
        """
        Forget a closed connection; each run it was producing is ended
        C{incomplete} unless it ends otherwise within the grace window.
        """
        self.sessions.pop(session.client_id, None)
        for run_id in session.producing:
            live = self._live[run_id]
            live.producer = None
            live.expiry = self._clock.callLater(self._grace, self._expire, live)
        session.producing = set()

    def _expire(self, live: LiveRun) -> None:
        live.expiry = None
        self._finish(live)
        self._write_behind(
            self.store.end_run(
                live.run_id, ended_record("incomplete", reason="connection closed")
            )
        )
        log.info("run {run_id} ended incomplete: its producer went away", run_id=live.run_id)

    def _finish(self, live: LiveRun) -> None:
        """Take a run out of the live set: it is terminal from now on."""
        del self._live[live.run_id]
        if live.expiry is not None:
            live.expiry.cancel()
            live.expiry = None
        producer = live.producer
        if producer is not None:
            producer.producing.discard(live.run_id)
            if producer.current_run_id == live.run_id:
                producer.current_run_id = None

    def _write_behind(self, d) -> None:
        """Keep track of a write no request waits for, and log its failure."""
        self._writes.add(d)

        def done(result):
            self._writes.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: f.trap(RunTerminal))
        d.addErrback(lambda f: log.failure("a run store write failed", f))

    async def recover(self) -> int:
        """
        End every run the store holds open with an C{incomplete} record
        (reason C{"daemon restarted"}): before this daemon serves anyone, an
        open run can only be one whose producer died with the last daemon.
        Call it once, before listening. The ends are issued together so a
        store can share flushes among them.

        @return: how many runs were ended.
        """
        stale = [s for s in await self.store.open_runs() if s.run_id not in self._live]
        results = await DeferredList(
            [
                self.store.end_run(
                    summary.run_id, ended_record("incomplete", reason="daemon restarted")
                )
                for summary in stale
            ],
            consumeErrors=True,
        )
        ended = 0
        for summary, (ok, result) in zip(stale, results):
            if ok:
                ended += 1
                log.info("run {run_id} ended incomplete: the daemon restarted", run_id=summary.run_id)
            elif not result.check(RunTerminal, RunNotFound):
                log.failure("run {run_id} could not be ended", result, run_id=summary.run_id)
        return ended

    def stop(self):
        """
        Stop ending runs: open runs stay open for the store's restart
        recovery. Fires once every pending write is done and the store closed.
        """
        for live in self._live.values():
            if live.expiry is not None:
                live.expiry.cancel()
                live.expiry = None
        d = DeferredList(list(self._writes))
        d.addCallback(lambda _: self.store.close())
        return d

    # Writes

    def _resolve_agent(self, session: Session, params: dict) -> str:
        requested = id_param(params, "agent_id")
        if session.agent_id is not None:
            if requested is not None and requested != session.agent_id:
                raise InvalidParams(
                    f"invalid params: agent_id {requested!r} does not match this "
                    f"session's agent {session.agent_id!r}; omit agent_id"
                )
            return session.agent_id
        if requested is not None:
            return requested
        from_env = self._environ.get("CAR_AGENT_ID")
        if from_env:
            return from_env
        name = text_param(params, "agent_name")
        if name is not None and agent_slug(name):
            return "name:" + agent_slug(name)[:250]
        raise InvalidParams(
            "invalid params: runs.start requires a resolvable agent_id "
            "(send agent_id or agent_name, or bind the session with session.auth)"
        )

    async def start(self, session: Session, params: dict) -> dict:
        intent = text_param(params, "intent", required=True)
        description = text_param(params, "outcome_description")
        agent_id = self._resolve_agent(session, params)
        run_id = new_run_id()
        live = LiveRun(run_id=run_id, agent_id=agent_id, producer=session)
        self._live[run_id] = live
        session.producing.add(run_id)
        session.current_run_id = run_id
        record = started_record(
            run_id,
            agent_id,
            session.client_id,
            clip_text(intent),
            clip_text(description) if description is not None else None,
        )
        try:
            await self.store.start_run(record)
        except BaseException:
            if self._live.get(run_id) is live:
                self._finish(live)
            raise
        log.info("run {run_id} started by {agent_id}", run_id=run_id, agent_id=agent_id)
        return {"run_id": run_id, "agent_id": agent_id}

    def _writable(self, session: Session, run_id: str) -> Optional[LiveRun]:
        """The live run if C{session} may write to it, else None."""
        live = self._live.get(run_id)
        if live is not None and (
            live.producer is session or live.agent_id == session.agent_id
        ):
            return live
        return None

    async def _refuse_write(self, session: Session, run_id: str):
        """Raise the error for a write the session cannot make."""
        summary = await self.store.get_run(run_id)
        if summary is not None and self._may_read(session, summary.agent_id):
            if summary.status != "in_progress":
                raise RunRefused(f"run {run_id} already ended ({summary.status})")
            raise RunRefused(f"run {run_id} is being recorded by another session")
        raise RunRefused(f"unknown run {run_id!r}")

    async def complete(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        if "outcome" not in params:
            raise InvalidParams("invalid params: outcome is required")
        outcome = parse_outcome(params["outcome"])
        live = self._writable(session, run_id)
        if live is None:
            await self._refuse_write(session, run_id)
        self._finish(live)
        if session.current_run_id == run_id:
            session.current_run_id = None
        try:
            await self.store.end_run(run_id, ended_record("outcome", outcome=outcome))
        except RunTerminal:
            raise RunRefused(f"run {run_id} already ended")
        log.info(
            "run {run_id} completed: {status}", run_id=run_id, status=outcome["status"]
        )
        return {"ok": True, "run_id": run_id}

    # Reads

    def _may_read(self, session: Session, agent_id: str) -> bool:
        return session.agent_id is None or session.agent_id == agent_id

    async def get_trace(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        cursor = int_param(params, "cursor", 0, 0, 2**31)
        limit = int_param(params, "limit", 500, 1, 5000)
        summary = await self.store.get_run(run_id)
        if summary is None or not self._may_read(session, summary.agent_id):
            return {"run_id": run_id, "not_found": True}
        records, next_cursor = await self.store.read_records(run_id, cursor, limit)
        return {
            "run_id": run_id,
            "agent_id": summary.agent_id,
            "records": records,
            "cursor": next_cursor,
        }

    async def list_runs(self, session: Session, params: dict) -> dict:
        agent_id = id_param(params, "agent_id", required=session.agent_id is None)
        agent_id = agent_id or session.agent_id
        if not self._may_read(session, agent_id):
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
        try:
            runs, next_cursor = await self.store.list_runs(agent_id, cursor, limit, status)
        except ValueError:
            raise InvalidParams(
                "invalid params: cursor is not a next_cursor this daemon returned"
            )
        return {
            "agent_id": agent_id,
            "runs": [summary.to_json() for summary in runs],
            "next_cursor": next_cursor,
        }
