"""
``/ws``: the dashboard's live data, a WebSocket on the HTTP port speaking
the daemon's own JSON-RPC, limited to the ``runs.*`` reads.

The upgrade is refused before any WebSocket is made unless the request
carries the login cookie (401) and comes from a page of this origin (403):
a page elsewhere cannot open it with the browser's cookie. A session that
gets through is the host, which reads every agent's runs and writes none.
"""

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource

from car_twisted.protocol import RunTracingFactory, RunTracingProtocol

#: The methods a dashboard session may call.
READ_METHODS = frozenset(
    {"server.handshake", "runs.list", "runs.get_trace", "runs.subscribe", "runs.unsubscribe"}
)


class DashboardProtocol(RunTracingProtocol):
    def onOpen(self):
        # The connection was taken over from twisted.web, whose HTTP channel
        # is still the transport's producer; the session's outbox replaces it.
        self.transport.unregisterProducer()
        super().onOpen()
        # The login cookie was checked before the upgrade.
        self.session.role = "host"
        self.session.authenticated = True


class DashboardFactory(RunTracingFactory):
    """
    L{RunTracingFactory} whose sessions are the host; give it a dispatcher
    of the L{READ_METHODS} only (L{read_methods}).
    """

    protocol = DashboardProtocol


def read_methods(methods: dict) -> dict:
    """The part of a daemon's method table a dashboard session may call."""
    return {name: method for name, method in methods.items() if name in READ_METHODS}


class LiveSocket(Resource):
    """C{/ws}: the cookie and same-origin checks, then the WebSocket."""

    isLeaf = True

    def __init__(self, login, factory: DashboardFactory):
        super().__init__()
        self._login = login
        self._websocket = WebSocketResource(factory)

    def render(self, request):
        if not self._login.admitted(request):
            request.setResponseCode(401)
            return b"log in first: /login\n"
        if not same_origin(request):
            request.setResponseCode(403)
            return b"the WebSocket is open to this dashboard's own pages only\n"
        return self._websocket.render(request)


def same_origin(request) -> bool:
    """Whether the request's Origin is the origin it was sent to."""
    origin = request.getHeader(b"Origin")
    host = request.getHeader(b"Host")
    if origin is None or host is None:
        return False
    scheme = b"https://" if request.isSecure() else b"http://"
    return origin.lower() == scheme + host.lower()
