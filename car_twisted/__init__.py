"""car-twisted: the CAR daemon's agent-run-tracing service on Twisted."""

__version__ = "0.1.0"
