"""
Outcomes that are often known at once: the explicit callbacks of the
per-request hot path.

An I{outcome} is a value, a L{Failure}, or a L{Deferred} of either. A store
whose Deferred has already fired (the memory store, reads served from
memory) lets a request be answered in the call that brought it, without a
coroutine or a new Deferred per step: L{then} applies the next step at once
when the outcome is known and chains it when it is not. Control flow that
is not per request stays in coroutines (C{docs/architecture.md}).
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure


def then(outcome, callback, errback=None):
    """
    Continue C{outcome} with C{callback} (on a value) or C{errback} (on a
    L{Failure}; without one, a failure passes on as it is).

    A Deferred that has already fired counts as known: its result is taken
    from it through the await protocol, as C{await} does when there is
    nothing to wait for (a value comes back, a failure is raised and no
    longer logged as unhandled). A known outcome is continued now: the
    step's return value is returned, or the L{Failure} of what it raised. A
    pending one gets the step added to its callbacks and is returned.
    """
    if isinstance(outcome, Deferred):
        try:
            next(outcome.__await__())
        except StopIteration as fired:
            outcome = fired.value
        except BaseException:
            outcome = Failure()
        else:
            # Fires later.
            return outcome.addCallbacks(callback, errback)
    try:
        if isinstance(outcome, Failure):
            return outcome if errback is None else errback(outcome)
        return callback(outcome)
    except BaseException:
        return Failure()


def as_deferred(outcome) -> Deferred:
    """A Deferred of C{outcome}, for callers that wait."""
    if isinstance(outcome, Deferred):
        return outcome
    if isinstance(outcome, Failure):
        return fail(outcome)
    return succeed(outcome)
