"""
The real daemon (``twistd -n car``) in a child process, for tests that kill
it. Any ``--store`` name works: the same harness runs every store. It also
serves its HTTP side (dashboard, health, metrics) on an ephemeral port.
"""

import os
import re
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

import car_twisted

#: Where the source tree is, so the child imports this checkout.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(car_twisted.__file__)))
_LISTENING = re.compile(rb"car-twisted listening on .*port=(\d+)")
_DASHBOARD = re.compile(rb"car-twisted dashboard on .*port=(\d+)")


def daemon_command(store: str, data_dir: str, *extra: str, auth: bool = False) -> list:
    """The command line of a daemon on ephemeral loopback ports."""
    return [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile=",
        "car", *([] if auth else ["--no-auth"]), "--store", store, "--data-dir", data_dir,
        "--listen", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1", *extra,
    ]  # fmt: skip


def daemon_environment() -> dict:
    return dict(os.environ, PYTHONPATH=SOURCE_ROOT)


class DaemonProcess(ProcessProtocol):
    """
    A daemon child process. C{await start()} fires with the port it listens
    on (read from its log), once its HTTP side (C{http_port}) listens too;
    C{ended} fires when the process is gone.
    """

    def __init__(self, store: str, data_dir: str, *extra: str, auth: bool = False):
        self.command = daemon_command(store, data_dir, *extra, auth=auth)
        self.output = b""
        self.port = None
        self.http_port = None
        #: The exit code once the process is gone (None if a signal ended it).
        self.exit_code = None
        #: The signal that ended the process, if one did.
        self.exit_signal = None
        self.ended = Deferred()
        self._listening = Deferred()

    async def start(self, timeout: float = 30.0) -> int:
        reactor.spawnProcess(
            self, self.command[0], self.command, env=daemon_environment(), path=SOURCE_ROOT
        )
        self._listening.addTimeout(timeout, reactor)
        self.port = await self._listening
        return self.port

    def outReceived(self, data):
        self.output += data
        match = _LISTENING.search(self.output)
        dashboard = _DASHBOARD.search(self.output)
        if match and dashboard and not self._listening.called:
            self.http_port = int(dashboard.group(1))
            self._listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason):
        self.exit_code = reason.value.exitCode
        self.exit_signal = getattr(reason.value, "signal", None)
        if not self._listening.called:
            self._listening.errback(
                RuntimeError("the daemon exited before listening:\n" + self.output.decode(errors="replace"))
            )
        self.ended.callback(None)

    def kill(self, signal: str = "KILL") -> Deferred:
        """Send a signal (if the process still runs); fires once it is gone."""
        if not self.ended.called:
            self.transport.signalProcess(signal)
        d = Deferred()
        self.ended.addCallback(lambda _: d.callback(None))
        return d
