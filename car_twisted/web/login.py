"""
Dashboard login: the host token exchanged for a cookie.

The cookie's value is derived from the host token (an HMAC), so the daemon
keeps no login table, a restart keeps people logged in, and rotating the
host token logs everyone out. It is HttpOnly (page scripts cannot read it)
and SameSite=Strict (other sites cannot send it).
"""

import hashlib
import hmac
from typing import Optional

from twisted.web.resource import Resource

from car_twisted.auth import b64url_nopad, tokens_match
from car_twisted.web.pages import LOGIN_FAILED_PAGE, LOGIN_PAGE, html

COOKIE = b"car_dashboard"


def cookie_value(host_token: str) -> str:
    """The cookie a logged-in browser holds."""
    digest = hmac.new(host_token.encode(), b"dashboard-session", hashlib.sha256).digest()
    return b64url_nopad(digest)


class DashboardLogin:
    """
    Who may see the dashboard. C{host_token} None means auth is off
    (``--no-auth``): everyone may, without logging in.
    """

    def __init__(self, host_token: Optional[str]):
        self._host_token = host_token
        self._cookie = None if host_token is None else cookie_value(host_token)

    def admitted(self, request) -> bool:
        """Whether the request carries the login cookie."""
        if self._cookie is None:
            return True
        given = request.getCookie(COOKIE)
        return given is not None and tokens_match(given.decode("ascii", "replace"), self._cookie)

    def log_in(self, request, token: str) -> bool:
        """Set the cookie if C{token} is the host token."""
        if self._cookie is None:
            return True
        if not tokens_match(token, self._host_token):
            return False
        request.addCookie(COOKIE, self._cookie.encode(), path=b"/", httpOnly=True, sameSite="strict")
        return True


class Login(Resource):
    """
    ``/login``: the form (GET), and the exchange of a host token for the
    cookie, from the form (POST) or a link (GET ``?token=...``); then on
    to the runs page.
    """

    isLeaf = True

    def __init__(self, login: DashboardLogin):
        super().__init__()
        self._login = login

    def render_GET(self, request):
        if b"token" not in request.args:
            return html(request, LOGIN_PAGE)
        return self._exchange(request)

    def render_POST(self, request):
        return self._exchange(request)

    def _exchange(self, request):
        token = request.args.get(b"token", [b""])[0].decode("utf-8", "replace")
        if not self._login.log_in(request, token):
            request.setResponseCode(401)
            return html(request, LOGIN_FAILED_PAGE)
        request.setResponseCode(303)
        request.setHeader(b"Location", b"/")
        return b""
