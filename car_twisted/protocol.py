"""
The WebSocket side: one Autobahn protocol per session, handing each text
frame to the JSON-RPC dispatcher and sending back what it answers.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger

from car_twisted import __version__
from car_twisted.jsonrpc import Dispatcher, encode, error_response, notification

log = Logger()

_BINARY_REFUSED = encode(
    error_response(
        None, -32600, "invalid request: binary frames are not accepted; send JSON-RPC as text"
    )
)


class RunTracingProtocol(WebSocketServerProtocol):
    """One client connection: a session of the run registry."""

    session = None
    #: Set once the daemon decided to close: later frames are not handled.
    closing = False

    def onOpen(self):
        self.session = self.factory.registry.open_session(self.peer, self._notify)
        log.debug("session {client_id} opened from {peer}", client_id=self.session.client_id, peer=self.peer)

    def _notify(self, method, params):
        self.sendMessage(notification(method, params))

    def onMessage(self, payload, isBinary):
        if self.closing:
            return
        if isBinary:
            self.sendMessage(_BINARY_REFUSED)
            return
        d = self.factory.dispatcher.dispatch(self.session, payload)
        d.addCallback(self._answer)
        d.addErrback(self._failed)

    def _answer(self, reply):
        if reply.close_code is not None:
            self.closing = True
        if self.state != self.STATE_OPEN:
            # The connection went away while the answer was being made.
            return
        if reply.frame is not None:
            self.sendMessage(reply.frame)
        if reply.close_code is not None:
            log.info(
                "closing session {client_id} from {peer}: {reason}",
                client_id=self.session.client_id,
                peer=self.peer,
                reason=reply.close_reason,
            )
            self.sendClose(reply.close_code, reply.close_reason[:120])

    def _failed(self, failure):
        log.failure("a frame from {peer} could not be answered", failure, peer=self.peer)
        if self.state != self.STATE_OPEN:
            return
        self.sendMessage(
            encode(error_response(None, -32603, "internal error: the frame could not be answered"))
        )

    def onClose(self, wasClean, code, reason):
        # Also called for connections that never finished the handshake,
        # which have no session.
        if self.session is not None:
            self.factory.registry.close_session(self.session)
            log.debug("session {client_id} closed", client_id=self.session.client_id)


class RunTracingFactory(WebSocketServerFactory):
    """
    Serves a L{RunRegistry} over WebSocket.

    Listen with any stream endpoint: C{endpoint.listen(RunTracingFactory(registry))}.
    """

    protocol = RunTracingProtocol

    def __init__(self, registry, url=None):
        super().__init__(url, server=f"car-twisted/{__version__}")
        self.registry = registry
        self.dispatcher = Dispatcher(registry.methods(), registry.authenticator.admit)
