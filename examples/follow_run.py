"""
Demo: an agent records a run while a second client follows it live.

The agent authenticates with its derived token (as a supervisor would hand
it out), starts a run, records a few turns and completes. The follower
authenticates as the host, subscribes to the run, and prints each
``runs.trace.event`` as it arrives, until the run ends.

    python examples/follow_run.py [--url ws://127.0.0.1:9100] [--data-dir ~/.car]

The secrets are read from the daemon's data dir (``$CAR_AUTH_TOKEN``
overrides the daemon secret); a daemon started with ``--no-auth`` has none
and needs none.
"""

import argparse
import os
import sys

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from car_twisted.auth import HOST_TOKEN_FILE, SECRET_FILE, agent_token, read_token
from car_twisted.cli import describe
from car_twisted.client import DEFAULT_URL, DaemonClient
from car_twisted.tap import default_data_dir

AGENT_ID = "demo-agent"
STEPS = [("search", "find the report"), ("read", "read the report"), ("write", "write the summary")]


def token_in(data_dir, name, environ_name=None):
    """A token from the environment or the data dir, or None without one."""
    if environ_name and os.environ.get(environ_name):
        return os.environ[environ_name]
    try:
        return read_token(os.path.join(data_dir, name))
    except FileNotFoundError:
        return None


async def session(reactor, url, auth_params):
    client = await DaemonClient.connect(reactor, url)
    if auth_params is not None:
        await client.call("session.auth", auth_params)
    return client


async def main(reactor, *argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("CAR_DAEMON_URL", DEFAULT_URL))
    parser.add_argument("--data-dir", default=default_data_dir())
    args = parser.parse_args(argv)
    secret = token_in(args.data_dir, SECRET_FILE, "CAR_AUTH_TOKEN")
    host_token = token_in(args.data_dir, HOST_TOKEN_FILE)

    agent = await session(
        reactor, args.url, secret and {"agent_id": AGENT_ID, "token": agent_token(secret, AGENT_ID)}
    )
    follower = await session(reactor, args.url, host_token and {"host_token": host_token})

    run_id = (await agent.call("runs.start", {"agent_id": AGENT_ID, "intent": "demo: follow a run live"}))["run_id"]
    ended = Deferred()

    def on_event(method, params):
        if method != "runs.trace.event" or params["run_id"] != run_id:
            return
        print(f"event  cursor={params['cursor']:<3} {describe(params['record'])}", flush=True)
        if params["status"] != "in_progress":
            ended.callback(params["status"])

    follower.on_notification = on_event
    snapshot = await follower.call("runs.subscribe", {"run_id": run_id})
    print(f"following run {run_id}: cursor={snapshot['cursor']} status={snapshot['status']}", flush=True)

    for tool, prompt in STEPS:
        await agent.call("runs.record_turns", {"run_id": run_id, "turns": [{"tool": tool, "prompt": prompt, "output": "ok"}]})
    await agent.call("runs.complete", {"run_id": run_id, "outcome": {"status": "success", "summary": "demo finished"}})
    print(f"run ended: {await ended}", flush=True)
    await agent.close()
    await follower.close()


if __name__ == "__main__":
    react(main, sys.argv[1:])
