"""
The WebSocket limits on a real loopback daemon: message size, keepalive,
the connection cap, and what plain HTTP gets.
"""

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from car_twisted.limits import MIB, WireLimits
from tests.support import InProcessDaemon, serve, wait_for
from tests.web_support import raw_http


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class MessageSizeTests(unittest.TestCase):
    async def test_oversized_frame_closes_that_session_with_1009(self):
        """A frame over the message limit closes its connection with 1009;
        another session keeps working."""
        daemon = await serve(self)
        bystander = await daemon.connect()
        sender = await daemon.connect()
        sender.send_text(b'"' + b"x" * MIB + b'"')
        self.assertEqual(await sender.closed_by_daemon(), 1009)
        started = await bystander.call("runs.start", {"agent_id": "a", "intent": "still here"})
        self.assertEqual(started["agent_id"], "a")

    async def test_oversized_fragmented_message_closes_with_1009(self):
        """A message over the limit is refused even when each of its
        fragments is small."""
        daemon = await serve(self)
        sender = await daemon.connect()
        sender.protocol.sendMessage(b'"' + b"x" * MIB + b'"', fragmentSize=64 * 1024)
        self.assertEqual(await sender.closed_by_daemon(), 1009)

    async def test_message_at_the_limit_is_answered(self):
        """A frame of exactly the limit is read and answered."""
        daemon = await serve(self, limits=WireLimits(max_message_size=MIB))
        client = await daemon.connect()
        frame = b'{"jsonrpc":"2.0","id":1,"method":"runs.list","params":{"agent_id":"a","pad":"'
        frame += b"x" * (MIB - len(frame) - 3) + b'"}}'
        self.assertEqual(len(frame), MIB)
        client.send_text(frame)
        self.assertEqual((await client.receive())["result"]["runs"], [])


class KeepaliveTests(unittest.TestCase):
    async def test_silent_peer_is_dropped_and_its_runs_get_the_grace_window(self):
        """A peer that stops answering pings is dropped after the ping
        timeout and its open run ends incomplete after the grace window; a
        peer that answers pings stays connected."""
        daemon = await serve(self, limits=WireLimits(auto_ping_interval=1, auto_ping_timeout=1))
        lively = await daemon.connect()
        silent = await daemon.connect()
        run_id = (await silent.call("runs.start", {"agent_id": "a", "intent": "go quiet"}))["run_id"]
        silent.protocol.transport.pauseProducing()
        await wait_for(lambda: len(daemon.runs.sessions) == 1, "the silent peer to be dropped")
        daemon.clock.advance(0.25)
        await wait_for(
            lambda: daemon.store.get_run(run_id).result.status == "incomplete",
            "the run to end incomplete",
        )
        listed = await lively.call("runs.list", {"agent_id": "a"})
        self.assertEqual([r["status"] for r in listed["runs"]], ["incomplete"])
        silent.protocol.transport.resumeProducing()
        await silent.protocol.closed


class ConnectionLimitTests(unittest.TestCase):
    async def test_connections_over_the_limit_are_refused_with_503(self):
        """Past max_connections the opening handshake is answered 503 and
        logged; once a connection closes a new one is accepted."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        daemon = await serve(self, limits=WireLimits(max_connections=2))
        first = await daemon.connect()
        await daemon.connect()
        refused = await raw_http(daemon.port.getHost().port, UPGRADE)
        self.assertTrue(refused.startswith(b"HTTP/1.1 503"), refused)
        self.assertTrue(
            [e for e in events if "refused a connection" in (formatEvent(e) or "")], "not logged"
        )
        await first.close()
        await wait_for(lambda: len(daemon.runs.sessions) == 1, "the first session to close")
        third = await daemon.connect()
        self.assertEqual((await third.call("runs.list", {"agent_id": "a"}))["runs"], [])


class HTTPFaceTests(unittest.TestCase):
    async def test_server_header_is_neutral(self):
        """The upgrade response names the software without a version."""
        daemon = await serve(self)
        response = await raw_http(daemon.port.getHost().port, UPGRADE, until_close=False)
        headers = response.split(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertEqual(headers[0], b"HTTP/1.1 101 Switching Protocols")
        self.assertIn(b"Server: car-twisted", headers)
        self.assertNotIn(b"Autobahn", response)

    async def test_plain_http_gets_no_status_page(self):
        """A plain HTTP GET gets an error status, no HTML page."""
        daemon = await serve(self)
        response = await raw_http(
            daemon.port.getHost().port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        self.assertFalse(response.startswith(b"HTTP/1.1 200"), response)
        self.assertNotIn(b"<html", response.lower())

    async def test_null_origin_is_refused(self):
        """A handshake from the sandboxed-page origin "null" is refused."""
        daemon = await serve(self)
        request = UPGRADE.replace(b"\r\n\r\n", b"\r\nOrigin: null\r\n\r\n")
        response = await raw_http(daemon.port.getHost().port, request)
        self.assertTrue(response.startswith(b"HTTP/1.1 400"), response)


class FactoryOptionsTests(unittest.TestCase):
    def test_autobahn_gets_every_option(self):
        """The factory hands Autobahn every wire setting of its limits."""
        limits = WireLimits(
            max_message_size=2 * MIB,
            auto_ping_interval=7,
            auto_ping_timeout=21,
            open_handshake_timeout=3,
            close_handshake_timeout=4,
            max_connections=9,
        )
        factory = InProcessDaemon(limits=limits).parts.factory
        self.assertEqual(
            (
                factory.maxFramePayloadSize,
                factory.maxMessagePayloadSize,
                factory.autoPingInterval,
                factory.autoPingTimeout,
                factory.openHandshakeTimeout,
                factory.closeHandshakeTimeout,
                factory.maxConnections,
                factory.webStatus,
                factory.allowNullOrigin,
                factory.failByDrop,
            ),
            (2 * MIB, 2 * MIB, 7, 21, 3, 4, 9, False, False, False),
        )
