"""
The run service: the connected sessions, the runs this daemon is producing
and their grace window, and the ``runs.*`` methods that write.

The methods make their in-memory changes synchronously, before their first
wait on the store, so requests from one session take effect in arrival
order even though they are answered whenever their writes are durable; a
write the store refuses has its change undone, so the client's retry
succeeds.

On a store several daemons share (L{ISharedRunStore}, ``docs/deploy.md``) it
also releases and adopts runs across daemons, ends a run whose producer
left only while this daemon still owns it, and hands writes to runs other
daemons produce, and their changes, to L{SharedRuns}.
"""

import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from car_twisted.access import AccessPolicy
from car_twisted.errors import CapabilityMismatch, InvalidParams, RunRefused, StoreUnavailable
from car_twisted.fanout import TraceFanout
from car_twisted.interfaces import (
    RunExists,
    RunNotFound,
    RunTerminal,
    StoreWriteFailed,
    TurnLimitReached,
    end_position,
    status_of,
)
from car_twisted.limits import MAX_ID, MAX_TURN_BYTES, MAX_TURNS_PER_RUN
from car_twisted.metrics import DaemonMetrics
from car_twisted.outcomes import as_deferred, then
from car_twisted.records import (
    agent_slug,
    clip_text,
    ended_record,
    id_param,
    keyed_run_id,
    new_run_id,
    parse_model_turn,
    parse_outcome,
    parse_turns,
    started_record,
    text_param,
    too_large,
)
from car_twisted.session import Session
from car_twisted.shared import SharedRuns

log = Logger()

#: Runs ended together by restart recovery.
RECOVERY_BATCH = 1000
#: The grace window after a producer's connection closes (seconds).
DEFAULT_GRACE = 0.25
#: The same window for sessions that negotiated ``runs.resume.v1``.
DEFAULT_RESUME_LEASE = 10.0


@dataclass(eq=False, slots=True)
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


class RunService:
    """
    Sessions, live runs and the ``runs.*`` methods that write.

    @param fanout: where durable records are published to followers.
    @param policy: who may write to which run.
    @param clock: schedules the grace window (an L{IReactorTime}).
    @param environ: where C{CAR_AGENT_ID} is looked up, at each start.
    @param metrics: the L{DaemonMetrics} runs are counted in.
    @param run_ended_observers: each called with the id of every run whose
        terminal record is durable (ended here, or by L{recover}).
    @param shared: the L{SharedRuns} of a store several daemons share, else
        None.
    """

    def __init__(
        self,
        store,
        fanout: TraceFanout,
        policy: AccessPolicy,
        clock,
        grace=DEFAULT_GRACE,
        environ=os.environ,
        resume_lease=DEFAULT_RESUME_LEASE,
        metrics=None,
        run_ended_observers=(),
        shared: Optional[SharedRuns] = None,
    ):
        self.store = store
        self._shared = shared
        self._metrics = metrics if metrics is not None else DaemonMetrics()
        self.sessions = {}  # client_id -> Session
        self._fanout = fanout
        self._policy = policy
        self._clock = clock
        self._grace = grace
        self._resume_lease = resume_lease
        self._environ = environ
        self._live = {}  # run_id -> LiveRun
        self._writes = set()  # Deferreds of writes nobody waits for
        self._stopped = False
        self._run_ended_observers = tuple(run_ended_observers)
        #: Why the store's last write failed, while it fails (logged once);
        #: None once a write succeeds again.
        self.store_failure = None

    def methods(self) -> dict:
        """The methods it serves, by wire name."""
        return {
            "runs.start": self.start,
            "runs.complete": self.complete,
            "runs.record_turns": self.record_turns,
            "runs.record_model_turn": self.record_model_turn,
            "runs.cancel": self.cancel,
            "runs.resume": self.resume,
        }

    @property
    def open_run_count(self) -> int:
        """Open runs this daemon produces (or waits on a grace timer for)."""
        return len(self._live)

    @property
    def grace_timer_count(self) -> int:
        """Open runs whose producer left, waiting out their grace window."""
        return sum(1 for live in self._live.values() if live.expiry is not None)

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
        for run_id in session.producing:
            self._orphan(self._live[run_id], self._window(session))
            if self._shared is not None and "runs.resume.v1" in session.capabilities:
                # Another daemon may adopt it (runs.resume through it).
                self._write_behind(self.store.release(run_id))
        session.producing.clear()

    def _window(self, session: Session) -> float:
        """How long a run outlives its producer's connection."""
        return self._resume_lease if "runs.resume.v1" in session.capabilities else self._grace

    def _orphan(self, live: LiveRun, delay: float) -> None:
        """Leave a run without producer; it ends C{incomplete} after C{delay}."""
        live.producer = None
        if not self._stopped:
            live.expiry = self._clock.callLater(delay, self._expire, live)

    def _expire(self, live: LiveRun) -> None:
        live.expiry = None
        self._finish(live)
        ended = ended_record("incomplete", reason="connection closed")
        d = as_deferred(self._end(live, ended, if_owned=True))
        # No log line per run: a drop storm ends thousands at once; the
        # ended record says why, the metrics count them.
        d.addErrback(self._expiry_failed, live)
        self._write_behind(d)

    def _expiry_failed(self, failure, live: LiveRun) -> None:
        """The store could not end the run: it is live again, tried after another window."""
        failure.trap(StoreUnavailable)
        if live.run_id not in self._live:
            self._live[live.run_id] = live
            self._orphan(live, self._grace)

    def _end(self, live: LiveRun, ended: dict, if_owned: bool = False):
        """
        Write a run's terminal record and tell its followers (an outcome).
        C{if_owned}: only while this daemon owns the run (a shared store:
        another daemon may have adopted it meanwhile).
        """
        end = self.store.end_own_run if if_owned and self._shared is not None else self.store.end_run
        return then(self._stored(end(live.run_id, ended)), lambda _: self._ended(live, ended))

    def _ended(self, live: LiveRun, ended: dict) -> None:
        self._metrics.run_ended(ended["termination"])
        self._fanout.publish(live.run_id, live.agent_id, ended, live.turns, status_of(ended))
        self._durably_ended(live.run_id)

    def _durably_ended(self, run_id: str) -> None:
        """Tell the observers a run's terminal record is durable."""
        for observer in self._run_ended_observers:
            observer(run_id)

    def _end_live(self, session: Session, live: LiveRun, ended: dict):
        """
        End a live run for C{session}'s request (an outcome). If the store
        cannot write, the run is put back as it was (live, with its producer
        or its grace window), so the client's retry ends it.
        """
        producer = live.producer
        deadline = live.expiry.getTime() if live.expiry is not None else None
        current = [s for s in (session, producer) if s and s.current_run_id == live.run_id]
        self._finish(live)
        for s in current:
            s.current_run_id = None

        def restore(failure):
            if not failure.check(StoreUnavailable):
                return failure
            self._live[live.run_id] = live
            for s in current:
                s.current_run_id = live.run_id
            if producer is None:
                if deadline is not None:
                    self._orphan(live, max(deadline - self._clock.seconds(), 0))
            elif self.sessions.get(producer.client_id) is producer:
                producer.producing.add(live.run_id)
            else:
                self._orphan(live, self._window(producer))
            return failure

        return then(self._end(live, ended), _same, restore)

    def _stored(self, write: Deferred):
        """
        The outcome of a store write (L{then}). A store that cannot write
        answers L{StoreUnavailable}; the failure is logged once until a
        write succeeds again.
        """
        return then(write, self._written, self._write_failed)

    def _written(self, result):
        if self.store_failure is not None:
            self.store_failure = None
            log.info("the run store writes again")
        return result

    def _write_failed(self, failure):
        if not failure.check(StoreWriteFailed):
            return failure
        detail = failure.value.detail
        if self.store_failure is None:
            log.error("the run store cannot write: {detail}", detail=detail)
        self.store_failure = detail
        raise StoreUnavailable(detail)

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
        d.addErrback(lambda f: f.trap(RunTerminal, StoreUnavailable))
        d.addErrback(lambda f: log.failure("a run store write failed", f))

    async def recover(self) -> int:
        """
        End every run the store holds open with an C{incomplete} record
        (reason C{"daemon restarted"}): before this daemon serves anyone, an
        open run can only be one whose producer died with the last daemon.
        Call it once, before listening. The ends are issued
        L{RECOVERY_BATCH} at a time, so a store can share flushes among
        them while memory stays bounded however many runs were left open.
        A store several daemons share ends only the runs of dead daemons
        (this daemon's predecessors and those whose lease expired), never a
        live peer's.

        @return: how many runs were ended.
        """
        if self._shared is not None:
            return await self.store.recover()
        stale = [s.run_id for s in await self.store.open_runs() if s.run_id not in self._live]
        ended = 0
        for first in range(0, len(stale), RECOVERY_BATCH):
            batch = stale[first : first + RECOVERY_BATCH]
            results = await DeferredList(
                [
                    self.store.end_run(run_id, ended_record("incomplete", reason="daemon restarted"))
                    for run_id in batch
                ],
                consumeErrors=True,
            )
            for run_id, (ok, result) in zip(batch, results):
                if ok:
                    ended += 1
                    self._metrics.run_ended("incomplete")
                    self._durably_ended(run_id)
                elif not result.check(RunTerminal, RunNotFound):
                    log.failure("run {run_id} could not be ended", result, run_id=run_id)
        return ended

    # Runs changed through other daemons (a store several daemons share)

    def run_changed(self, run_id: str) -> None:
        """
        Another daemon changed a run: send its new records to this daemon's
        followers, and stop producing it here if it was ended or adopted
        elsewhere.
        """
        if self._stopped or (run_id not in self._live and self._fanout.sent(run_id) is None):
            return
        self._write_behind(Deferred.fromCoroutine(self._changed_elsewhere(run_id)))

    def runs_changed(self) -> None:
        """Changes by other daemons may have been missed: catch up on every run."""
        for run_id in set(self._fanout.followed()) | set(self._live):
            self.run_changed(run_id)

    async def _changed_elsewhere(self, run_id: str) -> None:
        summary = await self._shared.catch_up(run_id)
        live = self._live.get(run_id)
        if summary is None or live is None:
            return
        # Turns the same agent recorded through another daemon.
        live.turns = max(live.turns, summary.turn_count)
        if summary.status != "in_progress" or not await self.store.owns(run_id):
            if self._live.get(run_id) is live:
                self._finish(live)
                log.debug("run {run_id} is no longer produced through this daemon", run_id=run_id)

    async def _ended_elsewhere(self, ending, run_id: str, termination: str) -> bool:
        """
        Wait for C{ending}, L{SharedRuns} ending a run another daemon
        produces; once it did, count it and tell followers and observers.
        """
        if not await as_deferred(self._stored(Deferred.fromCoroutine(ending))):
            return False
        self._metrics.run_ended(termination)
        self._durably_ended(run_id)
        self.run_changed(run_id)
        return True

    async def _complete_elsewhere(self, session: Session, run_id: str, outcome: dict) -> dict:
        ending = self._shared.complete(session, run_id, outcome)
        if not await self._ended_elsewhere(ending, run_id, "outcome"):
            await self._refuse_write(session, run_id)
        return {"ok": True, "run_id": run_id}

    async def _record_elsewhere(self, session: Session, run_id: str, records: list) -> dict:
        summary = await self._shared.writable(session, run_id)
        if summary is None:
            ended = await as_deferred(self._policy.visible_run(self.store, session, run_id))
            return _dropped(run_id, "run_terminal" if ended else "run_not_found")
        if any(too_large(record) for record in records):
            return _dropped(run_id, "turn_too_large")
        return await as_deferred(
            then(
                self._stored(self.store.append_turns(run_id, records, MAX_TURNS_PER_RUN)),
                lambda stamped: self._recorded(run_id, summary.agent_id, stamped, summary.turn_count),
                lambda failure: _refused_turns(failure, run_id),
            )
        )

    async def _adopt(self, session: Session, run_id: str) -> None:
        """
        Make this daemon the producer daemon of a run whose producer left
        (here or through another daemon); the caller refuses what cannot be
        resumed.
        """
        live = self._live.get(run_id)
        if live is not None and live.producer is not None:
            return
        summary = await as_deferred(self._policy.visible_run(self.store, session, run_id))
        if summary is None or summary.agent_id != session.agent_id or summary.status != "in_progress":
            return
        if not await as_deferred(self._stored(self.store.adopt(run_id))):
            raise RunRefused(f"run {run_id} is being recorded by another session")
        if run_id not in self._live:
            (started, *_), _ = await self.store.read_records(run_id, 0, 1)
            self._live[run_id] = LiveRun(
                run_id=run_id,
                agent_id=summary.agent_id,
                producer=None,
                client_id=started["client_id"],
                turns=summary.turn_count,
            )

    def stop(self):
        """
        Stop ending runs: open runs stay open for the store's restart
        recovery, even those of sessions that close later. Fires once every
        pending write is done.
        """
        self._stopped = True
        for live in self._live.values():
            _cancel_expiry(live)
        return DeferredList(list(self._writes))

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

    def start(self, session: Session, params: dict):
        intent, description, idempotency_key, agent_id = _start_params(params)
        if agent_id is None or session.role is not None or session.agent_id is not None:
            agent_id = self._resolve_agent(session, params)
        run_id = keyed_run_id(agent_id, idempotency_key) if idempotency_key else new_run_id()
        if run_id in self._live:
            return self._restart(session, run_id, self._live[run_id].agent_id, agent_id)
        client_id = session.client_id
        live = LiveRun(run_id, agent_id, session, client_id)
        self._live[run_id] = live
        session.producing.add(run_id)
        session.current_run_id = run_id
        record = started_record(
            run_id,
            agent_id,
            client_id,
            clip_text(intent),
            clip_text(description) if description is not None else None,
        )
        outcome = self._stored(self.store.start_run(record))
        if outcome is not None:
            # Not stored yet, or refused (a stored write fires with None).
            return then(
                outcome,
                lambda _: self._started(run_id, agent_id),
                lambda failure: self._start_failed(failure, session, live),
            )
        return self._started(run_id, agent_id)

    def _start_failed(self, failure, session: Session, live: LiveRun):
        """Undo a start the store refused; a run id it holds already is restarted."""
        run_id = live.run_id
        if self._live.get(run_id) is live:
            self._finish(live)
        if not failure.check(RunExists):
            return failure
        return then(
            self.store.get_run(run_id),
            lambda existing: self._restart_stored(session, run_id, existing, live.agent_id),
        )

    def _restart_stored(self, session: Session, run_id: str, existing, agent_id: str) -> dict:
        """Answer a start whose run id the store holds already."""
        if existing is None:
            raise RunRefused(
                f"run id {run_id!r} is held by a run file the store cannot read; "
                "choose another idempotency_key"
            )
        return self._restart(session, run_id, existing.agent_id, agent_id)

    def _started(self, run_id: str, agent_id: str) -> dict:
        self._metrics.runs_started += 1
        return {"run_id": run_id, "agent_id": agent_id}

    def _restart(self, session: Session, run_id: str, owner: str, agent_id: str) -> dict:
        """Answer a start whose idempotency key names an existing run."""
        if owner != agent_id:
            # Keyed run ids differ per agent; only a run an older daemon
            # stored under the bare key can be another agent's.
            raise RunRefused("idempotency_key cannot be used; choose another key")
        session.current_run_id = run_id
        return {"run_id": run_id, "agent_id": agent_id}

    def _writable(self, session: Session, run_id: str) -> Optional[LiveRun]:
        """The live run if C{session} may write to it, else None."""
        live = self._live.get(run_id)
        if live is not None and self._policy.may_write(session, live.producer, live.agent_id):
            return live
        return None

    async def _refuse_write(self, session: Session, run_id: str):
        """Raise the error for a write the session cannot make."""
        summary = await as_deferred(self._policy.visible_run(self.store, session, run_id))
        if summary is None:
            raise RunRefused(f"unknown run {run_id!r}")
        if run_id in self._live:
            raise RunRefused(f"run {run_id} is being recorded by another session")
        # Not live: ended, or its terminal record is being written.
        status = "" if summary.status == "in_progress" else f" ({summary.status})"
        raise RunRefused(f"run {run_id} already ended{status}")

    def complete(self, session: Session, params: dict):
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
            if self._shared is not None and run_id not in self._live:
                return Deferred.fromCoroutine(self._complete_elsewhere(session, run_id, outcome))
            return Deferred.fromCoroutine(self._refuse_write(session, run_id))
        return then(
            self._end_live(session, live, ended_record("outcome", outcome=outcome)),
            lambda _: {"ok": True, "run_id": run_id},
            lambda failure: _refused_end(failure, run_id),
        )

    def record_turns(self, session: Session, params: dict):
        run_id = id_param(params, "run_id", required=True)
        return self._record(session, run_id, parse_turns(params.get("turns")))

    def record_model_turn(self, session: Session, params: dict):
        run_id = id_param(params, "run_id", required=True)
        return self._record(session, run_id, [parse_model_turn(params)])

    def _record(self, session: Session, run_id: str, records: list):
        """Append turn records; a run that cannot take them says why."""
        live = self._writable(session, run_id)
        if live is None:
            if run_id in self._live:
                return _dropped(run_id, "run_not_found")
            if self._shared is not None:
                return Deferred.fromCoroutine(self._record_elsewhere(session, run_id, records))
            return then(
                self._policy.visible_run(self.store, session, run_id),
                lambda ended: _dropped(run_id, "run_terminal" if ended else "run_not_found"),
            )
        if any(too_large(record) for record in records):
            return _dropped(run_id, "turn_too_large")
        return then(
            self._stored(self.store.append_turns(run_id, records, MAX_TURNS_PER_RUN)),
            lambda stamped: self._recorded(run_id, live.agent_id, stamped, live.turns, live),
            lambda failure: _refused_turns(failure, run_id),
        )

    def _recorded(self, run_id: str, agent_id: str, stamped: list, turns: int, live=None) -> dict:
        """
        The turns are durable: count them (on C{live}, if it is a run this
        daemon produces) and tell the run's followers. The store stamped
        their indices: the run's agent may also write through another
        daemon sharing the store. C{turns} is the count before them.
        """
        base = stamped[0]["index"] if stamped else turns
        turns = base + len(stamped)
        if live is not None:
            live.turns = max(live.turns, turns)
        for record in stamped:
            self._fanout.publish(run_id, agent_id, record, turns, "in_progress")
        return {"run_id": run_id, "base_index": base, "count": len(stamped), "ok": True}

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
            ended = ended_record("cancelled", reason_digest=digest, idempotency_key=key)
            await as_deferred(self._end_live(session, live, ended))
            log.debug("run {run_id} cancelled", run_id=run_id)
            return {**answer, "status": "cancelled_confirmed"}
        summary = await as_deferred(self._policy.visible_run(self.store, session, run_id))
        if summary is None:
            raise RunRefused(f"unknown run {run_id!r}")
        if run_id in self._live:
            raise RunRefused(
                f"run {run_id} may be cancelled only by its producer, its agent or the host"
            )
        if self._shared is not None:
            ending = self._shared.cancel(session, summary, key, digest)
            if await self._ended_elsewhere(ending, run_id, "cancelled"):
                return {**answer, "status": "cancelled_confirmed"}
            if summary.status == "in_progress":
                # Ended since it was read (its terminal record was on its way).
                summary = await self.store.get_run(run_id)
        ended, _ = await self.store.read_records(run_id, end_position(summary.turn_count), 1)
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
        if self._shared is not None:
            await self._adopt(session, run_id)
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


def _start_params(params: dict) -> tuple:
    """
    The parameters of ``runs.start``: intent, outcome_description,
    idempotency_key and agent_id (None when absent, else for
    L{RunService._resolve_agent} to check), as L{text_param} and
    L{id_param} read them; the common case in one pass.
    """
    intent = params.get("intent")
    description = params.get("outcome_description")
    key = params.get("idempotency_key")
    agent_id = params.get("agent_id")
    if not (type(intent) is str and intent):
        intent = text_param(params, "intent", required=True)
    if not (description is None or type(description) is str and description):
        description = text_param(params, "outcome_description")
    if not (key is None or type(key) is str and 0 < len(key) <= MAX_ID):
        key = id_param(params, "idempotency_key")
    if not (type(agent_id) is str and 0 < len(agent_id) <= MAX_ID):
        agent_id = None
    return intent, description, key, agent_id


def _cancel_expiry(live: LiveRun) -> None:
    """Cancel the run's grace or lease timer, if it has one."""
    if live.expiry is not None:
        live.expiry.cancel()
        live.expiry = None


def _same(result):
    return result


def _refused_end(failure, run_id: str):
    """A run the store holds ended already is refused; other failures pass on."""
    if failure.check(RunTerminal):
        raise RunRefused(f"run {run_id} already ended")
    return failure


def _refused_turns(failure, run_id: str):
    """The answer for turns the store refused, by why; other failures pass on."""
    refusal = failure.check(*_TURN_REFUSALS)
    return failure if refusal is None else _dropped(run_id, _TURN_REFUSALS[refusal])


_TURN_REFUSALS = {
    TurnLimitReached: "run_turn_limit",
    RunTerminal: "run_terminal",
    RunNotFound: "run_not_found",
}


def _dropped(run_id: str, reason: str) -> dict:
    return {"run_id": run_id, "base_index": 0, "count": 0, "ok": False, "dropped": reason}
