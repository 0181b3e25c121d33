"""
What authentication costs: agent-token derivations per second, and the
round trip of session.auth next to an unauthenticated call, over a real
loopback WebSocket against an in-process daemon with auth on.

Bounded: 2000 round trips per method on one connection, plus 100
connect-auth-record-close sessions. Run: python bench/auth_sessions.py
"""

import shutil
import tempfile
import time

from twisted.internet.endpoints import serverFromString
from twisted.internet.task import react

from car_twisted.auth import Authenticator, agent_token, daemon_secret
from car_twisted.client import DaemonClient
from car_twisted.store.memory import MemoryRunStore
from car_twisted.tap import assemble

ROUND_TRIPS = 2000
SESSIONS = 100


async def timed_calls(client, method, params):
    began = time.perf_counter()
    for _ in range(ROUND_TRIPS):
        await client.call(method, params)
    return (time.perf_counter() - began) / ROUND_TRIPS * 1e6


async def main(reactor):
    data_dir = tempfile.mkdtemp(prefix="car-bench-")
    try:
        daemon = assemble(MemoryRunStore(), reactor, Authenticator.from_data_dir(data_dir, {}))
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(daemon.factory)
        url = f"ws://127.0.0.1:{port.getHost().port}"
        secret = daemon_secret(data_dir, {})

        began = time.perf_counter()
        for i in range(20000):
            agent_token(secret, f"agent-{i}")
        print(f"agent_token: {20000 / (time.perf_counter() - began):,.0f} derivations/s")

        token = agent_token(secret, "bench")
        client = await DaemonClient.connect(reactor, url)
        await timed_calls(client, "server.handshake", {"protocol_version": 3})  # warm up
        handshake_us = await timed_calls(client, "server.handshake", {"protocol_version": 3})
        auth_us = await timed_calls(client, "session.auth", {"agent_id": "bench", "token": token})
        await client.close()
        print(f"session.auth round trip: {auth_us:.0f} us (server.handshake, no token check: {handshake_us:.0f} us)")

        began = time.perf_counter()
        for _ in range(SESSIONS):
            client = await DaemonClient.connect(reactor, url)
            await client.call("session.auth", {"agent_id": "bench", "token": token})
            run = await client.call("runs.start", {"intent": "bench"})
            await client.call("runs.complete", {"run_id": run["run_id"], "outcome": {"status": "success"}})
            await client.close()
        elapsed = time.perf_counter() - began
        print(f"connect+auth+start+complete+close: {SESSIONS / elapsed:,.0f} sessions/s ({elapsed / SESSIONS * 1e3:.2f} ms each)")
        await port.stopListening()
        await daemon.runs.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    react(main)
