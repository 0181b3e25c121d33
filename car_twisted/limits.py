"""
The daemon's limits, in one place.

L{WireLimits} holds every bound the network side enforces that an option
can set: the WebSocket settings handed to Autobahn and the JSON-RPC input
limits the dispatcher checks. ``twistd car`` builds one from its options;
embedders build their own. The constants below it are the protocol's
fixed limits (``docs/protocol.md``). ``docs/hardening.md`` says what a
client sees at each limit.
"""

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class WireLimits:
    #: Largest WebSocket frame and message payload, in bytes, either way:
    #: a bigger incoming one closes that connection with 1009, and no answer
    #: the daemon sends is bigger (see docs/hardening.md).
    max_message_size: int = MIB
    #: Seconds between keepalive pings; 0 turns them off.
    auto_ping_interval: float = 30.0
    #: Seconds a peer may stay silent after a ping before it is dropped.
    auto_ping_timeout: float = 90.0
    #: Seconds a client has to finish the HTTP upgrade.
    open_handshake_timeout: float = 5.0
    #: Seconds to wait for the peer's close frame after ours.
    close_handshake_timeout: float = 2.0
    #: Open connections past which new ones are refused with HTTP 503.
    max_connections: int = 10_000
    #: Requests in one JSON-RPC batch.
    max_batch: int = 100
    #: Nesting of arrays and objects in one frame (a batch counts as one).
    max_depth: int = 32
    #: Frames of one session handled at once; past it the daemon stops
    #: reading that client's socket until answers drain.
    max_in_flight: int = 64
    #: Bytes of one session's answers and events not yet sent (waiting in the
    #: daemon or in its transport) past which the daemon stops reading that
    #: client's socket until they drain.
    max_unsent_bytes: int = 4 * MIB
    #: Seconds a session has, with auth on, from the WebSocket upgrade to a
    #: successful session.auth; then it is closed with 4001.
    auth_timeout: float = 10.0

    def autobahn_options(self) -> dict:
        """The keyword arguments for Autobahn's C{setProtocolOptions}."""
        return {
            "maxFramePayloadSize": self.max_message_size,
            "maxMessagePayloadSize": self.max_message_size,
            "autoPingInterval": self.auto_ping_interval,
            "autoPingTimeout": self.auto_ping_timeout,
            "openHandshakeTimeout": self.open_handshake_timeout,
            "closeHandshakeTimeout": self.close_handshake_timeout,
            "maxConnections": self.max_connections,
            # A close frame with the code (1009, 1007...) rather than a bare
            # TCP drop, so the client learns why.
            "failByDrop": False,
            # Not a web server: no HTML status page for plain HTTP requests.
            "webStatus": False,
            # Clients are agents and tools, not browsers; an Origin header
            # is not checked, but the sandboxed-page origin "null" is refused.
            "allowedOrigins": ["*"],
            "allowNullOrigin": False,
            "utf8validateIncoming": True,
            "requireMaskedClientFrames": True,
            "perMessageCompressionAccept": _refuse_compression,
        }


def _refuse_compression(offers):
    """
    No permessage-deflate: a small compressed frame could inflate past
    the message limit before the limit is checked.
    """
    return None


#: Bytes of an HTTP request body on the dashboard port (the login form's
#: is the only one it reads); past it the request is answered 413 and the
#: connection closed, before the rest is read.
MAX_HTTP_BODY = 4096

#: Plain HTTP connections the dashboard port holds at once (a /ws session
#: is no longer one once upgraded: the WebSocket caps count it); past it a
#: new one is answered 503 and closed.
MAX_HTTP_CONNECTIONS = 128
#: Seconds an HTTP connection of the dashboard port may stay idle.
HTTP_IDLE_TIMEOUT = 60

#: Longest JSON-RPC request id the daemon reads; a longer one is answered
#: with id null.
MAX_ID_CHARS = 256
#: Longest id (agent, run, idempotency key) accepted in params.
MAX_ID = 256
#: Longest text kept in one field; longer text is cut with a visible marker.
MAX_TEXT = 16 * 1024
#: Turns in one runs.record_turns call, turns in one run, and the encoded
#: size of one turn record.
MAX_TURNS_PER_CALL = 256
MAX_TURNS_PER_RUN = 2000
MAX_TURN_BYTES = 256 * 1024
#: How many runs one session may follow live at once.
MAX_FOLLOWED = 100
#: Record bytes in one runs.get_trace page or runs.subscribe snapshot: with
#: its envelope it fits the smallest message limit (512 KiB), and every
#: record (at most 256 KiB) fits in it.
PAGE_BYTES = 384 * 1024
