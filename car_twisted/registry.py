"""
The run registry: the daemon's state, independent of any one connection.

It keeps the connected sessions and the runs this daemon is producing, and
implements the ``runs.*`` methods on top of an L{IRunStore}. The methods
make their in-memory changes synchronously, before their first wait on the
store, so requests from one session take effect in arrival order even though
they are answered whenever their writes are durable.
"""

import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from car_twisted.auth import Authenticator
from car_twisted.errors import CapabilityMismatch, InvalidParams, RunRefused
from car_twisted.fanout import TraceFanout
from car_twisted.handshake import handshake
from car_twisted.interfaces import (
    RUN_STATUSES,
    RunExists,
    RunNotFound,
    RunTerminal,
    TurnLimitReached,
    status_of,
)
from car_twisted.records import (
    MAX_TURNS_PER_RUN,
    agent_slug,
    MAX_TURN_BYTES,
    clip_text,
    encoded_size,
    ended_record,
    id_param,
    int_param,
    new_run_id,
    parse_model_turn,
    parse_outcome,
    parse_turns,
    started_record,
    text_param,
    too_large,
)
from car_twisted.session import Session

log = Logger()

#: The grace window after a producer's connection closes (seconds).
DEFAULT_GRACE = 0.25
#: The same window for sessions that negotiated ``runs.resume.v1``.
DEFAULT_RESUME_LEASE = 10.0
#: How many runs one session may follow live at once.
MAX_FOLLOWED = 100
#: Record bytes in one runs.get_trace page or runs.subscribe snapshot: with
#: its envelope it fits the smallest message limit (512 KiB), and every
#: record (at most 256 KiB) fits in it.
PAGE_BYTES = 384 * 1024


@dataclass(eq=False)
class LiveRun:
    """An open run this daemon is producing."""

    run_id: str
    agent_id: str
    producer: Optional[Session]
    #: The client id of the session that produced it last.
    client_id: str
    expiry: Optional[IDelayedCall] = None
    #: Turns durably recorded so far.
    turns: int = 0


class RunRegistry:
    """
    Sessions, live runs and the ``runs.*`` methods.

    @param clock: schedules the grace window (an L{IReactorTime}).
    @param environ: where C{CAR_AGENT_ID} is looked up, at each start.
    @param authenticator: checks ``session.auth``; None accepts every
        session (``--no-auth``).
    """

    def __init__(
        self,
        store,
        clock,
        grace=DEFAULT_GRACE,
        environ=os.environ,
        resume_lease=DEFAULT_RESUME_LEASE,
        authenticator=None,
    ):
        self.store = store
        self.authenticator = authenticator or Authenticator.disabled()
        self.sessions = {}  # client_id -> Session
        self._clock = clock
        self._grace = grace
        self._resume_lease = resume_lease
        self._fanout = TraceFanout()
        self._environ = environ
        self._live = {}  # run_id -> LiveRun
        self._writes = set()  # Deferreds of writes nobody waits for
        self._stopped = False
        #: Called with the run id of each run once its terminal record is durable.
        self.run_ended_observers = []
        #: Methods served beside the registry's own (wire name -> method).
        self.extra_methods = {}

    def methods(self) -> dict:
        """The JSON-RPC methods, by wire name."""
        return {
            "session.auth": self.authenticator.authenticate,
            "server.handshake": handshake,
            "runs.start": self.start,
            "runs.complete": self.complete,
            "runs.record_turns": self.record_turns,
            "runs.record_model_turn": self.record_model_turn,
            "runs.cancel": self.cancel,
            "runs.resume": self.resume,
            "runs.get_trace": self.get_trace,
            "runs.list": self.list_runs,
            "runs.subscribe": self.subscribe,
            "runs.unsubscribe": self.unsubscribe,
            **self.extra_methods,
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
        self._fanout.forget(session)
        window = self._resume_lease if "runs.resume.v1" in session.capabilities else self._grace
        for run_id in session.producing:
            live = self._live[run_id]
            live.producer = None
            if not self._stopped:
                live.expiry = self._clock.callLater(window, self._expire, live)
        session.producing = set()

    def _expire(self, live: LiveRun) -> None:
        live.expiry = None
        self._finish(live)
        ended = ended_record("incomplete", reason="connection closed")
        self._write_behind(Deferred.fromCoroutine(self._end(live, ended)))
        log.info("run {run_id} ended incomplete: its producer went away", run_id=live.run_id)

    async def _end(self, live: LiveRun, ended: dict) -> None:
        """Write a run's terminal record and tell its followers."""
        await self.store.end_run(live.run_id, ended)
        self._fanout.publish(live.run_id, live.agent_id, ended, live.turns + 2, status_of(ended))
        self._ended(live.run_id)

    def _ended(self, run_id: str) -> None:
        for observer in self.run_ended_observers:
            observer(run_id)

    def _finish(self, live: LiveRun) -> None:
        """Take a run out of the live set: it is terminal from now on."""
        del self._live[live.run_id]
        _cancel_expiry(live)
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
                self._ended(summary.run_id)
                log.info("run {run_id} ended incomplete: the daemon restarted", run_id=summary.run_id)
            elif not result.check(RunTerminal, RunNotFound):
                log.failure("run {run_id} could not be ended", result, run_id=summary.run_id)
        return ended

    def stop(self):
        """
        Stop ending runs: open runs stay open for the store's restart
        recovery, even those of sessions that close later. Fires once every
        pending write is done and the store closed.
        """
        self._stopped = True
        for live in self._live.values():
            _cancel_expiry(live)
        d = DeferredList(list(self._writes))
        d.addCallback(lambda _: self.store.close())
        return d

    # Writes

    def _resolve_agent(self, session: Session, params: dict) -> str:
        if session.role == "host":
            raise RunRefused(
                "the host role reads runs and cannot record them; "
                "authenticate as an agent (session.auth with agent_id and token)"
            )
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
        idempotency_key = id_param(params, "idempotency_key")
        agent_id = self._resolve_agent(session, params)
        run_id = idempotency_key or new_run_id()
        if run_id in self._live:
            return self._restart(session, run_id, self._live[run_id].agent_id, agent_id)
        live = LiveRun(run_id=run_id, agent_id=agent_id, producer=session, client_id=session.client_id)
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
        except BaseException as e:
            if self._live.get(run_id) is live:
                self._finish(live)
            if isinstance(e, RunExists):
                existing = await self.store.get_run(run_id)
                return self._restart(session, run_id, existing.agent_id, agent_id)
            raise
        return {"run_id": run_id, "agent_id": agent_id}

    def _restart(self, session: Session, run_id: str, owner: str, agent_id: str) -> dict:
        """Answer a start whose idempotency key names an existing run."""
        if owner != agent_id:
            raise RunRefused(
                "idempotency_key is already used by another agent's run; choose another key"
            )
        session.current_run_id = run_id
        return {"run_id": run_id, "agent_id": agent_id}

    def _writable(self, session: Session, run_id: str) -> Optional[LiveRun]:
        """The live run if C{session} may write to it, else None."""
        live = self._live.get(run_id)
        if live is not None and (
            live.producer is session or live.agent_id == session.agent_id
        ):
            return live
        return None

    async def _visible_run(self, session: Session, run_id: str):
        """The run's summary if it exists and the session may read it."""
        summary = await self.store.get_run(run_id)
        if summary is None or not self._may_read(session, summary.agent_id):
            return None
        return summary

    async def _refuse_write(self, session: Session, run_id: str):
        """Raise the error for a write the session cannot make."""
        summary = await self._visible_run(session, run_id)
        if summary is None:
            raise RunRefused(f"unknown run {run_id!r}")
        if run_id in self._live:
            raise RunRefused(f"run {run_id} is being recorded by another session")
        # Not live: ended, or its terminal record is being written.
        status = "" if summary.status == "in_progress" else f" ({summary.status})"
        raise RunRefused(f"run {run_id} already ended{status}")

    async def complete(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        if "outcome" not in params:
            raise InvalidParams("invalid params: outcome is required")
        outcome = parse_outcome(params["outcome"])
        if too_large(outcome):
            raise InvalidParams(
                f"invalid params: outcome is larger than {MAX_TURN_BYTES // 1024} KiB once encoded"
            )
        live = self._writable(session, run_id)
        if live is None:
            await self._refuse_write(session, run_id)
        self._finish(live)
        if session.current_run_id == run_id:
            session.current_run_id = None
        try:
            await self._end(live, ended_record("outcome", outcome=outcome))
        except RunTerminal:
            raise RunRefused(f"run {run_id} already ended")
        return {"ok": True, "run_id": run_id}

    async def record_turns(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        return await self._record(session, run_id, parse_turns(params.get("turns")))

    async def record_model_turn(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        return await self._record(session, run_id, [parse_model_turn(params)])

    async def _record(self, session: Session, run_id: str, records: list) -> dict:
        """Append turn records; a run that cannot take them says why."""
        live = self._writable(session, run_id)
        if live is None:
            ended = run_id not in self._live and await self._visible_run(session, run_id)
            return _dropped(run_id, "run_terminal" if ended else "run_not_found")
        if any(too_large(record) for record in records):
            return _dropped(run_id, "turn_too_large")
        try:
            base = await self.store.append_turns(run_id, records, MAX_TURNS_PER_RUN)
        except TurnLimitReached:
            return _dropped(run_id, "run_turn_limit")
        except RunTerminal:
            return _dropped(run_id, "run_terminal")
        except RunNotFound:
            return _dropped(run_id, "run_not_found")
        live.turns = base + len(records)
        for offset, record in enumerate(records):
            record["index"] = base + offset
            self._fanout.publish(run_id, live.agent_id, record, base + offset + 2, "in_progress")
        return {"run_id": run_id, "base_index": base, "count": len(records), "ok": True}

    def _require(self, session: Session, capability: str, method: str) -> None:
        if capability not in session.capabilities:
            raise CapabilityMismatch(
                f"{method} needs the {capability} capability: "
                f"send server.handshake with it in optional_capabilities first"
            )

    async def cancel(self, session: Session, params: dict) -> dict:
        self._require(session, "runs.cancel.v1", "runs.cancel")
        run_id = id_param(params, "run_id", required=True)
        key = id_param(params, "idempotency_key", required=True)
        reason = text_param(params, "reason") or ""
        digest = hashlib.sha256(reason.encode()).hexdigest()
        answer = {"run_id": run_id, "idempotency_key": key, "reason_digest": digest}
        live = self._writable(session, run_id)
        if live is None and session.role == "host":
            live = self._live.get(run_id)
        if live is not None:
            self._finish(live)
            ended = ended_record("cancelled", reason_digest=digest, idempotency_key=key)
            await self._end(live, ended)
            log.debug("run {run_id} cancelled", run_id=run_id)
            return {**answer, "status": "cancelled_confirmed"}
        summary = await self._visible_run(session, run_id)
        if summary is None:
            raise RunRefused(f"unknown run {run_id!r}")
        if run_id in self._live:
            raise RunRefused(
                f"run {run_id} may be cancelled only by its producer, its agent or the host"
            )
        ended, _ = await self.store.read_records(run_id, summary.turn_count + 1, 1)
        repeated = any(
            r.get("idempotency_key") == key and r.get("reason_digest") == digest for r in ended
        )
        return {**answer, "status": "cancelled_confirmed" if repeated else "already_terminal"}

    async def resume(self, session: Session, params: dict) -> dict:
        self._require(session, "runs.resume.v1", "runs.resume")
        run_id = id_param(params, "run_id", required=True)
        if session.agent_id is None:
            raise RunRefused(
                "runs.resume needs a session bound to the run's agent (session.auth with agent_id)"
            )
        live = self._live.get(run_id)
        if live is None or live.agent_id != session.agent_id:
            await self._refuse_write(session, run_id)
        if live.producer is not None:
            raise RunRefused(f"run {run_id} is being recorded by another session")
        _cancel_expiry(live)
        resumed_from, live.client_id = live.client_id, session.client_id
        live.producer = session
        session.producing.add(run_id)
        session.current_run_id = run_id
        log.debug("run {run_id} resumed by {client_id}", run_id=run_id, client_id=session.client_id)
        return {
            "run_id": run_id,
            "agent_id": live.agent_id,
            "client_id": session.client_id,
            "resumed_from_client_id": resumed_from,
        }

    # Reads

    def _may_read(self, session: Session, agent_id: str) -> bool:
        """
        Whether C{session} may read C{agent_id}'s runs: the one rule for
        every read. The host reads all; a session bound to an agent reads
        only that agent's runs; an unbound session reads all when it holds
        the daemon secret or auth is off (see docs/security.md).
        """
        if session.role == "host":
            return True
        if session.agent_id is not None:
            return session.agent_id == agent_id
        return session.authenticated or not self.authenticator.enabled

    async def get_trace(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        cursor = int_param(params, "cursor", 0, 0, 2**31)
        limit = int_param(params, "limit", 500, 1, 5000)
        summary = await self._visible_run(session, run_id)
        if summary is None:
            return {"run_id": run_id, "not_found": True}
        records, next_cursor = await self.store.read_records(run_id, cursor, limit)
        kept = _fitting(records)
        if kept < len(records):
            records, next_cursor = records[:kept], cursor + kept
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

    async def subscribe(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        summary = await self._visible_run(session, run_id)
        if summary is None:
            raise RunRefused(f"unknown run {run_id!r}")
        if run_id not in session.following and len(session.following) >= MAX_FOLLOWED:
            raise RunRefused(f"a session follows at most {MAX_FOLLOWED} runs; unsubscribe first")
        self._fanout.unfollow(session, run_id)
        self._fanout.follow(session, run_id)
        try:
            records, cursor = await self.store.read_records(run_id, 0, MAX_TURNS_PER_RUN + 2)
        except BaseException:
            self._fanout.unfollow(session, run_id)
            raise
        if run_id not in session.following:
            raise RunRefused("the session closed or unsubscribed while subscribing")
        if _fitting(records) < len(records):
            self._fanout.unfollow(session, run_id)
            raise RunRefused(
                f"the trace of run {run_id} is too large to send in one answer; "
                "read it with runs.get_trace pages instead"
            )
        cursor = self._fanout.snapshot_taken(session, run_id, records, cursor)
        status = status_of(records[-1] if records[-1]["record"] == "ended" else None)
        if status != "in_progress":
            self._fanout.unfollow(session, run_id)
        return {
            "run_id": run_id,
            "agent_id": summary.agent_id,
            "turns_so_far": [r for r in records if r["record"] in ("turn", "model_turn")],
            "cursor": cursor,
            "status": status,
        }

    def unsubscribe(self, session: Session, params: dict) -> dict:
        run_id = id_param(params, "run_id", required=True)
        return {"run_id": run_id, "removed": self._fanout.unfollow(session, run_id)}


def _cancel_expiry(live: LiveRun) -> None:
    """Cancel the run's grace or lease timer, if it has one."""
    if live.expiry is not None:
        live.expiry.cancel()
        live.expiry = None


def _fitting(records: list) -> int:
    """How many leading records fit in L{PAGE_BYTES} (at least one)."""
    size = 0
    for n, record in enumerate(records):
        size += encoded_size(record) + 1
        if n and size > PAGE_BYTES:
            return n
    return len(records)


def _dropped(run_id: str, reason: str) -> dict:
    return {"run_id": run_id, "base_index": 0, "count": 0, "ok": False, "dropped": reason}
