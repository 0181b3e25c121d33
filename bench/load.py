"""
Load generator: C{--clients} WebSocket connections to a daemon on
127.0.0.1, each sending ``runs.start`` back to back (one in flight per
client). Prints one JSON line: acknowledged starts per second over the
measured window (after a warm-up), and errors seen.
"""

import argparse
import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint


class Meter:
    def __init__(self):
        self.measuring = False
        self.acks = 0
        self.errors = 0
        self.started_at = None
        self.stopped_at = None
        self.connections = []


class StartLoop(WebSocketClientProtocol):
    """Sends the next runs.start as soon as the last one is answered."""

    def onOpen(self):
        self.sent = 0
        self.factory.meter.connections.append(self)
        self._send()

    def _send(self):
        self.sent += 1
        self.sendMessage(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": self.sent,
                    "method": "runs.start",
                    "params": {"agent_id": self.factory.agent_id, "intent": "benchmark run"},
                }
            ).encode()
        )

    def onMessage(self, payload, isBinary):
        meter = self.factory.meter
        if meter.measuring:
            if "error" in json.loads(payload):
                meter.errors += 1
            else:
                meter.acks += 1
        if meter.stopped_at is None:
            self._send()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--agents", type=int, default=0, help="distinct agent ids (0: one per client)")
    args = parser.parse_args()
    meter = Meter()
    agents = args.agents or args.clients
    for n in range(args.clients):
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{args.port}")
        factory.protocol = StartLoop
        factory.meter = meter
        factory.agent_id = f"bench-agent-{n % agents}"
        TCP4ClientEndpoint(reactor, "127.0.0.1", args.port).connect(factory)

    def measure():
        meter.measuring = True
        meter.started_at = reactor.seconds()

    def stop():
        meter.measuring = False
        meter.stopped_at = reactor.seconds()
        for connection in meter.connections:
            connection.sendClose()
        reactor.callLater(0.5, reactor.stop)

    reactor.callLater(args.warmup, measure)
    reactor.callLater(args.warmup + args.seconds, stop)
    reactor.run()
    elapsed = meter.stopped_at - meter.started_at
    print(
        json.dumps(
            {
                "clients": args.clients,
                "connected": len(meter.connections),
                "acks": meter.acks,
                "errors": meter.errors,
                "seconds": round(elapsed, 3),
                "per_second": round(meter.acks / elapsed, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
