"""
session.auth, the auth-required refusal and who may read and write which
runs, in process; on a loopback port, what the connection does: the close
frame after a refusal and the auth deadline.
"""

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from car_twisted.auth import AUTH_FAILURE_LOG_INTERVAL, Authenticator, agent_token
from car_twisted.errors import AuthFailed
from car_twisted.limits import WireLimits
from car_twisted.session import Session
from car_twisted.store.memory import MemoryRunStore
from tests.support import SUCCESS_OUTCOME, AuthDaemon, in_process

MISMATCH = {"code": -32603, "message": "auth failed: token mismatch"}


class ListingRecorder(MemoryRunStore):
    """A memory store that remembers which agents were listed."""

    def __init__(self):
        super().__init__()
        self.listed = []

    def list_runs(self, agent_id, cursor, limit, status):
        self.listed.append(agent_id)
        return super().list_runs(agent_id, cursor, limit, status)


class SessionAuthTests(unittest.TestCase):
    async def assertStaysUnauthenticated(self, ws):
        """The session is still refused: -32001, then closed with 4001."""
        refused = await ws.call_raw("runs.list", {"agent_id": "agent-A"})
        self.assertEqual(refused["error"]["code"], -32001)
        self.assertEqual(await ws.closed_by_daemon(), 4001)

    async def test_agent_token_binds_the_session(self):
        """{token, agent_id} with the agent's derived token answers
        {ok, auth_enabled, agent_id} and binds the session to that agent."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        result = await ws.call(
            "session.auth", {"agent_id": "agent-A", "token": agent_token(auth.secret, "agent-A")}
        )
        self.assertEqual(result, {"ok": True, "auth_enabled": True, "agent_id": "agent-A"})
        session = auth.daemon.only_session()
        self.assertEqual((session.agent_id, session.role), ("agent-A", "agent"))
        started = await ws.call("runs.start", {"intent": "bound run"})
        self.assertEqual(started["agent_id"], "agent-A")

    async def test_wrong_agent_token_is_refused(self):
        """A wrong agent token answers -32603 `auth failed: token mismatch`
        and the session stays unauthenticated."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        answer = await ws.call_raw("session.auth", {"agent_id": "agent-A", "token": "not-the-token"})
        self.assertEqual(answer["error"], MISMATCH)
        self.assertIsNone(auth.daemon.only_session().agent_id)
        await self.assertStaysUnauthenticated(ws)

    async def test_token_of_agent_b_cannot_claim_agent_a(self):
        """Agent B's genuine token does not bind a session to agent A."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        answer = await ws.call_raw(
            "session.auth", {"agent_id": "agent-A", "token": agent_token(auth.secret, "agent-B")}
        )
        self.assertEqual(answer["error"], MISMATCH)
        await self.assertStaysUnauthenticated(ws)

    async def test_missing_token_is_invalid_params(self):
        """session.auth without any token is -32602 naming what to send; the
        session stays unauthenticated."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        answer = await ws.call_raw("session.auth", {"agent_id": "agent-A"})
        self.assertEqual(answer["error"]["code"], -32602)
        self.assertIn("token", answer["error"]["message"])
        await self.assertStaysUnauthenticated(ws)

    async def test_non_string_token_is_invalid_params(self):
        """A token that is not a string is -32602, not a crash."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        answer = await ws.call_raw("session.auth", {"agent_id": "agent-A", "token": ["x"]})
        self.assertEqual(answer["error"]["code"], -32602)
        self.assertIn("token must be a string", answer["error"]["message"])

    async def test_host_token_gives_the_host_role(self):
        """{host_token} answers {ok, auth_enabled, role: "host"}."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        result = await ws.call("session.auth", {"host_token": auth.host_token})
        self.assertEqual(result, {"ok": True, "auth_enabled": True, "role": "host"})
        session = auth.daemon.only_session()
        self.assertEqual((session.role, session.agent_id), ("host", None))

    async def test_wrong_host_token_is_refused(self):
        """A wrong host token, or the daemon secret offered as the host token,
        is a mismatch."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        for guess in ("nope", auth.secret):
            answer = await ws.call_raw("session.auth", {"host_token": guess})
            self.assertEqual(answer["error"], MISMATCH)
        await self.assertStaysUnauthenticated(ws)

    async def test_daemon_secret_alone_authenticates_without_binding(self):
        """{token} with the daemon secret authenticates with no agent and no
        role; with the host token or an agent token instead, it is a mismatch."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        for guess in (auth.host_token, agent_token(auth.secret, "agent-A")):
            answer = await ws.call_raw("session.auth", {"token": guess})
            self.assertEqual(answer["error"], MISMATCH)
        result = await ws.call("session.auth", {"token": auth.secret})
        self.assertEqual(result, {"ok": True, "auth_enabled": True})
        session = auth.daemon.only_session()
        self.assertEqual((session.authenticated, session.agent_id, session.role), (True, None, None))

    async def test_identity_cannot_change(self):
        """A bound session cannot re-authenticate as another agent or the
        host, even with valid tokens; repeating its own auth is fine."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.agent("agent-A")
        other = await ws.call_raw(
            "session.auth", {"agent_id": "agent-B", "token": agent_token(auth.secret, "agent-B")}
        )
        self.assertEqual(other["error"]["code"], -32603)
        self.assertIn("already authenticated as agent 'agent-A'", other["error"]["message"])
        host = await ws.call_raw("session.auth", {"host_token": auth.host_token})
        self.assertEqual(host["error"]["code"], -32603)
        again = await ws.call(
            "session.auth", {"agent_id": "agent-A", "token": agent_token(auth.secret, "agent-A")}
        )
        self.assertEqual(again["agent_id"], "agent-A")
        self.assertEqual(auth.daemon.only_session().agent_id, "agent-A")


class AuthRequiredTests(unittest.TestCase):
    async def test_unknown_method_before_auth_is_auth_required(self):
        """An unauthenticated session learns nothing about which methods
        exist: an unknown method is also -32001 and closes."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        answer = await ws.call_raw("no.such.method", {})
        self.assertEqual(answer["error"]["code"], -32001)
        self.assertEqual(await ws.closed_by_daemon(), 4001)

    async def test_notification_before_auth_closes_silently(self):
        """A notification before auth gets no answer, but the connection
        is still closed with 4001."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        ws.send({"jsonrpc": "2.0", "method": "runs.start", "params": {"agent_id": "a", "intent": "x"}})
        self.assertEqual(await ws.closed_by_daemon(), 4001)
        self.assertEqual(ws.unread(), [])
        self.assertEqual(await auth.daemon.store.open_runs(), [])

    async def test_batch_before_auth_is_answered_then_closed(self):
        """In a batch, each request before auth gets -32001 in the one answer
        array, then the connection closes."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        ws.send([
            {"jsonrpc": "2.0", "id": 1, "method": "server.handshake", "params": {"protocol_version": 3}},
            {"jsonrpc": "2.0", "id": 2, "method": "runs.list", "params": {"agent_id": "a"}},
        ])
        answers = {a["id"]: a for a in await ws.receive()}
        self.assertIn("result", answers[1])
        self.assertEqual(answers[2]["error"]["code"], -32001)
        self.assertEqual(await ws.closed_by_daemon(), 4001)

    async def test_handshake_is_allowed_before_auth_and_does_not_authenticate(self):
        """server.handshake works before session.auth, and the session still
        needs session.auth afterwards."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        await ws.call("server.handshake", {"protocol_version": 3, "required_capabilities": []})
        refused = await ws.call_raw("runs.list", {"agent_id": "agent-A"})
        self.assertEqual(refused["error"]["code"], -32001)
        self.assertEqual(await ws.closed_by_daemon(), 4001)

    async def test_failed_auth_then_right_token_works(self):
        """A wrong token does not close the connection; the right one then
        authenticates."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        wrong = await ws.call_raw("session.auth", {"token": "guess"})
        self.assertEqual(wrong["error"], MISMATCH)
        await ws.call("session.auth", {"agent_id": "agent-A", "token": agent_token(auth.secret, "agent-A")})
        self.assertTrue((await ws.call("runs.start", {"intent": "after retry"}))["run_id"])

    async def test_batch_stops_at_auth_required(self):
        """A batch [runs.start, session.auth, runs.start] before auth: the
        first start is refused -32001, and the requests after it do not run
        (each is answered the same -32001), so no run is started and the
        session is not authenticated; then the connection closes with 4001."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        token = agent_token(auth.secret, "agent-A")
        ws.send([
            {"jsonrpc": "2.0", "id": 1, "method": "runs.start", "params": {"agent_id": "agent-A", "intent": "early"}},
            {"jsonrpc": "2.0", "id": 2, "method": "session.auth", "params": {"agent_id": "agent-A", "token": token}},
            {"jsonrpc": "2.0", "id": 3, "method": "runs.start", "params": {"intent": "late"}},
        ])
        answers = await ws.receive()
        self.assertEqual([a["id"] for a in answers], [1, 2, 3])
        self.assertEqual([a["error"]["code"] for a in answers], [-32001] * 3)
        self.assertFalse(ws.session.authenticated)
        self.assertEqual(await ws.closed_by_daemon(), 4001)
        self.assertEqual(await auth.daemon.store.open_runs(), [])
        runs, _ = await auth.daemon.store.list_runs("agent-A", None, 10, None)
        self.assertEqual(runs, [])


class AuthCloseOnTheWireTests(unittest.TestCase):
    """What the connection does with a refusal that closes it."""

    async def test_method_before_auth_is_refused_and_closed(self):
        """runs.start before session.auth answers -32001 `auth required`,
        records nothing, and the daemon closes the connection with 4001."""
        auth = await AuthDaemon.serve(self)
        ws = await auth.daemon.connect()
        answer = await ws.call_raw("runs.start", {"agent_id": "agent-A", "intent": "sneak in"})
        self.assertEqual(answer["error"]["code"], -32001)
        self.assertTrue(answer["error"]["message"].startswith("auth required"))
        self.assertEqual(await ws.closed_by_daemon(), 4001)
        self.assertEqual(await auth.daemon.store.open_runs(), [])
        await auth.daemon.wait_closed()

    async def test_frames_behind_a_refused_request_are_not_handled(self):
        """Once a request is refused with -32001, frames already sent behind it
        are not handled, even a valid session.auth followed by runs.start."""
        auth = await AuthDaemon.serve(self)
        ws = await auth.daemon.connect()
        ws.request("runs.list", {"agent_id": "agent-A"})
        ws.request("session.auth", {"agent_id": "agent-A", "token": agent_token(auth.secret, "agent-A")})
        ws.request("runs.start", {"intent": "slipped through"})
        self.assertEqual(await ws.closed_by_daemon(), 4001)
        (refused,) = ws.unread()
        self.assertEqual(refused["error"]["code"], -32001)
        self.assertEqual(await auth.daemon.store.open_runs(), [])


class AuthDeadlineTests(unittest.TestCase):
    """The auth deadline is the connection's; it runs on the daemon's Clock."""

    async def test_unauthenticated_session_is_closed_at_the_deadline(self):
        """With auth on, a session that has not authenticated auth_timeout
        seconds after the upgrade is closed with 4001 and a reason saying
        so; until then it stays open."""
        auth = await AuthDaemon.serve(self, limits=WireLimits(auth_timeout=10))
        ws = await auth.daemon.connect()
        (connection,) = auth.daemon.factory.connections
        auth.daemon.clock.advance(9.9)
        self.assertEqual(connection.state, connection.STATE_OPEN)
        self.assertFalse(connection.closing)
        auth.daemon.clock.advance(0.1)
        self.assertEqual(await ws.closed_by_daemon(), 4001)
        self.assertIn("auth timeout", ws.protocol.remoteCloseReason)
        await auth.daemon.wait_closed()
        self.assertEqual(auth.daemon.clock.getDelayedCalls(), [])

    async def test_auth_cancels_the_deadline(self):
        """session.auth cancels the session's deadline: no timer is left and
        the session outlives it."""
        auth = await AuthDaemon.serve(self, limits=WireLimits(auth_timeout=10))
        ws = await auth.daemon.connect()
        self.assertEqual(len(auth.daemon.clock.getDelayedCalls()), 1)
        await ws.call("session.auth", {"host_token": auth.host_token})
        self.assertEqual(auth.daemon.clock.getDelayedCalls(), [])
        auth.daemon.clock.advance(60)
        self.assertEqual((await ws.call("runs.list", {"agent_id": "agent-A"}))["runs"], [])

    async def test_close_cancels_the_deadline(self):
        """A session that closes before its deadline leaves no timer."""
        auth = await AuthDaemon.serve(self)
        ws = await auth.daemon.connect()
        self.assertEqual(len(auth.daemon.clock.getDelayedCalls()), 1)
        await ws.close()
        await auth.daemon.wait_closed()
        self.assertEqual(auth.daemon.clock.getDelayedCalls(), [])


class AuthFailureTests(unittest.TestCase):
    async def test_third_wrong_token_closes_the_connection(self):
        """Two token mismatches leave the connection open; the third is
        answered -32603 saying the connection closes, and it is closed with
        4001."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.daemon.connect()
        for _ in range(2):
            self.assertEqual((await ws.call_raw("session.auth", {"token": "guess"}))["error"], MISMATCH)
        third = await ws.call_raw("session.auth", {"host_token": "guess"})
        self.assertEqual(third["error"]["code"], -32603)
        self.assertIn("token mismatch, 3 times on this connection", third["error"]["message"])
        self.assertEqual(await ws.closed_by_daemon(), 4001)

    def test_refusals_are_logged_at_most_once_per_interval(self):
        """Many refused tokens log one line; the next line, an interval
        later, counts the refusals that were not logged."""
        clock = Clock()
        authenticator = Authenticator("s" * 43, "h" * 43, seconds=clock.seconds)
        lines = []
        observer = lines.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        def refuse(n):
            session = Session(f"client-{n}", "127.0.0.1:1", lambda *_: None)
            self.assertRaises(AuthFailed, authenticator.authenticate, session, {"token": "guess"})

        for n in range(50):
            refuse(n)
            clock.advance(AUTH_FAILURE_LOG_INTERVAL / 100)
        clock.advance(AUTH_FAILURE_LOG_INTERVAL)
        refuse(50)
        refused = [e for e in lines if e.get("log_namespace") == "car_twisted.auth"]
        self.assertEqual([e["more"] for e in refused], [0, 49])


class OwnershipTests(unittest.TestCase):
    async def test_bound_session_cannot_forge_under_another_agent(self):
        """A session bound to A through a real session.auth cannot start a run
        as B: an error, and nothing recorded under B."""
        auth = AuthDaemon.in_process(self)
        ws = await auth.agent("agent-A")
        forged = await ws.call_raw("runs.start", {"agent_id": "agent-B", "intent": "forge"})
        self.assertEqual(forged["error"]["code"], -32602)
        self.assertEqual(await auth.daemon.store.list_runs("agent-B", None, 10, None), ([], None))
        self.assertEqual(await auth.daemon.store.open_runs(), [])

    async def test_foreign_listing_refused_before_store_access(self):
        """A session bound to A asking runs.list for B is refused without the
        store being asked; listing its own agent works (agent_id optional)."""
        store = ListingRecorder()
        auth = AuthDaemon.in_process(self, store=store)
        await auth.start_run("agent-B")
        ws = await auth.agent("agent-A")
        refused = await ws.call_raw("runs.list", {"agent_id": "agent-B"})
        self.assertIn("error", refused)
        self.assertIn("may list only agent 'agent-A'", refused["error"]["message"])
        self.assertEqual(store.listed, [])
        own = await ws.call("runs.list", {})
        self.assertEqual((own["agent_id"], own["runs"]), ("agent-A", []))
        self.assertEqual(store.listed, ["agent-A"])

    async def test_foreign_run_looks_unknown(self):
        """runs.get_trace of another agent's run answers exactly like an
        unknown run id."""
        auth = AuthDaemon.in_process(self)
        _, b_run = await auth.start_run("agent-B")
        ws = await auth.agent("agent-A")
        foreign = await ws.call("runs.get_trace", {"run_id": b_run})
        unknown = await ws.call("runs.get_trace", {"run_id": "no-such-run"})
        self.assertEqual(foreign, {"run_id": b_run, "not_found": True})
        self.assertEqual(unknown, {"run_id": "no-such-run", "not_found": True})

    async def test_foreign_complete_refused_like_unknown(self):
        """runs.complete on another agent's open run fails with the same
        message as an unknown run, and the run stays open."""
        auth = AuthDaemon.in_process(self)
        _, b_run = await auth.start_run("agent-B")
        ws = await auth.agent("agent-A")
        foreign = await ws.call_raw("runs.complete", {"run_id": b_run, "outcome": SUCCESS_OUTCOME})
        unknown = await ws.call_raw("runs.complete", {"run_id": "no-such-run", "outcome": SUCCESS_OUTCOME})
        self.assertEqual(foreign["error"]["code"], -32603)
        self.assertEqual(
            foreign["error"]["message"].replace(b_run, "ID"),
            unknown["error"]["message"].replace("no-such-run", "ID"),
        )
        self.assertEqual((await auth.daemon.store.get_run(b_run)).status, "in_progress")

    async def test_another_session_of_the_same_agent_may_complete(self):
        """A second session bound to the run's agent may complete it."""
        auth = AuthDaemon.in_process(self)
        _, run_id = await auth.start_run("agent-A")
        other = await auth.agent("agent-A")
        ack = await other.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertEqual(ack, {"ok": True, "run_id": run_id})
        self.assertEqual((await auth.daemon.store.get_run(run_id)).status, "completed")

    async def test_host_reads_every_agent(self):
        """The host lists and reads the runs of every agent."""
        auth = AuthDaemon.in_process(self)
        _, a_run = await auth.start_run("agent-A", "a's run")
        _, b_run = await auth.start_run("agent-B", "b's run")
        host = await auth.host()
        for agent_id, run_id in (("agent-A", a_run), ("agent-B", b_run)):
            listed = await host.call("runs.list", {"agent_id": agent_id})
            self.assertEqual([r["run_id"] for r in listed["runs"]], [run_id])
            trace = await host.call("runs.get_trace", {"run_id": run_id})
            self.assertEqual(trace["agent_id"], agent_id)
            self.assertEqual(trace["records"][0]["record"], "started")

    async def test_host_cannot_write(self):
        """The host may neither complete an agent's run nor start runs under
        any agent's name."""
        auth = AuthDaemon.in_process(self)
        _, run_id = await auth.start_run("agent-A")
        host = await auth.host()
        completed = await host.call_raw("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertEqual(completed["error"]["code"], -32603)
        self.assertEqual((await auth.daemon.store.get_run(run_id)).status, "in_progress")
        started = await host.call_raw("runs.start", {"agent_id": "agent-A", "intent": "forge"})
        self.assertEqual(started["error"]["code"], -32603)
        self.assertIn("host role", started["error"]["message"])
        self.assertEqual(len(await auth.daemon.store.open_runs()), 1)

    async def test_daemon_secret_session_reads_all(self):
        """A session holding the daemon secret (which can mint every agent's
        token) reads every agent's runs and may start a run for a named agent."""
        auth = AuthDaemon.in_process(self)
        _, b_run = await auth.start_run("agent-B")
        ws = await auth.daemon.connect()
        await ws.call("session.auth", {"token": auth.secret})
        trace = await ws.call("runs.get_trace", {"run_id": b_run})
        self.assertEqual(trace["agent_id"], "agent-B")
        started = await ws.call("runs.start", {"agent_id": "agent-C", "intent": "operator run"})
        self.assertEqual(started["agent_id"], "agent-C")


class NoAuthTests(unittest.TestCase):
    async def test_session_auth_answers_auth_disabled(self):
        """With auth off, session.auth needs no token and answers
        {ok: true, auth_enabled: false}."""
        daemon = in_process(self)
        ws = await daemon.connect()
        self.assertEqual(await ws.call("session.auth", {}), {"ok": True, "auth_enabled": False})
        self.assertEqual(
            await ws.call("session.auth", {"host_token": "anything"}), {"ok": True, "auth_enabled": False}
        )
        self.assertIsNone(daemon.only_session().role)

    async def test_session_auth_still_binds_the_agent(self):
        """With auth off, session.auth {agent_id} binds the session: runs go
        to that agent and other agents' runs cannot be read."""
        daemon = in_process(self)
        other = await daemon.connect()
        b_run = (await other.call("runs.start", {"agent_id": "agent-B", "intent": "b"}))["run_id"]
        ws = await daemon.connect()
        result = await ws.call("session.auth", {"agent_id": "agent-A", "token": "ignored"})
        self.assertEqual(result, {"ok": True, "auth_enabled": False, "agent_id": "agent-A"})
        self.assertEqual((await ws.call("runs.start", {"intent": "a"}))["agent_id"], "agent-A")
        self.assertEqual(
            await ws.call("runs.get_trace", {"run_id": b_run}), {"run_id": b_run, "not_found": True}
        )
        refused = await ws.call_raw("runs.list", {"agent_id": "agent-B"})
        self.assertIn("error", refused)

    async def test_unbound_session_reads_all_without_auth(self):
        """With auth off, a session that never authenticated may call any
        method and reads every agent's runs."""
        daemon = in_process(self)
        producer = await daemon.connect()
        run_id = (await producer.call("runs.start", {"agent_id": "agent-B", "intent": "b"}))["run_id"]
        reader = await daemon.connect()
        listed = await reader.call("runs.list", {"agent_id": "agent-B"})
        self.assertEqual([r["run_id"] for r in listed["runs"]], [run_id])
        trace = await reader.call("runs.get_trace", {"run_id": run_id})
        self.assertEqual(trace["agent_id"], "agent-B")
