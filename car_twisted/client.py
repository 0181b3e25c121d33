"""
A JSON-RPC client for a running daemon, on Autobahn's Twisted WebSocket
client: what the ``car-twisted`` command and scripted agents use.
"""

import json
from typing import Callable, Optional

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

log = Logger()

DEFAULT_URL = "ws://127.0.0.1:9100"


class RemoteError(Exception):
    """The daemon answered a request with a JSON-RPC error."""

    def __init__(self, code, message):
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """The connection closed before the answer came."""

    def __init__(self, code, reason):
        super().__init__(f"connection closed (code {code}): {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


class _ClientProtocol(WebSocketClientProtocol):
    client = None

    def onOpen(self):
        self.client = DaemonClient(self)
        self.factory.opened.callback(self.client)

    def onMessage(self, payload, isBinary):
        if isBinary:
            log.warn("ignoring a binary frame from the daemon")
            return
        try:
            message = json.loads(payload)
        except ValueError:
            log.warn("ignoring a frame from the daemon that is not JSON")
            return
        for item in message if isinstance(message, list) else [message]:
            if isinstance(item, dict):
                self.client._received(item)

    def onClose(self, wasClean, code, reason):
        closed = ConnectionClosed(code, reason)
        if not self.factory.opened.called:
            self.factory.opened.errback(closed)
        if self.client is not None:
            self.client._closed(closed)


class DaemonClient:
    """
    One session with a daemon. Use L{connect}, then L{call}.

    @ivar on_notification: C{f(method, params)}, called for each
        notification the daemon pushes.
    """

    def __init__(self, protocol):
        self._protocol = protocol
        self._ids = 0
        self._pending = {}  # id -> Deferred
        self.on_notification: Callable[[str, dict], None] = lambda method, params: None
        self.closed = Deferred()

    @classmethod
    async def connect(cls, reactor, url: str, timeout: float = 10) -> "DaemonClient":
        """Open a session with the daemon at C{url} (``ws://`` or ``wss://``)."""
        try:
            factory = WebSocketClientFactory(url, reactor=reactor)
        except Exception as e:  # Autobahn reports a bad URL with a bare Exception.
            raise ValueError(f"{url!r} is not a ws:// or wss:// URL: {e}") from None
        factory.protocol = _ClientProtocol
        factory.opened = Deferred()
        endpoint = HostnameEndpoint(reactor, factory.host, factory.port, timeout=timeout)
        if factory.isSecure:
            try:
                from twisted.internet.ssl import optionsForClientTLS
            except ImportError:
                raise ValueError("wss:// needs TLS support: pip install 'twisted[tls]'") from None
            endpoint = wrapClientTLS(optionsForClientTLS(factory.host), endpoint)
        await endpoint.connect(factory)
        return await factory.opened

    def call(self, method: str, params: Optional[dict] = None) -> Deferred:
        """
        Send a request. The Deferred fires with its result, or fails with
        L{RemoteError} or L{ConnectionClosed}.
        """
        if self.closed.called:
            raise ConnectionClosed(None, "already closed")
        self._ids += 1
        message = {"jsonrpc": "2.0", "id": self._ids, "method": method}
        if params is not None:
            message["params"] = params
        answer = self._pending[self._ids] = Deferred()
        self._protocol.sendMessage(json.dumps(message).encode())
        return answer

    async def close(self) -> None:
        """Close the session and wait until the connection is gone."""
        if not self.closed.called:
            self._protocol.sendClose(1000)
            await self.closed

    def _received(self, message: dict) -> None:
        if "method" in message and "id" not in message:
            params = message.get("params")
            if isinstance(message["method"], str) and isinstance(params, dict):
                self.on_notification(message["method"], params)
            return
        id_ = message.get("id")
        answer = self._pending.pop(id_, None) if type(id_) is int else None
        if answer is None:
            return
        error = message.get("error")
        if isinstance(error, dict):
            answer.errback(RemoteError(error.get("code"), str(error.get("message", ""))))
        else:
            answer.callback(message.get("result"))

    def _closed(self, closed: ConnectionClosed) -> None:
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            answer.errback(closed)
        self.closed.callback(closed.code)
