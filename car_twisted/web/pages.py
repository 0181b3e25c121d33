"""
The dashboard's pages and assets: plain HTML, CSS and JavaScript kept as
package data and served as they are (no build step, nothing from a CDN).

Every page and asset is sent with a Content-Security-Policy that allows
scripts and styles from this origin only (no inline script, no eval), and
the pages' scripts render run content as text only.
"""

from importlib.resources import files

from twisted.web.resource import Resource

#: What a page may load and where it may connect: this origin only.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

_CONTENT_TYPES = {
    "html": b"text/html; charset=utf-8",
    "css": b"text/css; charset=utf-8",
    "js": b"text/javascript; charset=utf-8",
    "svg": b"image/svg+xml",
}


def asset(name: str) -> bytes:
    """A file of the package's C{static} directory."""
    return files("car_twisted.web").joinpath("static", name).read_bytes()


LOGIN_PAGE = asset("login.html")
#: The login page saying the token was wrong (the page is static: no
#: request text is ever put into it).
LOGIN_FAILED_PAGE = LOGIN_PAGE.replace(b'id="failed" hidden', b'id="failed"')


def secured(request, content_type: bytes) -> None:
    """The headers every dashboard response carries."""
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")
    request.setHeader(b"Cache-Control", b"no-store")


def html(request, page: bytes) -> bytes:
    secured(request, _CONTENT_TYPES["html"])
    return page


class Page(Resource):
    """A dashboard page: served to a logged-in browser, else 401 and the login form."""

    isLeaf = True

    def __init__(self, login, page: bytes):
        super().__init__()
        self._login = login
        self._page = page

    def render_GET(self, request):
        if not self._login.admitted(request):
            request.setResponseCode(401)
            return html(request, LOGIN_PAGE)
        return html(request, self._page)


class RunPages(Resource):
    """C{/runs/<run_id>}: one run's page (the run id is read by its script)."""

    def __init__(self, page: Resource):
        super().__init__()
        self._page = page

    def getChild(self, path, request):
        return self._page


class Assets(Resource):
    """C{/static/<name>}: the scripts and stylesheet (code, no run data)."""

    def __init__(self, names):
        super().__init__()
        self._assets = {name.encode(): asset(name) for name in names}

    def getChild(self, path, request):
        if path not in self._assets:
            return Resource.getChild(self, path, request)
        return _Asset(self._assets[path], path)


class _Asset(Resource):
    isLeaf = True

    def __init__(self, content: bytes, name: bytes):
        super().__init__()
        self._content = content
        self._type = _CONTENT_TYPES[name.rsplit(b".", 1)[1].decode()]

    def render_GET(self, request):
        secured(request, self._type)
        return self._content
