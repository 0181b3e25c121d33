"""
The WebSocket side: one Autobahn protocol per session, handing each text
frame to the JSON-RPC dispatcher and sending back what it answers.
"""

from collections import deque

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted.jsonrpc import Dispatcher, encode, error_response, notification
from car_twisted.limits import WireLimits
from car_twisted.metrics import DaemonMetrics

log = Logger()

_BINARY_REFUSED = encode(
    error_response(
        None, -32600, "invalid request: binary frames are not accepted; send JSON-RPC as text"
    )
)


SHUTDOWN_REASON = "the daemon is shutting down"

#: Notification bytes a session may have waiting while its client does not
#: read; past it, the oldest waiting events are dropped, so the client gets
#: the newest and sees the cursor jump.
MAX_PENDING_EVENT_BYTES = 1024 * 1024


@implementer(IPushProducer)
class EventOutbox:
    """
    Pushes notifications to one client, holding them while the transport's
    buffer is full (it pauses us) and dropping them past a byte cap, so a
    client that stops reading cannot grow the daemon's memory.
    """

    def __init__(self, send, cap=MAX_PENDING_EVENT_BYTES, on_drop=lambda: None):
        self._send = send
        self._on_drop = on_drop
        self._cap = cap
        self._pending = deque()
        self._pending_bytes = 0
        self._paused = False
        self.dropped = 0

    def push(self, frame: bytes) -> None:
        if not self._paused:
            self._send(frame)
            return
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        while self._pending_bytes > self._cap:
            self._pending_bytes -= len(self._pending.popleft())
            self.dropped += 1
            self._on_drop()

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        while self._pending and not self._paused:
            frame = self._pending.popleft()
            self._pending_bytes -= len(frame)
            self._send(frame)

    def stopProducing(self):
        self._pending.clear()
        self._pending_bytes = 0


class RunTracingProtocol(WebSocketServerProtocol):
    """
    One client connection: a session of the run registry.

    At most C{max_in_flight} of its frames are being handled at once; the
    frames read past that wait here, in order, and the socket is not read
    until they are all handed on, so one client cannot monopolise the
    daemon.
    """

    session = None
    outbox = None
    #: Set once the daemon decided to close: later frames are not handled.
    closing = False
    #: Frames being handled (dispatched, not yet answered).
    in_flight = 0

    def onOpen(self):
        self._waiting = deque()
        self._reading_paused = False
        self._handing_on = False
        self._idle = []
        self.outbox = EventOutbox(self._send, on_drop=self.factory.metrics.events_dropped.inc)
        self.registerProducer(self.outbox, True)
        self.session = self.factory.registry.open_session(self.peer, self._notify)
        self.factory.connections.add(self)
        log.debug("session {client_id} opened from {peer}", client_id=self.session.client_id, peer=self.peer)
        if self.factory.stopping:
            self.stop_handling()
            self.going_away()

    def _send(self, frame):
        # Answers can be ready after the client has gone; they are dropped.
        if self.state == self.STATE_OPEN:
            self.sendMessage(frame)
            self.factory.metrics.frames_sent.inc()

    def _notify(self, method, params):
        frame = notification(method, params)
        if len(frame) > self.factory.limits.max_message_size:
            # Cannot be sent: counted as dropped, so the cursor jumps.
            self.outbox.dropped += 1
            self.factory.metrics.events_dropped.inc()
            return
        self.outbox.push(frame)

    def onMessage(self, payload, isBinary):
        self.factory.metrics.frames_received.inc()
        if self.closing:
            return
        if isBinary:
            self._send(_BINARY_REFUSED)
            return
        if self.in_flight >= self.factory.limits.max_in_flight:
            self._waiting.append(payload)
            if not self._reading_paused:
                self._reading_paused = True
                self.transport.pauseProducing()
            return
        self._dispatch(payload)

    def _dispatch(self, payload):
        self.in_flight += 1
        d = self.factory.dispatcher.dispatch(self.session, payload)
        d.addCallback(self._answer)
        d.addErrback(self._failed)
        d.addBoth(self._settled)

    def _settled(self, _):
        """A frame is answered: hand on waiting frames, then read again."""
        self.in_flight -= 1
        if self._handing_on:
            # A frame answered at once while the loop below hands on.
            return
        self._handing_on = True
        try:
            while self._waiting and self.in_flight < self.factory.limits.max_in_flight:
                self._dispatch(self._waiting.popleft())
        finally:
            self._handing_on = False
        if not self._waiting:
            self._resume_reading()
        if self.in_flight == 0:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _resume_reading(self):
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def stop_handling(self):
        """Handle no more frames: those waiting are dropped unanswered."""
        self.closing = True
        self._waiting.clear()
        # Read on, to see the close handshake through.
        self._resume_reading()

    def going_away(self):
        """Close with 1001, which Autobahn's C{sendClose} does not offer."""
        self.sendCloseFrame(self.CLOSE_STATUS_CODE_GOING_AWAY, SHUTDOWN_REASON.encode(), isReply=False)

    def settled(self) -> Deferred:
        """Fires once no frame of this session is being handled."""
        if self.in_flight == 0:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d

    def _answer(self, reply):
        if reply.close_code is not None:
            self.stop_handling()
        if reply.frame is not None:
            self._send(reply.frame)
        if reply.close_code is not None and self.state == self.STATE_OPEN:
            log.info(
                "closing session {client_id} from {peer}: {reason}",
                client_id=self.session.client_id,
                peer=self.peer,
                reason=reply.close_reason,
            )
            self.sendClose(reply.close_code, reply.close_reason[:120])

    def _failed(self, failure):
        log.failure("a frame from {peer} could not be answered", failure, peer=self.peer)
        self._send(
            encode(error_response(None, -32603, "internal error: the frame could not be answered"))
        )

    def failHandshake(self, reason, code=400, responseHeaders=None):
        if code == 503:
            self.factory.metrics.connections_refused.inc()
            log.warn(
                "refused a connection from {peer}: {count} connections are open, the limit is {limit}",
                peer=self.peer,
                count=self.factory.countConnections - 1,
                limit=self.factory.limits.max_connections,
            )
        super().failHandshake(reason, code, responseHeaders)

    def onClose(self, wasClean, code, reason):
        # Autobahn leaves its close-handshake timer pending when the TCP
        # connection goes before the peer's close frame comes.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        # Also called for connections that never finished the handshake,
        # which have no session.
        if self.session is not None:
            self._waiting.clear()
            self.factory.connections.discard(self)
            self.factory.registry.close_session(self.session)
            log.debug("session {client_id} closed", client_id=self.session.client_id)


class RunTracingFactory(WebSocketServerFactory):
    """
    Serves a L{RunRegistry} over WebSocket.

    Listen with any stream endpoint: C{endpoint.listen(RunTracingFactory(registry))}.
    C{limits} are the L{WireLimits} it enforces (the defaults when omitted);
    C{metrics} the L{DaemonMetrics} it counts frames and errors in.
    """

    protocol = RunTracingProtocol
    #: Set by L{stop_serving}: connections opened from now on are closed.
    stopping = False

    def __init__(self, registry, limits: WireLimits = WireLimits(), url=None, metrics=None):
        # The Server header names the software, never its version.
        super().__init__(url, server="car-twisted")
        self.setProtocolOptions(**limits.autobahn_options())
        self.noisy = False
        self.limits = limits
        self.registry = registry
        self.metrics = metrics if metrics is not None else DaemonMetrics()
        #: The open connections (their protocols).
        self.connections = set()
        self.dispatcher = Dispatcher(
            registry.methods(), registry.authenticator.admit, limits, self.metrics.error
        )

    def stop_serving(self) -> Deferred:
        """
        Handle no more frames, let every frame in flight be answered, then
        close every connection with 1001 (going away). Fires once they are
        closed (at most the close handshake timeout later). Stop listening
        first so no connection is accepted meanwhile.
        """
        return Deferred.fromCoroutine(self._stop_serving())

    async def _stop_serving(self):
        self.stopping = True
        connections = list(self.connections)
        for connection in connections:
            connection.stop_handling()
        await gatherResults([c.settled() for c in connections])
        for connection in connections:
            connection.going_away()
        await gatherResults([c.is_closed for c in connections])
