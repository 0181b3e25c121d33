"""
Test support for the HTTP side: plain HTTP requests to a daemon's dashboard
port, and the daemon service started in this process.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from car_twisted.service import DaemonService
from car_twisted.tap import Options, build_daemon
from tests.support import wait_for


async def get(url: str, headers: dict = None):
    """C{(status code, response headers, body)} of a GET."""
    response = await Agent(reactor).request(
        b"GET",
        url.encode(),
        Headers({name: [value] for name, value in (headers or {}).items()}),
    )
    return response.code, response.headers, await readBody(response)


def upgrade_headers(origin: str = None, cookie: str = None) -> dict:
    """The headers of a browser's WebSocket upgrade request."""
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    if origin is not None:
        headers["Origin"] = origin
    if cookie is not None:
        headers["Cookie"] = cookie
    return headers


async def start_service(testcase, *argv, environ=None) -> DaemonService:
    """
    A daemon service on ephemeral loopback ports (WebSocket and HTTP),
    stopped when C{testcase} ends. C{service.http_url} is its HTTP side.
    """
    options = Options()
    options.parseOptions(
        ["--listen", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1", *argv]
    )
    service = build_daemon(options, reactor, environ or {})
    service.startService()
    testcase.addCleanup(lambda: service.running and service.stopService())
    # The WebSocket port first, the HTTP port last.
    ports = await service.ready
    service.port = ports[0].getHost().port
    service.http_url = f"http://127.0.0.1:{ports[-1].getHost().port}"
    return service


class RawHTTP(Protocol):
    """Sends one request and collects what comes back until the close."""

    def __init__(self, request: bytes):
        self.request = request
        self.received = b""
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


async def raw_http(port: int, request: bytes, until_close: bool = True) -> bytes:
    """
    What C{port} answers C{request} with, sent as is: up to the close, or
    with C{until_close} false up to the end of the response's headers.
    """
    protocol = RawHTTP(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    if until_close:
        return await protocol.done
    await wait_for(lambda: b"\r\n\r\n" in protocol.received, "the HTTP response")
    protocol.transport.loseConnection()
    await protocol.done
    return protocol.received
