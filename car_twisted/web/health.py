"""
``/healthz`` and ``/metrics``: for operators' monitoring, served without
login (they carry no run content and no run or agent id).
"""

import json

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource

from car_twisted import __version__


class DaemonHealth:
    """
    Whether the daemon serves: not while it is stopping, nor while the run
    service's last store write failed (the next good write clears it).

    @param runs: the L{RunService}.
    @param stopping: C{f()}, true once the daemon is stopping.
    """

    def __init__(self, runs, store_name: str, stopping):
        self._runs = runs
        self._store_name = store_name
        self._stopping = stopping

    def report(self) -> tuple:
        """C{(healthy, body)}: the JSON ``/healthz`` answers with."""
        body = {
            "status": "ok",
            "version": __version__,
            "store": self._store_name,
            "sessions": len(self._runs.sessions),
            "open_runs": self._runs.open_run_count,
        }
        if self._stopping():
            body.update(status="unavailable", reason="the daemon is stopping")
        elif self._runs.store_failure is not None:
            body.update(status="unavailable", reason=f"the store cannot write: {self._runs.store_failure}")
        return body["status"] == "ok", body


class Health(Resource):
    """``GET /healthz``: 200 while healthy, else 503 with the reason."""

    isLeaf = True

    def __init__(self, health: DaemonHealth):
        super().__init__()
        self._health = health

    def render_GET(self, request):
        healthy, body = self._health.report()
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(body).encode()


class Metrics(Resource):
    """``GET /metrics``: the daemon's metrics in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics):
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self._metrics.exposition()
