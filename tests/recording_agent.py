"""
An agent process, as a supervisor would start one: it finds the daemon and
its identity in CAR_DAEMON_URL, CAR_AGENT_ID and CAR_AGENT_TOKEN, records one
run, and prints ``{"run_id", "agent_id"}`` as JSON. Used by test_end_to_end.
"""

import json
import os
import sys

from twisted.internet.task import react

from car_twisted.client import DaemonClient


async def record_one_run(reactor):
    client = await DaemonClient.connect(reactor, os.environ["CAR_DAEMON_URL"])
    try:
        await client.call(
            "server.handshake",
            {"client_version": "recording-agent/1", "protocol_version": 3, "required_capabilities": []},
        )
        await client.call(
            "session.auth",
            {"agent_id": os.environ["CAR_AGENT_ID"], "token": os.environ["CAR_AGENT_TOKEN"]},
        )
        started = await client.call("runs.start", {"intent": "end-to-end goal"})
        await client.call(
            "runs.complete",
            {"run_id": started["run_id"], "outcome": {"status": "success", "summary": "recorded from a process"}},
        )
    finally:
        await client.close()
    sys.stdout.write(json.dumps(started) + "\n")


if __name__ == "__main__":
    react(record_one_run)
