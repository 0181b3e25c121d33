"""
L{then}: a step applied at once to an outcome that is known (a value, a
failure, a Deferred that has already fired), and chained to one that is not.
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial import unittest

from car_twisted.outcomes import as_deferred, then


class ThenTests(unittest.SynchronousTestCase):
    def test_value_now(self):
        """A plain value and a fired Deferred are continued in the call,
        which returns the step's value rather than a Deferred."""
        self.assertEqual(then(2, lambda v: v * 10), 20)
        self.assertEqual(then(succeed(3), lambda v: v * 10), 30)

    def test_failure_now(self):
        """A failed Deferred goes to the errback at once; without one its
        failure is returned as it is, and the Deferred does not log it as
        unhandled."""
        self.assertEqual(then(fail(KeyError("k")), lambda v: v, lambda f: f.type), KeyError)
        failure = then(fail(KeyError("k")), lambda v: v)
        self.assertIsInstance(failure, Failure)
        self.assertIs(failure.type, KeyError)
        self.assertEqual(self.flushLoggedErrors(KeyError), [])

    def test_raising_step_gives_its_failure(self):
        """A step that raises on a known outcome returns the Failure of what
        it raised, so a later step's errback sees it."""
        failure = then(succeed(1), lambda v: 1 / 0)
        self.assertIs(failure.type, ZeroDivisionError)
        self.assertEqual(then(failure, lambda v: "value", lambda f: "handled"), "handled")

    def test_pending_is_chained(self):
        """A pending Deferred is returned with the step added: the step runs
        when it fires, on its value or its failure."""
        d = Deferred()
        chained = then(d, lambda v: v + 1, lambda f: "failed")
        self.assertIs(chained, d)
        self.assertNoResult(chained)
        d.callback(41)
        self.assertEqual(self.successResultOf(chained), 42)
        d = Deferred()
        chained = then(d, lambda v: v + 1, lambda f: f.type)
        d.errback(KeyError("k"))
        self.assertIs(self.successResultOf(chained), KeyError)

    def test_pending_failure_without_errback_passes_on(self):
        """Without an errback, a pending Deferred's failure stays a failure."""
        d = Deferred()
        chained = then(d, lambda v: v)
        d.errback(KeyError("k"))
        self.failureResultOf(chained, KeyError)

    def test_as_deferred(self):
        """as_deferred gives waiters a Deferred of any outcome."""
        self.assertEqual(self.successResultOf(as_deferred(5)), 5)
        self.failureResultOf(as_deferred(Failure(KeyError("k"))), KeyError)
        d = Deferred()
        self.assertIs(as_deferred(d), d)
