"""
The daemon's CPU per durable runs.start by thread, without sockets: simulated
clients feed runs.start frames to the real protocol over StringTransports on
the real reactor, each sending its next request once its answer is written,
and the store runs as in the daemon (the SQLite store with its writer
thread). Prints, per round, the reactor thread's and the other threads' CPU
per request (from /proc/self/task), the cyclic garbage collector's share
and the starts per commit. Without the kernel's socket work and the load
generator it shows the store's own costs far more steadily than
bench/run.py on a shared machine.

    .venv/bin/python bench/store_cpu.py                        # sqlite, 50 clients x 1
    .venv/bin/python bench/store_cpu.py --clients 1 --depth 100
    .venv/bin/python bench/store_cpu.py --store memory
"""

import argparse
import gc
import os
import statistics
import tempfile
import time

import txaio
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from car_twisted.auth import Authenticator
from car_twisted.store.memory import MemoryRunStore
from car_twisted.store.sqlite import SQLiteRunStore
from car_twisted.tap import assemble
from protocol_cpu import _HANDSHAKE, text_frame

_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict:
    """{thread id: user + system seconds} of this process."""
    seconds = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds[tid] = (int(fields[11]) + int(fields[12])) / _TICK
    return seconds


class GCTime:
    """Thread CPU seconds spent in the cyclic garbage collector."""

    def __init__(self):
        self.seconds = 0.0
        self._began = 0.0
        gc.callbacks.append(self._observe)

    def _observe(self, phase, info):
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._began


class Client(StringTransport):
    """One connection: its next runs.start goes out, a reactor turn later,
    once an answer is written."""

    def __init__(self, factory, agent: int, answered: list):
        super().__init__()
        self._agent = agent
        self._answered = answered
        self._next_id = 0
        self._open = False
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self)
        self.protocol.dataReceived(_HANDSHAKE)
        self._open = True

    def write(self, data):
        if self._open:
            self._answered[0] += 1
            reactor.callLater(0, self.send)

    def send(self):
        self._next_id += 1
        self.protocol.dataReceived(
            text_frame(
                b'{"jsonrpc":"2.0","id":%d,"method":"runs.start",'
                b'"params":{"agent_id":"bench-agent-%d","intent":"benchmark run"}}'
                % (self._next_id, self._agent)
            )
        )

    def stop(self):
        self._open = False


def sleep(seconds: float) -> Deferred:
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def measure(args) -> None:
    store = MemoryRunStore() if args.store == "memory" else SQLiteRunStore(tempfile.mkdtemp(), reactor)
    await store.open()
    factory = assemble(store, reactor, Authenticator.disabled()).factory
    answered = [0]
    collector = GCTime()
    clients = [Client(factory, n, answered) for n in range(args.clients)]
    for client in clients:
        for _ in range(args.depth):
            client.send()
    await sleep(args.warmup)
    reactor_thread = str(os.getpid())
    rounds = []
    for _ in range(args.rounds):
        before, count, collected = thread_cpu(), answered[0], collector.seconds
        commits = getattr(store, "commits", 0)
        await sleep(args.seconds)
        after, count = thread_cpu(), answered[0] - count
        on_reactor = after[reactor_thread] - before[reactor_thread]
        elsewhere = sum(after[t] - before[t] for t in after if t in before and t != reactor_thread)
        commits = getattr(store, "commits", 0) - commits
        figures = (
            count / args.seconds,
            on_reactor / count * 1e6,
            elsewhere / count * 1e6,
            (collector.seconds - collected) / count * 1e6,
            count / commits if commits else float("nan"),
        )
        rounds.append(figures)
        print(
            "  {:,.0f}/s, reactor thread {:.1f} us (garbage collector {:.1f} us),"
            " other threads {:.1f} us per request".format(figures[0], figures[1], figures[3], figures[2])
            + (f"; {figures[4]:.1f} starts per commit" if commits else ""),
            flush=True,
        )
    for client in clients:
        client.stop()
    median = [statistics.median(r[i] for r in rounds) for i in range(5)]
    print(
        f"{args.store}, {args.clients} clients x {args.depth}: {median[0]:,.0f}/s, CPU per request"
        f" {median[1] + median[2]:.1f} us (reactor thread {median[1]:.1f}, of it garbage collector"
        f" {median[3]:.1f}; other threads {median[2]:.1f})"
        + (f"; {median[4]:.1f} starts per commit" if hasattr(store, "commits") else "")
    )
    await store.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--depth", type=int, default=1, help="requests each client keeps in flight")
    parser.add_argument("--seconds", type=float, default=2.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    txaio.use_twisted()

    def run():
        d = Deferred.fromCoroutine(measure(args))
        d.addErrback(lambda failure: failure.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()


if __name__ == "__main__":
    main()
