"""
The HTTP side's resource tree: which path serves what.
"""

from io import BytesIO

from twisted.internet.protocol import Protocol
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from car_twisted import limits
from car_twisted.web.health import Health, Metrics
from car_twisted.web.live import LiveSocket
from car_twisted.web.login import Login
from car_twisted.web.pages import Assets, Page, RunPages, asset

ASSETS = ("dashboard.css", "favicon.svg", "rpc.js", "runs.js", "run.js")


_TOO_LARGE = b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class DashboardRequest(Request):
    """
    A request whose body may be at most L{limits.MAX_HTTP_BODY} bytes,
    declared or chunked: past it, 413 and the connection closed, the rest
    unread.
    """

    _body_bytes = 0
    _refused = False

    def gotLength(self, length):
        self.content = BytesIO()  # never a temporary file: the body is small
        if length is not None and length > limits.MAX_HTTP_BODY:
            self._refuse()

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > limits.MAX_HTTP_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self):
        self._refused = True
        self.channel.transport.write(_TOO_LARGE)
        self.channel.transport.loseConnection()


class DashboardChannel(HTTPChannel):
    """An HTTP connection of the dashboard port, counted by its site."""

    def connectionLost(self, reason):
        self.site.channels.discard(self)
        super().connectionLost(reason)


class _Busy(Protocol):
    """A connection past the cap: 503, then closed."""

    def connectionMade(self):
        self.transport.write(_BUSY)
        self.transport.loseConnection()


class DashboardSite(Site):
    """
    A L{Site} that shows no tracebacks, keeps no access log, reads no large
    request bodies, holds at most L{limits.MAX_HTTP_CONNECTIONS} connections
    and closes one idle for L{limits.HTTP_IDLE_TIMEOUT} seconds.
    """

    displayTracebacks = False
    requestFactory = DashboardRequest
    protocol = DashboardChannel

    def __init__(self, resource, **kwargs):
        super().__init__(resource, timeout=limits.HTTP_IDLE_TIMEOUT, **kwargs)
        #: The open connections still speaking HTTP.
        self.channels = set()

    def buildProtocol(self, addr):
        # A connection /ws upgraded is the WebSocket's now (its transport
        # taken over): no longer counted here.
        self.channels = {channel for channel in self.channels if channel.transport is not None}
        if len(self.channels) >= limits.MAX_HTTP_CONNECTIONS:
            return _Busy()
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        return channel

    def log(self, request):
        """Nothing: a ``/login`` URL carries the host token."""


def dashboard_site(login, health, metrics, live_factory) -> DashboardSite:
    """
    C{/} the runs page, C{/runs/<run_id>} a run's page, C{/login},
    C{/static/...}, C{/ws} (served by C{live_factory}), C{/healthz},
    C{/metrics}.
    """
    root = Page(login, asset("runs.html"))
    root.isLeaf = False
    root.putChild(b"", root)
    root.putChild(b"runs", RunPages(Page(login, asset("run.html"))))
    root.putChild(b"login", Login(login))
    root.putChild(b"static", Assets(ASSETS))
    root.putChild(b"ws", LiveSocket(login, live_factory))
    root.putChild(b"healthz", Health(health))
    root.putChild(b"metrics", Metrics(metrics))
    return DashboardSite(root)
