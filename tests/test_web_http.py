"""
The dashboard port over real HTTP: ``/login``'s form, bodies too large to
read, the cap on open connections and the idle timeout (a /ws session
upgraded from HTTP is exempt from both).
"""

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from car_twisted import limits
from car_twisted.auth import HOST_TOKEN_FILE
from car_twisted.limits import MAX_HTTP_BODY
from car_twisted.web.login import cookie_value
from tests.support import private_dir
from tests.test_web_live import dashboard_socket
from tests.web_support import RawHTTP, get, raw_http, start_service


async def exchange(service, request: bytes) -> bytes:
    """What the dashboard port answers C{request} with, up to its close."""
    return await raw_http(int(service.http_url.rsplit(":", 1)[1]), request)


def post(body: bytes, headers: bytes) -> bytes:
    return (
        b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n" + headers + b"\r\n" + body
    )


class LoginTests(unittest.TestCase):
    async def started(self):
        data_dir = private_dir(self)
        service = await start_service(self, "--store", "memory", "--data-dir", data_dir)
        with open(f"{data_dir}/{HOST_TOKEN_FILE}") as f:
            return service, f.read().strip()

    async def test_the_form_exchanges_the_host_token_for_the_cookie(self):
        """A POSTed form with the host token is answered 303 and the cookie;
        with another token, 401 and no cookie."""
        service, host_token = await self.started()
        body = b"token=" + host_token.encode()
        answer = await exchange(service, post(body, b"Content-Length: %d\r\n" % len(body)))
        self.assertTrue(answer.startswith(b"HTTP/1.1 303 "), answer[:80])
        self.assertIn(b"Set-Cookie: car_dashboard=", answer)
        body = b"token=" + b"0" * len(host_token)
        answer = await exchange(service, post(body, b"Content-Length: %d\r\n" % len(body)))
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:80])
        self.assertNotIn(b"Set-Cookie", answer)

    async def test_a_declared_body_too_large_is_refused_unread(self):
        """A Content-Length over the limit is answered 413 and the
        connection closed at once, though the body never comes: only 413,
        no login."""
        service, host_token = await self.started()
        headers = b"Content-Length: %d\r\n" % (1024 * 1024 * 1024)
        answer = await exchange(service, post(b"token=" + host_token.encode(), headers))
        self.assertEqual(answer.split(b"\r\n")[0], b"HTTP/1.1 413 Content Too Large")
        self.assertNotIn(b"Set-Cookie", answer)

    async def test_a_chunked_body_too_large_is_refused(self):
        """A chunked body is counted as it comes: past the limit, 413 and
        closed, with no login even though the token came first."""
        service, host_token = await self.started()
        token = b"token=" + host_token.encode() + b"&pad="
        pad = b"x" * MAX_HTTP_BODY
        chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(token), token, len(pad), pad)
        answer = await exchange(service, post(chunks, b"Transfer-Encoding: chunked\r\n"))
        self.assertEqual(answer.split(b"\r\n")[0], b"HTTP/1.1 413 Content Too Large")
        self.assertNotIn(b"Set-Cookie", answer)


class ConnectionTests(unittest.TestCase):
    async def started(self):
        data_dir = private_dir(self)
        service = await start_service(self, "--store", "memory", "--data-dir", data_dir)
        with open(f"{data_dir}/{HOST_TOKEN_FILE}") as f:
            return service, f.read().strip()

    async def idle_connection(self, service) -> RawHTTP:
        """A connection to the dashboard port that sends nothing."""
        port = int(service.http_url.rsplit(":", 1)[1])
        client = RawHTTP(b"")
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.connected and client.transport.loseConnection())
        return client

    async def test_connections_past_the_cap_are_answered_503(self):
        """Past the cap of open HTTP connections a new one is answered 503
        and closed; once one closes, requests are served again."""
        self.patch(limits, "MAX_HTTP_CONNECTIONS", 5)
        service, _ = await self.started()
        idle = [await self.idle_connection(service) for _ in range(5)]
        refused = await self.idle_connection(service)
        self.assertEqual((await refused.done).split(b"\r\n")[0], b"HTTP/1.1 503 Service Unavailable")
        idle[0].transport.loseConnection()
        await idle[0].done
        code, _, _ = await get(service.http_url + "/healthz")
        self.assertEqual(code, 200)

    async def test_idle_connections_are_closed_and_dashboard_sockets_are_not(self):
        """An HTTP connection that stays idle past the timeout is closed; a
        /ws session upgraded from one is neither closed nor counted against
        the cap, and nothing is logged as an error."""
        self.patch(limits, "HTTP_IDLE_TIMEOUT", 0.5)
        self.patch(limits, "MAX_HTTP_CONNECTIONS", 2)
        errors = []
        observer = lambda event: event.get("log_failure") and errors.append(event)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        service, host_token = await self.started()
        sockets = [await dashboard_socket(service, cookie_value(host_token)) for _ in range(3)]
        idle = await self.idle_connection(service)
        self.assertEqual(await idle.done, b"")
        await deferLater(reactor, 0.5, lambda: None)  # every socket's HTTP timeout is past
        for socket in sockets:
            listed = await socket.call("runs.list", {})
            self.assertEqual(listed["runs"], [])
        self.assertEqual(errors, [])
