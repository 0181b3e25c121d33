"""
The WebSocket side: one Autobahn protocol per session, handing each text
frame to the JSON-RPC dispatcher and sending back what it answers.
"""

from collections import deque

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted.errors import AuthRequired
from car_twisted.jsonrpc import Dispatcher, Reply, encode, error_response, notification
from car_twisted.limits import WireLimits
from car_twisted.metrics import DaemonMetrics

log = Logger()

_BINARY_REFUSED = encode(
    error_response(
        None, -32600, "invalid request: binary frames are not accepted; send JSON-RPC as text"
    )
)


SHUTDOWN_REASON = "the daemon is shutting down"

#: Event bytes a session may have unsent (waiting in the daemon or in its
#: transport) while its client does not read; past it, the oldest waiting
#: events are dropped, so the client gets the newest and sees the cursor jump.
MAX_PENDING_EVENT_BYTES = 1024 * 1024

#: What a transport holds before it pauses its producer, for transports that
#: do not say (Twisted's socket transports say: C{bufferSize}).
TRANSPORT_HIGH_WATER = 64 * 1024

#: An empty queue, until a frame has to wait (a deque costs 0.7 KiB).
_NOTHING_WAITING = ()


@implementer(IPushProducer)
class Outbox:
    """
    Everything the daemon sends one client (answers and events), in order.

    Frames go straight to the transport while it takes them. Once its buffer
    passes its high-water mark it pauses us and frames wait here until it
    has sent everything and resumes us. Waiting events past C{event_cap}
    bytes, counting what the transport holds, are dropped oldest first;
    answers are never dropped: the protocol stops reading a client whose
    unsent bytes pass its cap (L{over}).

    What the transport holds is known without looking inside it: the bytes
    handed to it since it last drained (it resumes us only once empty), and
    at most its high-water mark while it has not paused us.
    """

    def __init__(
        self,
        write,
        high_water,
        event_cap=MAX_PENDING_EVENT_BYTES,
        drained=lambda: None,
        on_drop=lambda: None,
    ):
        self._write = write
        self._on_drop = on_drop
        self._high_water = high_water
        self._event_cap = event_cap
        self._drained = drained
        # (sequence, frame), oldest first; made when a frame first waits, as
        # most sessions never have one waiting.
        self._answers = self._events = _NOTHING_WAITING
        self._sequence = 0
        self._answer_bytes = 0
        self._event_bytes = 0
        self._written = 0
        self._paused = False
        #: Events not delivered (dropped here or too large to send).
        self.dropped = 0

    @property
    def in_transport(self) -> int:
        """At most the bytes the transport holds unsent."""
        return self._written if self._paused else min(self._written, self._high_water)

    @property
    def waiting_bytes(self) -> int:
        """Bytes of the frames waiting here for the transport."""
        return self._answer_bytes + self._event_bytes

    @property
    def unsent_bytes(self) -> int:
        """Bytes handed to us and not yet sent: waiting here or in the transport."""
        return self.waiting_bytes + self.in_transport

    def over(self, cap: int) -> bool:
        """Whether the transport is full and more than C{cap} bytes are unsent."""
        return self._paused and self.unsent_bytes > cap

    def answer(self, frame: bytes) -> None:
        if not self._paused:
            self._written += len(frame)
            self._write(frame)
            return
        if self._answers is _NOTHING_WAITING:
            self._answers = deque()
        self._answers.append((self._next_sequence(), frame))
        self._answer_bytes += len(frame)

    def event(self, frame: bytes) -> None:
        if not self._paused:
            self._hand(frame)
            return
        if self._events is _NOTHING_WAITING:
            self._events = deque()
        self._events.append((self._next_sequence(), frame))
        self._event_bytes += len(frame)
        while self._events and self._event_bytes + self.in_transport > self._event_cap:
            self._event_bytes -= len(self._events.popleft()[1])
            self.dropped += 1
            self._on_drop()

    def flush(self) -> None:
        """
        Hand every waiting frame to the transport now, paused or not: the
        session is closing and its close frame must follow them. They are
        already counted against the session's caps, and the close
        handshake timeout drops a client that does not take them.
        """
        while self._answers or self._events:
            self._hand(self._pop_oldest())

    def _pop_oldest(self) -> bytes:
        if self._events and (not self._answers or self._events[0][0] < self._answers[0][0]):
            frame = self._events.popleft()[1]
            self._event_bytes -= len(frame)
        else:
            frame = self._answers.popleft()[1]
            self._answer_bytes -= len(frame)
        return frame

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def _hand(self, frame: bytes) -> None:
        self._written += len(frame)
        # The transport may pause us from inside this write.
        self._write(frame)

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        # The transport has sent everything it held.
        self._paused = False
        self._written = 0
        while not self._paused and (self._answers or self._events):
            self._hand(self._pop_oldest())
        self._drained()

    def stopProducing(self):
        self._answers = self._events = _NOTHING_WAITING
        self._answer_bytes = self._event_bytes = 0


class RunTracingProtocol(WebSocketServerProtocol):
    """
    One client connection: a session of the run service.

    At most C{max_in_flight} of its frames are being handled at once, and
    none is handed on while more than C{max_unsent_bytes} of what it was
    sent wait unread; the frames read past that wait here, in order, and the
    socket is not read until they are all handed on, so one client cannot
    monopolise the daemon nor grow its memory.

    With auth on, a session that has not authenticated C{auth_timeout}
    seconds after the upgrade is closed with 4001.
    """

    session = None
    #: Set once the daemon decided to close: later frames are not handled.
    closing = False
    #: Frames being handled (dispatched, not yet answered).
    in_flight = 0
    _auth_deadline = None
    _outbox = None
    #: Frames read and not yet handed on, oldest first (a deque once one waits).
    _waiting = None

    def onOpen(self):
        self._reading_paused = False
        self._handing_on = False
        self._idle = []
        self.session = self.factory.runs.open_session(self.peer, self._notify)
        self.factory.connections.add(self)
        if self.factory.auth_required:
            self._auth_deadline = self.factory.clock.callLater(
                self.factory.limits.auth_timeout, self._auth_timed_out
            )
        if self.factory.stopping:
            self.stop_handling()
            self.going_away()

    @property
    def outbox(self) -> Outbox:
        """
        What the daemon sends this client, made and registered as the
        transport's producer on first use: an idle session costs neither.
        """
        if self._outbox is None:
            self._outbox = Outbox(
                self._write,
                getattr(self.transport, "bufferSize", TRANSPORT_HIGH_WATER),
                drained=self._hand_on,
                on_drop=self.factory.metrics.events_dropped.inc,
            )
            self.registerProducer(self._outbox, True)
        return self._outbox

    def _write(self, frame):
        # Answers can be ready after the client has gone; they are dropped.
        if self.state == self.STATE_OPEN:
            self.sendMessage(frame)
            self.factory.metrics.frames_sent += 1

    def _notify(self, method, params):
        frame = notification(method, params)
        if len(frame) > self.factory.limits.max_message_size:
            # Cannot be sent: counted as dropped, so the cursor jumps.
            self.outbox.dropped += 1
            self.factory.metrics.events_dropped.inc()
            return
        self.outbox.event(frame)

    def onMessage(self, payload, isBinary):
        self.factory.metrics.frames_received += 1
        if self.closing:
            return
        if isBinary:
            self.outbox.answer(_BINARY_REFUSED)
            return
        if self._waiting or not self._may_dispatch():
            if self._waiting is None:
                self._waiting = deque()
            self._waiting.append(payload)
            if not self._reading_paused:
                self._reading_paused = True
                self.transport.pauseProducing()
            return
        self._dispatch(payload)

    def _may_dispatch(self) -> bool:
        limits = self.factory.limits
        return self.in_flight < limits.max_in_flight and not self.outbox.over(limits.max_unsent_bytes)

    def _dispatch(self, payload):
        self.in_flight += 1
        try:
            reply = self.factory.dispatcher.answer(self.session, payload)
            if type(reply) is not Reply:
                reply.addCallback(self._answer)
                reply.addErrback(self._failed)
                reply.addBoth(self._settled)
                return
            # Answered in this call: no Deferred on the way.
            self._answer(reply)
        except Exception:
            self._failed(Failure())
        self._settled(None)

    def _settled(self, _):
        """A frame is answered: hand on waiting frames, then read again."""
        self.in_flight -= 1
        if self._handing_on:
            # A frame answered at once while L{_hand_on} hands on.
            return
        if self._waiting:
            # Reading is paused only while frames wait.
            self._hand_on()
        if self.in_flight == 0 and self._idle:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _hand_on(self):
        """Dispatch the waiting frames the caps allow; read again once none wait."""
        if self._handing_on:
            return
        self._handing_on = True
        try:
            while self._waiting and self._may_dispatch():
                self._dispatch(self._waiting.popleft())
        finally:
            self._handing_on = False
        if not self._waiting:
            self._resume_reading()

    def _resume_reading(self):
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def stop_handling(self):
        """Handle no more frames: those waiting are dropped unanswered."""
        self.closing = True
        self._waiting = None
        # Read on, to see the close handshake through.
        self._resume_reading()

    def going_away(self):
        """Close with 1001, which Autobahn's C{sendClose} does not offer."""
        self.outbox.flush()
        self.sendCloseFrame(self.CLOSE_STATUS_CODE_GOING_AWAY, SHUTDOWN_REASON.encode(), isReply=False)

    def settled(self) -> Deferred:
        """Fires once no frame of this session is being handled."""
        if self.in_flight == 0:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d

    def _answer(self, reply):
        if reply.frame is not None:
            self.outbox.answer(reply.frame)
        if reply.close_code is not None:
            self._close(reply.close_code, reply.close_reason)
        elif self._auth_deadline is not None and self.session.authenticated:
            self._cancel_auth_deadline()

    def _close(self, code, reason):
        """Handle no more frames and close with C{code}, after what was sent."""
        self.stop_handling()
        self.outbox.flush()
        if self.state == self.STATE_OPEN:
            log.info(
                "closing session {client_id} from {peer}: {reason}",
                client_id=self.session.client_id,
                peer=self.peer,
                reason=reason,
            )
            self.sendClose(code, reason[:120])

    def _auth_timed_out(self):
        self._auth_deadline = None
        self._close(
            AuthRequired.close_code,
            f"auth timeout: no session.auth within {self.factory.limits.auth_timeout:g} s of connecting",
        )

    def _cancel_auth_deadline(self):
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
            self._auth_deadline = None

    def _failed(self, failure):
        log.failure("a frame from {peer} could not be answered", failure, peer=self.peer)
        self.outbox.answer(
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
        self._cancel_auth_deadline()
        if self.session is not None:
            self._waiting = None
            self.factory.connections.discard(self)
            self.factory.runs.close_session(self.session)


class RunTracingFactory(WebSocketServerFactory):
    """
    Serves JSON-RPC over WebSocket: each connection is a session of C{runs}
    (the L{RunService}) whose frames C{dispatcher} answers.

    Listen with any stream endpoint: C{endpoint.listen(factory)}. C{limits}
    are the L{WireLimits} it enforces (the defaults when omitted); C{clock}
    (an L{IReactorTime}) runs its timers, Autobahn's and the auth deadline,
    which applies when C{auth_required}. C{metrics} is the
    L{DaemonMetrics} it counts frames, dropped events and refusals in.
    """

    protocol = RunTracingProtocol
    #: Set by L{stop_serving}: connections opened from now on are closed.
    stopping = False

    def __init__(
        self,
        dispatcher: Dispatcher,
        runs,
        limits: WireLimits = WireLimits(),
        clock=None,
        auth_required: bool = False,
        url=None,
        metrics=None,
    ):
        # The Server header names the software, never its version.
        super().__init__(url, server="car-twisted", reactor=clock)
        #: Schedules the auth deadline: C{clock}, else Autobahn's reactor.
        self.clock = self.reactor
        self.setProtocolOptions(**limits.autobahn_options())
        self.noisy = False
        self.limits = limits
        self.dispatcher = dispatcher
        self.runs = runs
        self.auth_required = auth_required
        self.metrics = metrics if metrics is not None else DaemonMetrics()
        #: The open connections (their protocols).
        self.connections = set()

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
