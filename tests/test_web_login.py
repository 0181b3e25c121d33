"""``/login`` over real HTTP: the form's exchange, and bodies too large to read."""

from twisted.trial import unittest

from car_twisted.auth import HOST_TOKEN_FILE
from car_twisted.limits import MAX_HTTP_BODY
from tests.support import private_dir
from tests.web_support import raw_http, start_service


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
