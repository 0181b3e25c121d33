"""
The HTTP side's resource tree: which path serves what.
"""

from twisted.web.server import Site

from car_twisted.web.health import Health, Metrics
from car_twisted.web.live import LiveSocket
from car_twisted.web.login import Login
from car_twisted.web.pages import Assets, Page, RunPages, asset

ASSETS = ("dashboard.css", "favicon.svg", "rpc.js", "runs.js", "run.js")


class DashboardSite(Site):
    """A L{Site} that shows no tracebacks and keeps no access log."""

    displayTracebacks = False

    def log(self, request):
        """Nothing: a ``/login`` URL carries the host token."""


def dashboard_site(login, health, metrics, live_factory) -> DashboardSite:
    """
    C{/} the runs page, C{/runs/<run_id>} a run's page, C{/login},
    C{/static/...}, C{/ws} (served by C{live_factory}), C{/healthz},
    C{/metrics}.
    """
    root = Page(login, asset("runs.html"))
    root.isLeaf = False
    root.putChild(b"", root)
    root.putChild(b"runs", RunPages(Page(login, asset("run.html"))))
    root.putChild(b"login", Login(login))
    root.putChild(b"static", Assets(ASSETS))
    root.putChild(b"ws", LiveSocket(login, live_factory))
    root.putChild(b"healthz", Health(health))
    root.putChild(b"metrics", Metrics(metrics))
    return DashboardSite(root)
