"""car-twisted: the CAR daemon's agent-run-tracing service on Twisted."""

#: The one place the version is kept (setup.py reads it from here).
__version__ = "0.1.0"
