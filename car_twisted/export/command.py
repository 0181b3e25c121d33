"""
``car-twisted export``: every ended run of a data directory (or a filtered
part) as JSON Lines or to an OTLP collector, one run in memory at a time.

It reads the store's files directly, not through the daemon: the wire has
no way to enumerate agents, and ended runs never change, so reading them
beside a running daemon is safe (docs/export.md).
"""

import sqlite3
import time

from car_twisted.export.source import OFFLINE_STORES, ended_runs, parse_time


def add_parser(commands, data_dir_parent) -> None:
    """The ``export`` subcommand's arguments."""
    export = commands.add_parser(
        "export", parents=[data_dir_parent], help="export ended runs as JSON Lines or to OTLP"
    )
    export.add_argument("--store", choices=OFFLINE_STORES, default="file", help="the daemon's --store [file]")
    export.add_argument("--agent", help="only this agent's runs")
    export.add_argument("--since", help="only runs started at or after this time (RFC 3339 or a date, UTC)")
    export.add_argument("--until", help="only runs started before this time")
    export.add_argument("--format", choices=("jsonl", "otlp"), required=True)
    export.add_argument("--out", help="jsonl: the file to write [default: standard output]")
    export.add_argument(
        "--otlp-endpoint",
        help="otlp: the collector's base URL [default: $OTEL_EXPORTER_OTLP_ENDPOINT]",
    )
    export.add_argument("--otlp-content", action="store_true", help="otlp: include prompt and output text")


class Progress:
    """Runs exported so far on one terminal line, only if C{err} is a terminal."""

    INTERVAL = 0.25

    def __init__(self, err, clock=time.monotonic):
        self._err = err if err.isatty() else None
        self._clock = clock
        self._shown = None
        self.count = 0

    def advance(self) -> None:
        self.count += 1
        if self._err is not None and (self._shown is None or self._clock() - self._shown >= self.INTERVAL):
            self._shown = self._clock()
            self._err.write(f"\rexported {self.count} runs")
            self._err.flush()

    def done(self) -> None:
        if self._err is not None:
            self._err.write(f"\rexported {self.count} runs\n")


def export(args, environ, out, err, data_dir) -> int:
    """Run ``car-twisted export`` on C{data_dir}: the exit status."""
    # Here, not at the top: every car-twisted command loads this module,
    # and only export needs the OpenTelemetry SDK.
    from car_twisted.export.jsonl import JsonlSink
    from car_twisted.export.otlp import SpanBatches, otlp_exporter, traces_endpoint

    try:
        since = None if args.since is None else parse_time(args.since)
        until = None if args.until is None else parse_time(args.until)
    except ValueError:
        err.write("car-twisted: --since and --until take an RFC 3339 time or a date (2026-01-31)\n")
        return 2
    if args.format == "jsonl" and args.otlp_endpoint:
        err.write("car-twisted: --otlp-endpoint goes with --format otlp\n")
        return 2
    if args.format == "otlp":
        if args.out:
            err.write("car-twisted: --out goes with --format jsonl\n")
            return 2
        try:
            endpoint = traces_endpoint(args.otlp_endpoint, environ)
        except ValueError as e:
            err.write(f"car-twisted: {e}\n")
            return 2
        if endpoint is None:
            err.write("car-twisted: --format otlp needs --otlp-endpoint or $OTEL_EXPORTER_OTLP_ENDPOINT\n")
            return 2
    stream = None
    try:
        runs = ended_runs(args.store, data_dir, args.agent, since, until)
        if args.format == "otlp":
            sink = SpanBatches(otlp_exporter(endpoint), args.otlp_content)
        elif args.out:
            stream = open(args.out, "w", encoding="ascii")
            sink = JsonlSink(stream)
        else:
            sink = JsonlSink(out)
        progress = Progress(err)
        try:
            for records in runs:
                sink.write(records)
                progress.advance()
        finally:
            sink.close()
            progress.done()
    except (ValueError, OSError, sqlite3.Error) as e:
        err.write(f"car-twisted: cannot export from {data_dir}: {e}\n")
        return 1
    finally:
        if stream is not None:
            stream.close()
    if sink.failed:
        err.write(f"car-twisted: the collector did not take {sink.failed} spans\n")
        return 1
    return 0

