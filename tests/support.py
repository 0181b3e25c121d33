"""
Test support: the daemon's parts in process (semantics, no socket), a real
daemon on a loopback port and a real WebSocket client (what only the wire
shows).

Both run the run service on a L{Clock}, so tests move the grace window by
hand, while the sockets use the real reactor.
"""

import glob
import json
import os
import shutil
import tempfile

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.task import Clock, deferLater

from car_twisted.auth import HOST_TOKEN_FILE, SECRET_FILE, Authenticator, agent_token, new_token
from car_twisted.jsonrpc import Dispatcher
from car_twisted.limits import WireLimits
from car_twisted.protocol import RunTracingFactory
from car_twisted.store import naming
from car_twisted.store.memory import MemoryRunStore
from car_twisted.tap import assemble

SUCCESS_OUTCOME = {
    "status": "success",
    "summary": "did the thing",
    "evidence": [],
    "metrics": {
        "turns": 1,
        "tool_calls": 1,
        "duration_ms": 12.0,
        "retries": 0,
        "actions_succeeded": 1,
        "actions_failed": 0,
    },
    "timestamp": "2026-11-23T10:00:00.000Z",
}


async def wait_for(predicate, what="condition", timeout=10.0):
    """Wait (on the real reactor) until C{predicate()} is true."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.005, lambda: None)
        waited += 0.005


class ClientProtocol(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.frames.put(payload if isBinary else json.loads(payload))

    def onClose(self, wasClean, code, reason):
        self.close_code = code
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        self.closed.callback(code)


class RPCClient:
    """A JSON-RPC client over one real WebSocket connection."""

    def __init__(self, protocol):
        self.protocol = protocol
        self._ids = 0

    @classmethod
    async def connect(cls, port):
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}")
        factory.protocol = ClientProtocol
        factory.opened = Deferred()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        proto = await endpoint.connect(factory)
        proto.frames = DeferredQueue()
        proto.closed = Deferred()
        await factory.opened
        return cls(proto)

    def send_text(self, text):
        self.protocol.sendMessage(text.encode() if isinstance(text, str) else text)

    def send(self, message):
        self.send_text(json.dumps(message))

    def request(self, method, params=None, id_=None):
        """Send a request without waiting; returns its id."""
        if id_ is None:
            self._ids += 1
            id_ = self._ids
        message = {"jsonrpc": "2.0", "id": id_, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return id_

    def receive(self):
        """The next frame the daemon sent, decoded."""
        return self.protocol.frames.get()

    def unread(self):
        """The frames the daemon sent that were not received yet, decoded."""
        return list(self.protocol.frames.pending)

    async def call_raw(self, method, params=None):
        self.request(method, params)
        return await self.receive()

    async def call(self, method, params=None):
        response = await self.call_raw(method, params)
        assert "error" not in response, f"{method} should succeed: {response}"
        return response["result"]

    async def closed_by_daemon(self, timeout=5.0):
        """Wait until the daemon closes the connection: its close code."""
        await wait_for(lambda: self.protocol.closed.called, "the daemon to close the connection", timeout)
        return self.protocol.close_code

    async def close(self):
        """Close cleanly and wait until the connection is gone."""
        self.protocol.sendClose()
        await self.protocol.closed

    async def drop(self):
        """Cut the TCP connection without a close frame."""
        self.protocol.transport.abortConnection()
        await self.protocol.closed


class HeldStore:
    """
    Wraps a store so the named calls (by default its writes) wait until
    L{release}: a disk that is slow to answer. Held calls are applied in
    call order on release.
    """

    def __init__(self, store, *names):
        self._store = store
        self._names = names or ("start_run", "append_turns", "end_run")
        self.held = []

    def __getattr__(self, name):
        if name not in self._names:
            return getattr(self._store, name)

        def hold(*args):
            d = Deferred()
            self.held.append((d, name, args))
            return d

        return hold

    def release(self):
        held, self.held = self.held, []
        for d, name, args in held:
            getattr(self._store, name)(*args).chainDeferred(d)


class InProcessDaemon:
    """
    A daemon's parts wired as C{twistd car} wires them, on a memory store
    (or C{store}) and a L{Clock}, with no socket: each L{InProcessClient}
    hands its frames straight to the dispatcher, and a memory store
    answers at once, so semantics tests run without polling. Without an
    C{authenticator} every session is accepted (``--no-auth``). An
    C{exporter} is told of every run that ends, as ``--otlp-endpoint``'s.
    """

    def __init__(self, store=None, grace=0.25, environ=None, authenticator=None, limits=None, exporter=None):
        self.clock = Clock()
        self.store = store if store is not None else MemoryRunStore()
        self.limits = limits or WireLimits()
        self.authenticator = authenticator or Authenticator.disabled()
        self.parts = assemble(
            self.store,
            self.clock,
            self.authenticator,
            self.limits,
            grace,
            environ if environ is not None else {},
            exporter,
        )
        self.runs = self.parts.runs
        self.dispatcher = self.parts.dispatcher
        self.clients = []

    def session(self, notify=None):
        """A new session; C{notify(method, params)} receives its notifications."""
        return self.runs.open_session("in-process", notify or (lambda method, params: None))

    async def connect(self):
        client = InProcessClient(self)
        self.clients.append(client)
        return client

    def only_session(self):
        (session,) = self.runs.sessions.values()
        return session

    async def wait_closed(self):
        """Every client's close reached the run service as it happened."""
        assert not self.runs.sessions, self.runs.sessions

    async def stop(self):
        """
        Close every client, let every window run out, and check that no
        timer is left behind.
        """
        for client in self.clients:
            await client.drop()
        self.clock.advance(24 * 3600)
        assert not self.clock.getDelayedCalls(), self.clock.getDelayedCalls()


class InProcessClient(RPCClient):
    """
    L{RPCClient}'s calls on one session of an L{InProcessDaemon}: each frame
    goes to the dispatcher, each answer and notification comes back in the
    order it is ready, as the protocol would send them. When an answer says
    to close the connection (C{Reply.close_code}), the client records the
    code and closes: the run service hears it at once, and frames sent
    afterwards are not handled.
    """

    def __init__(self, daemon):
        super().__init__(None)
        self._daemon = daemon
        self._frames = DeferredQueue()
        self.closed = False
        #: The code the daemon closed this connection with, if it did.
        self.close_code = None
        self.session = daemon.runs.open_session("in-process", self._notify)

    def _notify(self, method, params):
        self._frames.put({"jsonrpc": "2.0", "method": method, "params": params})

    def send_text(self, text):
        if self.closed:
            return
        payload = text.encode() if isinstance(text, str) else text
        d = self._daemon.dispatcher.dispatch(self.session, payload)
        d.addCallback(self._answer)

    def _answer(self, reply):
        if self.closed:
            return
        if reply.frame is not None:
            self._frames.put(json.loads(reply.frame))
        if reply.close_code is not None:
            self.close_code = reply.close_code
            self._close()

    def receive(self):
        return self._frames.get()

    def unread(self):
        return list(self._frames.pending)

    async def closed_by_daemon(self, timeout=None):
        """
        The code the daemon closed this connection with; it must have by
        now, as nothing in process waits on a socket.
        """
        assert self.close_code is not None, "the daemon did not close the connection"
        return self.close_code

    def _close(self):
        if not self.closed:
            self.closed = True
            self._daemon.runs.close_session(self.session)

    async def close(self):
        """The connection closes: the run service hears it at once."""
        self._close()

    drop = close


class LoopbackDaemon(InProcessDaemon):
    """
    An L{InProcessDaemon} served on an ephemeral loopback port.

    C{extra_methods} (wire name -> method) stand in for methods the daemon
    does not have yet.
    """

    def __init__(self, store=None, grace=0.25, environ=None, authenticator=None, extra_methods=None, limits=None, exporter=None):
        super().__init__(store, grace, environ, authenticator, limits, exporter)
        self.factory = self.parts.factory
        if extra_methods:
            methods = {**self.parts.methods, **extra_methods}
            dispatcher = Dispatcher(methods, self.authenticator.admit, self.limits)
            self.factory = RunTracingFactory(
                dispatcher, self.runs, self.limits, self.clock, self.authenticator.enabled
            )
        self.port = None

    async def start(self):
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.port = await endpoint.listen(self.factory)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port.getHost().port}"

    async def connect(self):
        client = await RPCClient.connect(self.port.getHost().port)
        self.clients.append(client)
        return client

    async def wait_closed(self):
        """Wait until the daemon has seen every connection close."""
        await wait_for(lambda: not self.runs.sessions, "sessions to close")

    async def stop(self):
        """
        Drop every client, let every window run out, and check that no
        timer is left behind.
        """
        for client in self.clients:
            if not client.protocol.closed.called:
                await client.drop()
        await self.wait_closed()
        await self.port.stopListening()
        self.clock.advance(24 * 3600)
        assert not self.clock.getDelayedCalls(), self.clock.getDelayedCalls()


async def serve(testcase, **kwargs):
    """Start a L{LoopbackDaemon} that stops when C{testcase} ends."""
    daemon = await LoopbackDaemon(**kwargs).start()
    testcase.addCleanup(daemon.stop)
    return daemon


def in_process(testcase, **kwargs) -> InProcessDaemon:
    """An L{InProcessDaemon} that stops when C{testcase} ends."""
    daemon = InProcessDaemon(**kwargs)
    testcase.addCleanup(daemon.stop)
    return daemon


def private_dir(testcase) -> str:
    """A fresh temporary directory, removed when C{testcase} ends."""
    path = tempfile.mkdtemp(prefix="car-twisted-test-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class AuthDaemon:
    """
    A daemon with auth on, and its secrets: in process (L{in_process}) they
    are held in memory; on a loopback port (L{serve}) they are made in a
    private data directory, C{data_dir}, as C{twistd car} makes them.
    """

    def __init__(self, secret, host_token, data_dir=None):
        self.secret = secret
        self.host_token = host_token
        self.data_dir = data_dir
        self.authenticator = Authenticator(secret, host_token)
        self.daemon = None

    @classmethod
    def in_process(cls, testcase, **kwargs) -> "AuthDaemon":
        self = cls(new_token(), new_token())
        self.daemon = in_process(testcase, authenticator=self.authenticator, **kwargs)
        return self

    @classmethod
    async def serve(cls, testcase, **kwargs) -> "AuthDaemon":
        data_dir = private_dir(testcase)
        Authenticator.from_data_dir(data_dir, {})
        secret = _read(os.path.join(data_dir, SECRET_FILE))
        self = cls(secret, _read(os.path.join(data_dir, HOST_TOKEN_FILE)), data_dir)
        self.daemon = await serve(testcase, authenticator=self.authenticator, **kwargs)
        return self

    async def agent(self, agent_id):
        """A session bound to C{agent_id} through session.auth."""
        ws = await self.daemon.connect()
        await ws.call("session.auth", {"agent_id": agent_id, "token": agent_token(self.secret, agent_id)})
        return ws

    async def host(self):
        ws = await self.daemon.connect()
        await ws.call("session.auth", {"host_token": self.host_token})
        return ws

    async def start_run(self, agent_id, intent="do it"):
        ws = await self.agent(agent_id)
        return ws, (await ws.call("runs.start", {"intent": intent}))["run_id"]


def _read(path):
    with open(path) as f:
        return f.read().strip()


def run_file(store, run_id: str) -> str:
    """The path of a file-store run's file, whether the store holds the run in memory or not."""
    name = naming.encode_name(run_id) + naming.RUN_SUFFIX
    [path] = glob.glob(os.path.join(glob.escape(store.runs_dir), "*", name))
    return path
