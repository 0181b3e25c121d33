"""
The car-twisted command, run in-process against a loopback daemon with auth
on (the console script itself is run in test_end_to_end).
"""

import contextlib
import importlib.metadata
import io
import json
import os
import shlex
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from car_twisted import __version__
from car_twisted.auth import HOST_TOKEN_FILE, agent_token, ensure_token
from car_twisted.cli import parser, print_agent_token, print_dashboard_link, run
from car_twisted.records import now
from car_twisted.store.memory import MemoryRunStore
from tests.support import SUCCESS_OUTCOME, AuthDaemon, private_dir, wait_for


class CommandResult:
    def __init__(self, status, out, err):
        self.status, self.out, self.err = status, out, err


async def car_twisted(auth, *argv, environ=None, data_dir=None):
    """Run ``car-twisted runs ...`` against C{auth}'s daemon, as the host."""
    args = parser().parse_args(
        [*argv, "--url", auth.daemon.url, "--data-dir", data_dir or auth.data_dir]
    )
    out, err = io.StringIO(), io.StringIO()
    status = await run(reactor, args, environ or {}, out, err)
    return CommandResult(status, out.getvalue(), err.getvalue())


async def completed_and_open(auth, agent_id="agent-A"):
    """Two runs of C{agent_id}: the first completed, the second open."""
    ws = await auth.agent(agent_id)
    done = (await ws.call("runs.start", {"intent": "finished goal"}))["run_id"]
    await ws.call("runs.complete", {"run_id": done, "outcome": SUCCESS_OUTCOME})
    open_ = (await ws.call("runs.start", {"intent": "ongoing goal"}))["run_id"]
    return done, open_


class RunsListTests(unittest.TestCase):
    async def test_table(self):
        """runs list prints a header and one row per run, newest first, with
        its status and outcome."""
        auth = await AuthDaemon.serve(self)
        done, open_ = await completed_and_open(auth)
        result = await car_twisted(auth, "runs", "list", "agent-A")
        self.assertEqual((result.status, result.err), (0, ""))
        header, first, second = result.out.splitlines()
        self.assertEqual(header.split()[:4], ["RUN", "ID", "STATUS", "OUTCOME"])
        self.assertEqual(first.split()[:4], [open_, "in_progress", "-", "0"])
        self.assertEqual(second.split()[:4], [done, "completed", "success", "0"])
        self.assertTrue(first.endswith("ongoing goal"))

    async def test_json_is_the_daemon_answer(self):
        """runs list --json prints exactly what runs.list answers."""
        auth = await AuthDaemon.serve(self)
        await completed_and_open(auth)
        result = await car_twisted(auth, "runs", "list", "agent-A", "--json", "--status", "completed")
        host = await auth.host()
        expected = await host.call("runs.list", {"agent_id": "agent-A", "limit": 50, "status": "completed"})
        self.assertEqual(json.loads(result.out), expected)
        self.assertEqual(len(expected["runs"]), 1)

    async def test_next_page_hint(self):
        """With more runs than --limit, the table ends with the command for
        the next page, keeping this command's options (--limit included),
        and that command prints the rest."""
        auth = await AuthDaemon.serve(self)
        done, _ = await completed_and_open(auth)
        first = await car_twisted(auth, "runs", "list", "agent-A", "--limit", "1")
        hint = first.out.splitlines()[-1]
        self.assertTrue(hint.startswith("more: car-twisted runs list agent-A --limit 1 "), hint)
        program, *argv = shlex.split(hint[len("more: "):])
        self.assertEqual(program, "car-twisted")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run(reactor, parser().parse_args(argv), {}, out, err), 0, err.getvalue())
        self.assertEqual(out.getvalue().splitlines()[1].split()[0], done)
        self.assertNotIn("more:", out.getvalue())

    async def test_agent_from_environment(self):
        """Without AGENT, $CAR_AGENT_ID names the agent; without either, the
        command says what to pass."""
        auth = await AuthDaemon.serve(self)
        done, open_ = await completed_and_open(auth)
        result = await car_twisted(auth, "runs", "list", environ={"CAR_AGENT_ID": "agent-A"})
        self.assertIn(done, result.out)
        missing = await car_twisted(auth, "runs", "list")
        self.assertEqual(missing.status, 1)
        self.assertIn("name an AGENT", missing.err)

    async def test_agent_data_is_escaped(self):
        """Terminal control characters an agent put in its intent are shown
        escaped, never sent to the terminal."""
        auth = await AuthDaemon.serve(self)
        ws = await auth.agent("agent-A")
        await ws.call("runs.start", {"intent": "\x1b[2J\x1b]0;pwned\x07 goal"})
        result = await car_twisted(auth, "runs", "list", "agent-A")
        self.assertNotIn("\x1b", result.out)
        self.assertIn("\\x1b[2J\\x1b]0;pwned\\x07 goal", result.out)

    async def test_without_host_token_auth_is_required(self):
        """Against a daemon with auth on, a data dir without the host token
        fails with the daemon's refusal and a hint, exit status 1."""
        auth = await AuthDaemon.serve(self)
        result = await car_twisted(auth, "runs", "list", "agent-A", data_dir=private_dir(self))
        self.assertEqual(result.status, 1)
        self.assertIn("(-32001)", result.err)
        self.assertIn("has no host token", result.err)
        self.assertIn("pass its --data-dir or set $CAR_HOME", result.err)

    async def test_wrong_data_dir_is_named(self):
        """A data dir whose host token is not the daemon's: one line naming
        the token file used and suggesting --data-dir or $CAR_HOME."""
        auth = await AuthDaemon.serve(self)
        other = private_dir(self)
        ensure_token(os.path.join(other, HOST_TOKEN_FILE))
        result = await car_twisted(auth, "runs", "list", "agent-A", data_dir=other)
        self.assertEqual((result.status, result.out, len(result.err.splitlines())), (1, "", 1))
        self.assertIn(f"host token in {os.path.join(other, HOST_TOKEN_FILE)}", result.err)
        self.assertIn("token mismatch", result.err)
        self.assertIn("pass its --data-dir or set $CAR_HOME", result.err)

    async def test_unreachable_daemon(self):
        """A daemon that is not there is a one-line error, exit status 1."""
        args = parser().parse_args(["runs", "list", "a", "--url", "ws://127.0.0.1:1", "--data-dir", private_dir(self)])
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run(reactor, args, {}, out, err), 1)
        self.assertIn("cannot talk to the daemon at ws://127.0.0.1:1", err.getvalue())


class RunsShowTests(unittest.TestCase):
    async def test_table(self):
        """runs show prints the run's header and one line per record."""
        auth = await AuthDaemon.serve(self)
        done, _ = await completed_and_open(auth)
        result = await car_twisted(auth, "runs", "show", done)
        self.assertEqual(result.status, 0)
        lines = result.out.splitlines()
        self.assertEqual(lines[0].split(), ["run", done])
        self.assertEqual(lines[1].split(), ["agent", "agent-A"])
        self.assertEqual(lines[2].split(), ["intent", "finished", "goal"])
        self.assertEqual(lines[3].split(), ["status", "completed", "(success)"])
        self.assertEqual(lines[4], "records:")
        self.assertEqual(lines[5].split()[1:], ["started", "intent:", "finished", "goal"])
        self.assertEqual(lines[6].split()[1:], ["ended", "outcome", "success:", "did", "the", "thing"])
        self.assertEqual(len(lines), 7)

    async def test_json_is_the_whole_trace(self):
        """runs show --json prints every record, across get_trace pages."""
        auth = await AuthDaemon.serve(self)
        _, open_ = await completed_and_open(auth)
        turns = [{"record": "turn", "tool": "t", "recorded_at": now()} for _ in range(600)]
        await auth.daemon.store.append_turns(open_, turns, 2000)
        result = await car_twisted(auth, "runs", "show", open_, "--json")
        shown = json.loads(result.out)
        expected, _ = await auth.daemon.store.read_records(open_, 0, 1000)
        self.assertEqual(shown, {"run_id": open_, "agent_id": "agent-A", "records": expected})
        self.assertEqual(len(shown["records"]), 601)

    async def test_unknown_run(self):
        """An unknown run id is an error saying so, exit status 1."""
        auth = await AuthDaemon.serve(self)
        result = await car_twisted(auth, "runs", "show", "no-such-run")
        self.assertEqual((result.status, result.out), (1, ""))
        self.assertIn("no run no-such-run", result.err)

    async def test_show_and_tail_word_an_unknown_run_alike(self):
        """runs show and runs tail say the same one line for a run that is
        unknown or not readable."""
        auth = await AuthDaemon.serve(self)
        show = await car_twisted(auth, "runs", "show", "no-such-run")
        tail = await car_twisted(auth, "runs", "tail", "no-such-run")
        self.assertEqual((tail.status, tail.out, tail.err), (show.status, show.out, show.err))
        self.assertEqual(len(tail.err.splitlines()), 1)


class ScriptedSubscription:
    """
    Stands in for runs.subscribe to script a dropped event, on a run of
    three turns that has ended: a snapshot of the first turn (cursor 1),
    then the first turn again (a duplicate), the third turn (cursor 3: the
    second was "dropped") and the end (cursor 3), plus one event of an
    unrelated run.
    """

    def __init__(self, testcase, store):
        self._testcase = testcase
        self._store = store

    async def subscribe(self, session, params):
        run_id = params["run_id"]
        records, _ = await self._store.read_records(run_id, 0, 100)
        agent_id = records[0]["agent_id"]

        def push():
            session.notify("runs.trace.event", {"run_id": "other", "agent_id": agent_id, "record": {"record": "turn"}, "cursor": 2, "status": "in_progress"})
            for position, cursor in ((1, 1), (3, 3), (4, 3)):
                session.notify(
                    "runs.trace.event",
                    {
                        "run_id": run_id,
                        "agent_id": agent_id,
                        "record": records[position],
                        "cursor": cursor,
                        "status": "completed" if position == 4 else "in_progress",
                    },
                )

        pushing = reactor.callLater(0, push)
        self._testcase.addCleanup(lambda: pushing.active() and pushing.cancel())
        return {"run_id": run_id, "agent_id": agent_id, "turns_so_far": records[1:2], "cursor": 1, "status": "in_progress"}


class RunsTailTests(unittest.TestCase):
    async def test_follows_a_live_run_to_its_end(self):
        """tail prints the trace so far, then each record as the run goes
        on, every record exactly once, and exits 0 when the run ends."""
        auth = await AuthDaemon.serve(self)
        ws, run_id = await auth.start_run("agent-A")
        await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{"tool": "before"}]})
        tailing = ensureDeferred(car_twisted(auth, "runs", "tail", run_id, "--json"))
        await wait_for(
            lambda: any(run_id in s.following for s in auth.daemon.runs.sessions.values()),
            "tail to subscribe",
        )
        await ws.call("runs.record_turns", {"run_id": run_id, "turns": [{"tool": "during"}]})
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        result = await tailing
        self.assertEqual(result.status, 0, result.err)
        expected, _ = await auth.daemon.store.read_records(run_id, 0, 100)
        self.assertEqual([json.loads(line) for line in result.out.splitlines()], expected)
        self.assertEqual(len(expected), 4)

    async def test_ended_run_prints_its_trace(self):
        """tail of an ended run prints its trace and exits 0."""
        auth = await AuthDaemon.serve(self)
        done, _ = await completed_and_open(auth)
        ended = await car_twisted(auth, "runs", "tail", done, "--json")
        self.assertEqual(ended.status, 0)
        self.assertEqual([json.loads(line)["record"] for line in ended.out.splitlines()], ["started", "ended"])

    async def test_follows_subscription_and_fills_gaps(self):
        """With runs.subscribe, tail prints the snapshot then each event until
        the run ends, reading missed events back, each record exactly once."""
        store = MemoryRunStore()
        subscription = ScriptedSubscription(self, store)
        auth = await AuthDaemon.serve(
            self, store=store, extra_methods={"runs.subscribe": subscription.subscribe}
        )
        ws, run_id = await auth.start_run("agent-A")
        turns = [{"record": "turn", "tool": f"tool-{i}", "recorded_at": now()} for i in range(3)]
        await auth.daemon.store.append_turns(run_id, turns, 2000)
        await ws.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        result = await car_twisted(auth, "runs", "tail", run_id, "--json")
        self.assertEqual(result.status, 0)
        expected, _ = await auth.daemon.store.read_records(run_id, 0, 100)
        self.assertEqual([json.loads(line) for line in result.out.splitlines()], expected)
        self.assertIn("missed 1 event(s)", result.err)


class AgentTokenTests(unittest.TestCase):
    def agent_token(self, *argv, environ=None):
        out, err = io.StringIO(), io.StringIO()
        status = print_agent_token(parser().parse_args(["agent-token", *argv]), environ or {}, out, err)
        return CommandResult(status, out.getvalue(), err.getvalue())

    async def test_prints_the_derived_token(self):
        """agent-token prints the token derived from the data dir's secret,
        which binds a session to that agent."""
        auth = await AuthDaemon.serve(self)
        result = self.agent_token("agent-A", "--data-dir", auth.data_dir)
        self.assertEqual((result.status, result.out), (0, agent_token(auth.secret, "agent-A") + "\n"))
        ws = await auth.daemon.connect()
        bound = await ws.call("session.auth", {"agent_id": "agent-A", "token": result.out.strip()})
        self.assertEqual(bound["agent_id"], "agent-A")

    def test_data_dir_from_car_home(self):
        """Without --data-dir, $CAR_HOME is the data dir; $CAR_AUTH_TOKEN wins
        over its file."""
        home = private_dir(self)
        missing = self.agent_token("agent-A", environ={"CAR_HOME": home})
        self.assertEqual(missing.status, 1)
        self.assertIn(f"no daemon secret at {home}/auth-token", missing.err)
        secret = "environment-secret-0123456789"
        overridden = self.agent_token("agent-A", environ={"CAR_HOME": home, "CAR_AUTH_TOKEN": secret})
        self.assertEqual(overridden.out, agent_token(secret, "agent-A") + "\n")

    def test_unusable_agent_id(self):
        """An agent id the daemon would refuse (over 256 characters) gets no token."""
        result = self.agent_token("a" * 257, environ={"CAR_AUTH_TOKEN": "environment-secret-0123456789"})
        self.assertEqual((result.status, result.out), (2, ""))


class DashboardLinkTests(unittest.TestCase):
    def dashboard(self, *argv, environ=None):
        out, err = io.StringIO(), io.StringIO()
        status = print_dashboard_link(parser().parse_args(["dashboard", *argv]), environ or {}, out, err)
        return CommandResult(status, out.getvalue(), err.getvalue())

    async def test_prints_the_login_link(self):
        """dashboard prints the login link holding the data dir's host
        token, at the default address or the one given."""
        auth = await AuthDaemon.serve(self)
        result = self.dashboard("--data-dir", auth.data_dir)
        self.assertEqual(
            (result.status, result.out), (0, f"http://127.0.0.1:9101/login?token={auth.host_token}\n")
        )
        elsewhere = self.dashboard("--data-dir", auth.data_dir, "--url", "http://car.example:8080/")
        self.assertEqual(elsewhere.out, f"http://car.example:8080/login?token={auth.host_token}\n")

    def test_no_host_token(self):
        """Without a host token in the data dir it says where it looked."""
        home = private_dir(self)
        result = self.dashboard(environ={"CAR_HOME": home})
        self.assertEqual((result.status, result.out), (1, ""))
        self.assertIn(f"no host token at {home}/host-token", result.err)


class CommandLineTests(unittest.TestCase):
    def test_version(self):
        """--version prints the package's version, the one the installed
        metadata carries too."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exit = self.assertRaises(SystemExit, parser().parse_args, ["--version"])
        self.assertEqual((exit.code, out.getvalue()), (0, f"car-twisted {__version__}\n"))
        self.assertEqual(importlib.metadata.version("car-twisted"), __version__)

    def test_usage_errors_are_one_line(self):
        """A bad command line is one line naming the problem and where help
        is, exit status 2, not the usage text."""
        for argv, needle in [
            (["runs", "list", "--limit", "x"], "--limit"),
            (["runs", "lst"], "lst"),
            ([], "COMMAND"),
        ]:
            with self.subTest(argv=argv):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    exit = self.assertRaises(SystemExit, parser().parse_args, argv)
                self.assertEqual((exit.code, len(err.getvalue().splitlines())), (2, 1), err.getvalue())
                self.assertTrue(err.getvalue().startswith("car-twisted: "), err.getvalue())
                self.assertIn(needle, err.getvalue())
                self.assertIn("--help", err.getvalue())


class CommandWeightTests(unittest.TestCase):
    def test_the_command_does_not_load_the_daemon(self):
        """Importing the car-twisted command loads none of the daemon (the
        run service, the protocol, the composition root, the SQLite store)
        nor the OpenTelemetry SDK, which only export needs."""
        code = (
            "import sys, car_twisted.cli; "
            "print(sorted(m for m in sys.modules if m.startswith(('car_twisted', 'opentelemetry'))))"
        )
        loaded = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        ).stdout  # fmt: skip
        for heavy in ("car_twisted.runs", "car_twisted.protocol", "car_twisted.tap",
                      "car_twisted.store.sqlite", "opentelemetry"):  # fmt: skip
            self.assertNotIn(f"'{heavy}", loaded)
        self.assertIn("'car_twisted.cli'", loaded)
