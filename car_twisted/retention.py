"""
Retention: ended runs older than a number of days are deleted from the
store, in the background (``--retain-days``) or on demand (``runs.prune``),
in small batches with the reactor free between them. Open runs are never
pruned. See docs/export.md.
"""

from datetime import datetime, timezone

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from car_twisted.errors import InvalidParams, RunRefused

log = Logger()

DAY = 86400
#: Runs deleted per store call: each is one short store operation.
DEFAULT_BATCH = 100
#: Seconds between background passes.
DEFAULT_INTERVAL = 3600.0
#: The largest age accepted, in days (about 1000 years).
MAX_DAYS = 365_000


def ended_before(seconds: float, days: float) -> str:
    """The cut for runs older than C{days} at Unix time C{seconds}, stamped as records are."""
    moment = datetime.fromtimestamp(seconds - days * DAY, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Retention(Service):
    """
    Prunes the store: every C{interval} seconds when C{days} is set, and
    whenever L{prune_method} is called.

    @param clock: schedules the passes and tells the time (C{seconds()}).
    @param policy: the L{car_twisted.access.AccessPolicy}: who may call
        ``runs.prune``.
    """

    def __init__(self, store, clock, policy, days=None, batch=DEFAULT_BATCH,
                 interval=DEFAULT_INTERVAL):  # fmt: skip
        self._store = store
        self._clock = clock
        self._policy = policy
        self.days = days
        self._batch = batch
        self._interval = interval
        self._loop = None
        self._passes = set()  # Deferreds of the prunes under way
        self._stopping = False

    def methods(self) -> dict:
        """The methods it serves, by wire name."""
        return {"runs.prune": self.prune_method}

    def startService(self):
        super().startService()
        if self.days is not None:
            self._loop = LoopingCall(self._background_pass)
            self._loop.clock = self._clock
            self._loop.start(self._interval, now=True)

    def stopService(self):
        """Stop after the batch under way; fires once no prune runs."""
        super().stopService()
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._drained())

    async def _drained(self):
        for d in list(self._passes):
            try:
                await d
            except Exception:
                pass  # logged where the prune was started

    def _background_pass(self):
        d = self.prune(self.days)
        d.addErrback(lambda f: log.failure("retention: pruning the store failed", f))
        return d

    def prune(self, days: float) -> Deferred:
        """Delete every ended run older than C{days}: fires with how many."""
        return self._tracked(ended_before(self._clock.seconds(), days))

    def _tracked(self, before: str) -> Deferred:
        d = Deferred.fromCoroutine(self._prune(before))
        self._passes.add(d)

        def done(result):
            self._passes.discard(d)
            return result

        return d.addBoth(done)

    async def _prune(self, before: str) -> int:
        total = 0
        while not self._stopping:
            pruned = await self._store.prune_runs(before, self._batch)
            total += len(pruned)
            if len(pruned) < self._batch:
                break
            # Let the reactor serve everyone else between batches.
            await deferLater(self._clock, 0, lambda: None)
        if total:
            log.info("retention: pruned {count} runs ended before {before}", count=total, before=before)
        return total

    async def prune_method(self, session, params: dict) -> dict:
        """``runs.prune``: C{older_than_days} (a number above 0), C{dry_run}."""
        if not self._policy.may_prune(session):
            raise RunRefused("runs.prune is for the host: authenticate with the host token first")
        days = params.get("older_than_days")
        if type(days) not in (int, float) or not 0 < days <= MAX_DAYS:
            raise InvalidParams(f"invalid params: older_than_days must be a number of days above 0, at most {MAX_DAYS}")
        dry_run = params.get("dry_run", False)
        if type(dry_run) is not bool:
            raise InvalidParams("invalid params: dry_run must be true or false")
        before = ended_before(self._clock.seconds(), days)
        answer = {"older_than_days": days, "ended_before": before, "dry_run": dry_run}
        if dry_run:
            return {**answer, "prunable": await self._store.count_prunable(before)}
        return {**answer, "pruned": await self._tracked(before)}
