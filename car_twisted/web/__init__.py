"""
The daemon's HTTP side (``--http``): health, Prometheus metrics and the
read-only dashboard, with its live data over a WebSocket at ``/ws``.
docs/dashboard.md describes what each path serves and who may see it.
"""
