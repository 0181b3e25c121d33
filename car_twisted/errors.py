"""
The JSON-RPC errors a method can answer with.

Each carries its wire code; the dispatcher turns them into error objects.
They live at the bottom of the import chain so the run service can raise them
without knowing about the dispatcher.
"""


class RPCError(Exception):
    """A method failed in a way the client should be told about."""

    code = -32603
    #: When set, the error object's C{data} member.
    data = None
    #: When set, the connection is closed with this WebSocket close code
    #: once the answer is sent.
    close_code = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(RPCError):
    code = -32600


class MethodNotFound(RPCError):
    code = -32601


class InvalidParams(RPCError):
    code = -32602


class RunRefused(RPCError):
    """The request was well formed but the run cannot take it (-32603)."""

    code = -32603


class StoreUnavailable(RPCError):
    """
    The run store cannot write (disk full, I/O error): nothing was recorded
    and the same request may be retried once the store writes again (-32603).
    """

    code = -32603

    def __init__(self, detail: str):
        super().__init__(
            f"the run store cannot write ({detail}); nothing was recorded, retry later"
        )
        self.data = {"reason": "store_unavailable", "detail": detail}


class AuthFailed(RPCError):
    """A session.auth token did not match (-32603)."""

    code = -32603


class AuthFailedTooOften(AuthFailed):
    """A session.auth token did not match, once too often: the connection is then closed."""

    close_code = 4001


class AuthRequired(RPCError):
    """The session must authenticate first; the connection is then closed."""

    code = -32001
    close_code = 4001


class ProtocolMismatch(RPCError):
    code = -32006


class CapabilityMismatch(RPCError):
    code = -32008
