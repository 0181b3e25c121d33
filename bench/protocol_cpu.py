"""
The daemon's own CPU per message without sockets, kernel or load generator:
frames fed straight to the real protocols over a StringTransport, the
daemon's (memory store, no auth) against a plain Autobahn echo protocol,
rounds taking turns; process CPU time per message. What is left after the
echo's cost is the daemon's own work, with none of the noise of a shared
machine's scheduler, so it shows small changes that bench/run.py cannot.

    .venv/bin/python bench/protocol_cpu.py                # one request per read
    .venv/bin/python bench/protocol_cpu.py --batch 100    # 100 frames per read (pipelined)
    .venv/bin/python bench/protocol_cpu.py --profile 30   # and a cProfile of each, top 30
"""

import argparse
import cProfile
import pstats
import statistics
import time

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from car_twisted.auth import Authenticator
from car_twisted.store.memory import MemoryRunStore
from car_twisted.tap import assemble

_HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


def text_frame(payload: bytes) -> bytes:
    """A client text frame under 126 bytes, masked with the zero key."""
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def connect(factory):
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(_HANDSHAKE)
    if b" 101 " not in transport.value():
        raise RuntimeError(f"handshake refused: {transport.value()[:80]!r}")
    transport.clear()
    return protocol, transport


def round_us(connection, count: int, batch: int, first_id: int) -> float:
    """CPU microseconds per runs.start, C{batch} frames per read."""
    protocol, transport = connection
    reads = [
        b"".join(
            text_frame(
                b'{"jsonrpc":"2.0","id":%d,"method":"runs.start",'
                b'"params":{"agent_id":"bench-agent-%d","intent":"benchmark run"}}' % (first_id + n, n % 50)
            )
            for n in range(start, start + batch)
        )
        for start in range(0, count, batch)
    ]
    began = time.process_time()
    for data in reads:
        protocol.dataReceived(data)
        transport.clear()
    return (time.process_time() - began) / count * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="frames per read")
    parser.add_argument("--count", type=int, default=20000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=int, metavar="N", help="also print each side's top N functions")
    args = parser.parse_args()
    clock = Clock()
    txaio.use_twisted()
    txaio.config.loop = clock
    echo = WebSocketServerFactory(reactor=clock)
    echo.protocol = Echo
    sides = {
        "echo": connect(echo),
        "daemon": connect(assemble(MemoryRunStore(), clock, Authenticator.disabled()).factory),
    }
    rounds = {name: [] for name in sides}
    sent = 0
    for n in range(args.rounds + 1):
        for name, connection in sides.items():
            result = round_us(connection, args.count, args.batch, sent)
            sent += args.count
            if n:  # the first round warms up
                rounds[name].append(result)
    echo_us, daemon_us = (statistics.median(rounds[name]) for name in ("echo", "daemon"))
    print(
        f"{args.batch} frame(s) per read: echo {echo_us:.1f} us, daemon {daemon_us:.1f} us per message;"
        f" the daemon's own work {daemon_us - echo_us:.1f} us"
        f" (daemon rounds {', '.join(f'{r:.1f}' for r in rounds['daemon'])})"
    )
    if args.profile:
        for name, connection in sides.items():
            profile = cProfile.Profile(time.process_time)
            profile.runcall(round_us, connection, args.count, args.batch, sent)
            sent += args.count
            print(f"--- {name}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
