"""
The physical limit the daemon is measured against: a plain Autobahn
WebSocket server on the same Twisted reactor that sends every text message
straight back. Same process model as the daemon (one process, the default
reactor), so the gap between the two is the daemon's own work.

    python bench/echo_server.py      # prints "echo listening on port N"
"""

import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


def main():
    factory = WebSocketServerFactory()
    factory.protocol = Echo
    factory.noisy = False
    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1:backlog=1024")

    def listening(port):
        print(f"echo listening on port {port.getHost().port}", flush=True)

    def failed(failure):
        print(failure.getTraceback(), file=sys.stderr, flush=True)
        reactor.stop()

    endpoint.listen(factory).addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
