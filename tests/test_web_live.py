"""``/ws`` on the HTTP port: the dashboard's read-only host session."""

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from car_twisted.auth import HOST_TOKEN_FILE, SECRET_FILE, agent_token
from car_twisted.web.login import COOKIE, cookie_value
from tests.support import ClientProtocol, RPCClient, private_dir
from tests.web_support import start_service


async def dashboard_socket(service, cookie: str) -> RPCClient:
    """A WebSocket to C{/ws} as the dashboard's own page opens it."""
    url = service.http_url.replace("http://", "ws://") + "/ws"
    factory = WebSocketClientFactory(
        url, origin=service.http_url, headers={"Cookie": f"{COOKIE.decode()}={cookie}"}
    )
    factory.protocol = ClientProtocol
    factory.opened = Deferred()
    port = int(service.http_url.rsplit(":", 1)[1])
    protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    protocol.frames = DeferredQueue()
    protocol.closed = Deferred()
    await factory.opened
    return RPCClient(protocol)


class LiveSocketTests(unittest.TestCase):
    async def start(self):
        data_dir = private_dir(self)
        service = await start_service(self, "--store", "memory", "--data-dir", data_dir)
        with open(f"{data_dir}/{HOST_TOKEN_FILE}") as f:
            cookie = cookie_value(f.read().strip())
        with open(f"{data_dir}/{SECRET_FILE}") as f:
            self.secret = f.read().strip()
        return service, await dashboard_socket(service, cookie)

    async def test_reads_every_agents_runs_as_the_host(self):
        """With the cookie, /ws is a host session: runs.list without an
        agent lists every agent's runs newest first, and a run's trace and
        live events are readable."""
        service, live = await self.start()
        agents, runs = [], []
        for agent_id in ("agent-a", "agent-b", "agent-a"):
            agent = await RPCClient.connect(service.port)
            await agent.call("session.auth", {"agent_id": agent_id, "token": agent_token(self.secret, agent_id)})
            runs.append((await agent.call("runs.start", {"intent": "x"}))["run_id"])
            agents.append(agent)
        listed = await live.call("runs.list", {})
        self.assertEqual([r["run_id"] for r in listed["runs"]], runs[::-1])
        self.assertIsNone(listed["agent_id"])
        only_b = await live.call("runs.list", {"agent_id": "agent-b"})
        self.assertEqual([r["run_id"] for r in only_b["runs"]], [runs[1]])
        trace = await live.call("runs.get_trace", {"run_id": runs[0]})
        self.assertEqual(trace["records"][0]["record"], "started")
        subscribed = await live.call("runs.subscribe", {"run_id": runs[2]})
        self.assertEqual((subscribed["status"], subscribed["cursor"]), ("in_progress", 0))
        await agents[2].call("runs.record_turns", {"run_id": runs[2], "turns": [{"prompt": "p"}]})
        event = (await live.receive())["params"]
        self.assertEqual((event["record"]["record"], event["cursor"]), ("turn", 1))
        await live.close()
        for agent in agents:
            await agent.close()

    async def test_only_reads(self):
        """The dashboard session cannot start, cancel or re-authenticate:
        those methods do not exist on /ws."""
        service, live = await self.start()
        for method, params in [
            ("runs.start", {"agent_id": "a", "intent": "x"}),
            ("runs.cancel", {"run_id": "r", "idempotency_key": "k"}),
            ("session.auth", {"host_token": "x"}),
        ]:
            answer = await live.call_raw(method, params)
            self.assertEqual(answer["error"]["code"], -32601, method)
        await live.close()
