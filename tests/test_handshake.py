"""
server.handshake: the protocol version and capability negotiation, over a
real WebSocket.
"""

from twisted.trial import unittest

from car_twisted import __version__
from tests.support import serve

ALL = ["runs.cancel.v1", "runs.pagination.v1", "runs.resume.v1"]


class HandshakeTests(unittest.TestCase):
    async def test_minimal_client_handshake(self):
        """{client_version, protocol_version: 3, required_capabilities: []}
        alone works and negotiates nothing."""
        daemon = await serve(self)
        ws = await daemon.connect()
        result = await ws.call(
            "server.handshake",
            {"client_version": "harness/1.0", "protocol_version": 3, "required_capabilities": []},
        )
        self.assertEqual(
            result,
            {"protocol_version": 3, "server_version": __version__, "negotiated_capabilities": []},
        )
        self.assertEqual(daemon.only_session().capabilities, frozenset())

    async def test_known_capabilities_are_negotiated_and_stored(self):
        """Every known capability asked for, required or optional, is
        negotiated and kept on the session; unknown optional ones are left out."""
        daemon = await serve(self)
        ws = await daemon.connect()
        result = await ws.call(
            "server.handshake",
            {
                "protocol_version": 3,
                "required_capabilities": ["runs.resume.v1"],
                "optional_capabilities": ["runs.cancel.v1", "runs.pagination.v1", "runs.teleport.v9"],
            },
        )
        self.assertEqual(result["negotiated_capabilities"], ALL)
        self.assertEqual(daemon.only_session().capabilities, frozenset(ALL))

    async def test_no_handshake_no_capabilities(self):
        """A session that never sends a handshake has no capability on."""
        daemon = await serve(self)
        ws = await daemon.connect()
        await ws.call("runs.list", {"agent_id": "agent-A"})
        self.assertEqual(daemon.only_session().capabilities, frozenset())

    async def test_other_protocol_version_is_32006(self):
        """A different protocol version is -32006, naming the one spoken, and
        leaves the session's capabilities alone."""
        daemon = await serve(self)
        ws = await daemon.connect()
        for version in (2, 4):
            answer = await ws.call_raw(
                "server.handshake",
                {"protocol_version": version, "optional_capabilities": ["runs.cancel.v1"]},
            )
            self.assertEqual(answer["error"]["code"], -32006)
            self.assertIn("version 3", answer["error"]["message"])
        self.assertEqual(daemon.only_session().capabilities, frozenset())

    async def test_unknown_required_capability_is_32008(self):
        """An unknown required capability is -32008 naming it; nothing is
        negotiated."""
        daemon = await serve(self)
        ws = await daemon.connect()
        answer = await ws.call_raw(
            "server.handshake",
            {"protocol_version": 3, "required_capabilities": ["runs.cancel.v1", "runs.teleport.v9"]},
        )
        self.assertEqual(answer["error"]["code"], -32008)
        self.assertIn("'runs.teleport.v9'", answer["error"]["message"])
        self.assertEqual(daemon.only_session().capabilities, frozenset())

    async def test_malformed_handshakes_are_invalid_params(self):
        """A missing or non-integer version, or capabilities that are not a
        list of names, are -32602."""
        daemon = await serve(self)
        ws = await daemon.connect()
        for params in (
            {},
            {"protocol_version": "3"},
            {"protocol_version": 3.0},
            {"protocol_version": 3, "required_capabilities": "runs.cancel.v1"},
            {"protocol_version": 3, "optional_capabilities": [1]},
            {"protocol_version": 3, "optional_capabilities": ["x"] * 65},
            {"protocol_version": 3, "client_version": 7},
        ):
            answer = await ws.call_raw("server.handshake", params)
            self.assertEqual(answer["error"]["code"], -32602, params)
