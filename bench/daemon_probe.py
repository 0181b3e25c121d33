"""
Runs the daemon exactly as ``twistd`` does, plus one bench-only hook: on
SIGUSR1 it prints the reactor's pending delayed calls (their count and
what they would call) to standard error, so the drop storm can check that
none is left behind. Nothing in the daemon's code changes.

    python bench/daemon_probe.py -n --pidfile= car --no-auth ...
"""

import json
import signal
import sys
from collections import Counter


def _report_delayed_calls(signum, frame):
    from twisted.internet import reactor

    # Count on the reactor's own turn, not in the middle of whatever the
    # signal interrupted.
    reactor.callFromThread(_print_delayed_calls, reactor)


def _print_delayed_calls(reactor):
    calls = reactor.getDelayedCalls()
    names = Counter(getattr(call.func, "__qualname__", repr(call.func)) for call in calls)
    print(f"bench-probe delayed-calls {len(calls)} {json.dumps(names)}", file=sys.__stderr__, flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _report_delayed_calls)
    from twisted.scripts.twistd import run

    sys.argv[0] = "twistd"
    run()
