"""
The ``car-twisted`` command, for operators and supervisors.

``car-twisted agent-token AGENT_ID`` prints an agent's token from the daemon
secret; ``car-twisted dashboard`` the dashboard's login link;
``car-twisted runs list|show|tail`` read a running daemon's runs as the
host and ``runs prune`` deletes its old ended runs; ``car-twisted export``
writes ended runs out (docs/export.md). Tables for people, ``--json`` for
scripts.
"""

import argparse
import json
import os
import shlex
import sys
from urllib.parse import quote

from twisted.internet.defer import DeferredQueue
from twisted.internet.error import ConnectError
from twisted.internet.task import react

from car_twisted import __version__
from car_twisted.auth import (
    HOST_TOKEN_FILE,
    SECRET_ENV,
    TokenFileError,
    agent_token,
    daemon_secret,
    read_token,
)
from car_twisted.client import DEFAULT_URL, ConnectionClosed, DaemonClient, RemoteError
from car_twisted.data_dir import default_data_dir
from car_twisted.export import command as export_command
from car_twisted.interfaces import RUN_STATUSES, TURN_RECORDS
from car_twisted.limits import MAX_ID

#: Where the dashboard is when the daemon runs with its default --http.
DEFAULT_DASHBOARD_URL = "http://127.0.0.1:9101"
#: How many trace records one runs.get_trace call asks for.
TRACE_PAGE = 500
#: Runs per ``runs list`` page unless --limit says otherwise.
LIST_LIMIT = 50

_TERMINAL = frozenset(RUN_STATUSES) - {"in_progress"}


class CommandFailed(Exception):
    """The command cannot do what was asked; the message says why."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error here."""

    def error(self, message):
        self.exit(2, f"car-twisted: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="car-twisted", description="Operate a car-twisted run-tracing daemon.")
    top.add_argument("--version", action="version", version=f"car-twisted {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_dir = _Parser(add_help=False)
    data_dir.add_argument(
        "--data-dir", help="the daemon's data directory [default: $CAR_HOME or ~/.car]"
    )

    token = commands.add_parser(
        "agent-token", parents=[data_dir], help="print the token an agent authenticates with"
    )
    token.add_argument("agent_id", metavar="AGENT_ID")
    dashboard = commands.add_parser(
        "dashboard", parents=[data_dir], help="print the dashboard's login link (it holds the host token)"
    )
    dashboard.add_argument(
        "--url", default=DEFAULT_DASHBOARD_URL,
        help=f"the daemon's --http address [default: {DEFAULT_DASHBOARD_URL}]",
    )  # fmt: skip

    daemon = _Parser(add_help=False, parents=[data_dir])
    daemon.add_argument(
        "--url", help=f"the daemon's address [default: $CAR_DAEMON_URL or {DEFAULT_URL}]"
    )
    daemon.add_argument("--json", action="store_true", help="print JSON for scripts")
    runs = commands.add_parser("runs", help="read runs from a running daemon (as the host)")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    listing = runs_commands.add_parser("list", parents=[daemon], help="an agent's runs, newest first")
    listing.add_argument("agent_id", metavar="AGENT", nargs="?", help="[default: $CAR_AGENT_ID]")
    listing.add_argument("--limit", type=int, default=LIST_LIMIT, help=f"runs per page, 1 to 500 [{LIST_LIMIT}]")
    listing.add_argument("--status", choices=RUN_STATUSES)
    listing.add_argument("--cursor", help="the next_cursor of the previous page")
    show = runs_commands.add_parser("show", parents=[daemon], help="one run's trace")
    show.add_argument("run_id", metavar="RUN_ID")
    tail = runs_commands.add_parser(
        "tail", parents=[daemon], help="a run's trace, following it until it ends"
    )
    tail.add_argument("run_id", metavar="RUN_ID")
    prune = runs_commands.add_parser(
        "prune", parents=[daemon], help="delete ended runs older than some days (never open runs)"
    )
    prune.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    prune.add_argument("--dry-run", action="store_true", help="only count the runs it would delete")
    export_command.add_parser(commands, data_dir)
    return top


def main(argv=None) -> None:
    """The console entry point."""
    args = parser().parse_args(argv)
    if args.command == "agent-token":
        sys.exit(print_agent_token(args, os.environ, sys.stdout, sys.stderr))
    if args.command == "dashboard":
        sys.exit(print_dashboard_link(args, os.environ, sys.stdout, sys.stderr))
    if args.command == "export":
        data_dir = args.data_dir or default_data_dir(os.environ)
        sys.exit(export_command.export(args, os.environ, sys.stdout, sys.stderr, data_dir))
    react(_react_main, (args,))


async def _react_main(reactor, args):
    status = await run(reactor, args, os.environ, sys.stdout, sys.stderr)
    if status:
        raise SystemExit(status)


def print_agent_token(args, environ, out, err) -> int:
    """``car-twisted agent-token``: the exit status."""
    if not args.agent_id or len(args.agent_id) > MAX_ID:
        _fail(err, f"AGENT_ID must be 1 to {MAX_ID} characters")
        return 2
    data_dir = args.data_dir or default_data_dir(environ)
    try:
        secret = daemon_secret(data_dir, environ)
    except FileNotFoundError as e:
        _fail(
            err,
            f"no daemon secret at {e.filename} and ${SECRET_ENV} is not set; start the "
            f"daemon once (it creates the secret), or {_data_dir_hint(data_dir)}",
        )
        return 1
    except (TokenFileError, OSError) as e:
        _fail(err, str(e))
        return 1
    out.write(agent_token(secret, args.agent_id) + "\n")
    return 0


def print_dashboard_link(args, environ, out, err) -> int:
    """``car-twisted dashboard``: the exit status."""
    data_dir = args.data_dir or default_data_dir(environ)
    try:
        host_token = read_token(os.path.join(data_dir, HOST_TOKEN_FILE))
    except FileNotFoundError as e:
        err.write(
            f"car-twisted: no host token at {e.filename}; start the daemon once "
            "(it creates the token) or pass the daemon's --data-dir\n"
        )
        return 1
    except (TokenFileError, OSError) as e:
        err.write(f"car-twisted: {e}\n")
        return 1
    out.write(f"{args.url.rstrip('/')}/login?token={quote(host_token, safe='')}\n")
    return 0


async def run(reactor, args, environ, out, err) -> int:
    """``car-twisted runs ...`` against a running daemon: the exit status."""
    data_dir = args.data_dir or default_data_dir(environ)
    url = args.url or environ.get("CAR_DAEMON_URL") or DEFAULT_URL
    try:
        client = await _connect_as_host(reactor, url, data_dir)
        try:
            action = {"list": _list, "show": _show, "tail": _tail, "prune": _prune}[args.runs_command]
            return await action(client, args, environ, out, err)
        finally:
            await client.close()
    except CommandFailed as e:
        _fail(err, str(e))
    except RemoteError as e:
        hint = ""
        if e.code == -32001:
            hint = f"; {data_dir} has no host token: {_data_dir_hint(data_dir)}"
        _fail(err, f"the daemon refused: {e.message} ({e.code}){hint}")
    except (ConnectError, ConnectionClosed, ValueError) as e:
        _fail(err, f"cannot talk to the daemon at {url}: {e}")
    return 1


def _fail(err, message: str) -> None:
    """Write an error: always one line, whatever the message holds."""
    err.write(f"car-twisted: {_printable(message)}\n")


def _data_dir_hint(data_dir: str) -> str:
    return f"is {data_dir} the daemon's data dir? pass its --data-dir or set $CAR_HOME"


async def _connect_as_host(reactor, url, data_dir) -> DaemonClient:
    """
    A session authenticated as the host. Without a host token file (a
    ``--no-auth`` daemon has none) the session stays unauthenticated.
    """
    path = os.path.join(data_dir, HOST_TOKEN_FILE)
    try:
        host_token = read_token(path)
    except FileNotFoundError:
        host_token = None
    except (TokenFileError, OSError) as e:
        raise CommandFailed(str(e))
    client = await DaemonClient.connect(reactor, url)
    if host_token is not None:
        try:
            await client.call("session.auth", {"host_token": host_token})
        except RemoteError as e:
            await client.close()
            raise CommandFailed(
                f"the daemon refused the host token in {path}: {e.message} ({e.code}); "
                + _data_dir_hint(data_dir)
            )
        except BaseException:
            await client.close()
            raise
    return client


async def _list(client, args, environ, out, err) -> int:
    agent_id = args.agent_id or environ.get("CAR_AGENT_ID")
    if not agent_id:
        raise CommandFailed("name an AGENT (or set $CAR_AGENT_ID)")
    params = {"agent_id": agent_id, "limit": args.limit}
    if args.status:
        params["status"] = args.status
    if args.cursor:
        params["cursor"] = args.cursor
    page = await client.call("runs.list", params)
    if args.json:
        out.write(json.dumps(page, indent=2) + "\n")
        return 0
    runs = page.get("runs") or []
    if not runs:
        out.write(f"no runs for agent {_printable(agent_id)}\n")
    else:
        out.write(_table(
            ["RUN ID", "STATUS", "OUTCOME", "TURNS", "STARTED", "ENDED", "INTENT"],
            [
                [
                    r.get("run_id"),
                    r.get("status"),
                    r.get("outcome_status") or "-",
                    r.get("turn_count"),
                    r.get("started_at"),
                    r.get("ended_at") or "-",
                    _clip(r.get("intent"), 60),
                ]
                for r in runs
            ],
        ))
    if page.get("next_cursor"):
        out.write(f"more: {_next_page_command(args, agent_id, page['next_cursor'])}\n")
    return 0


async def _prune(client, args, environ, out, err) -> int:
    answer = await client.call(
        "runs.prune", {"older_than_days": args.older_than, "dry_run": args.dry_run}
    )
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
    elif args.dry_run:
        out.write(
            f"{_printable(answer.get('prunable'))} runs ended before "
            f"{_printable(answer.get('ended_before'))} would be pruned\n"
        )
    else:
        out.write(
            f"pruned {_printable(answer.get('pruned'))} runs ended before "
            f"{_printable(answer.get('ended_before'))}\n"
        )
    return 0


def _next_page_command(args, agent_id: str, cursor: str) -> str:
    """The ``runs list`` command for the next page: this one's options, the new cursor."""
    words = ["car-twisted", "runs", "list", agent_id]
    for option, value in (
        ("--status", args.status),
        ("--limit", args.limit if args.limit != LIST_LIMIT else None),
        ("--url", args.url),
        ("--data-dir", args.data_dir),
        ("--cursor", cursor),
    ):
        if value is not None:
            words += [option, str(value)]
    return " ".join(shlex.quote(_printable(word)) for word in words)


async def _trace(client, run_id, start=0, stop=None) -> tuple:
    """The run's agent and its records from C{start} (to C{stop}), all pages."""
    agent_id, records = None, []
    cursor = start
    while stop is None or cursor < stop:
        limit = TRACE_PAGE if stop is None else min(TRACE_PAGE, stop - cursor)
        page = await client.call("runs.get_trace", {"run_id": run_id, "cursor": cursor, "limit": limit})
        if page.get("not_found"):
            raise CommandFailed(
                f"no run {_printable(run_id)} (unknown, or not readable with this token)"
            )
        agent_id = page.get("agent_id")
        batch = page.get("records") or []
        records.extend(batch)
        if not batch or type(page.get("cursor")) is not int or page["cursor"] <= cursor:
            break
        cursor = page["cursor"]
    return agent_id, records


async def _show(client, args, environ, out, err) -> int:
    agent_id, records = await _trace(client, args.run_id)
    if args.json:
        out.write(json.dumps({"run_id": args.run_id, "agent_id": agent_id, "records": records}, indent=2) + "\n")
        return 0
    started = records[0] if records else {}
    out.write(_table(
        None,
        [
            ["run", args.run_id],
            ["agent", agent_id],
            ["intent", _clip(started.get("intent"), 200)],
            ["status", _status_line(records)],
        ],
    ))
    out.write("records:\n")
    for record in records:
        out.write("  " + describe(record) + "\n")
    return 0


async def _tail(client, args, environ, out, err) -> int:
    """
    Print the trace, then follow it with ``runs.subscribe`` until the run
    ends. Cursors count turns (CAR's rule): the subscription's C{cursor} is
    the number of turns in its snapshot, a turn event's the count with its
    turn, the end's the count it ends with. A count ahead of the turns held
    means missed events, read back with ``runs.get_trace`` (turn k is
    record k + 1, after the started record).
    """
    events = DeferredQueue()
    client.on_notification = lambda method, params: (
        events.put(params)
        if method == "runs.trace.event" and params.get("run_id") == args.run_id
        else None
    )
    client.closed.addCallback(lambda _: events.put(None))
    emit = (lambda r: out.write(json.dumps(r) + "\n")) if args.json else (lambda r: out.write(describe(r) + "\n"))
    _, started = await _trace(client, args.run_id, 0, 1)
    subscription = await client.call("runs.subscribe", {"run_id": args.run_id})
    turns, held = subscription.get("turns_so_far"), subscription.get("cursor")
    if not isinstance(turns, list) or held != len(turns):
        raise CommandFailed("the daemon's runs.subscribe answer has no usable cursor")
    for record in started + turns:
        emit(record)
    status = subscription.get("status")
    if status in _TERMINAL:
        _, ended = await _trace(client, args.run_id, held + 1)
        for record in ended:
            emit(record)
    while status not in _TERMINAL:
        event = await events.get()
        if event is None:
            raise CommandFailed("the daemon closed the connection before the run ended")
        record, cursor = event.get("record"), event.get("cursor")
        if not isinstance(record, dict) or type(cursor) is not int:
            continue
        before = cursor - 1 if record.get("record") in TURN_RECORDS else cursor
        if before < held:
            continue
        if before > held:
            err.write(f"car-twisted: missed {before - held} event(s); reading them back\n")
            _, missed = await _trace(client, args.run_id, held + 1, before + 1)
            for missed_record in missed:
                emit(missed_record)
        emit(record)
        held, status = cursor, event.get("status")
    return 0


def describe(record: dict) -> str:
    """One trace record as one readable line."""
    kind = record.get("record")
    if kind == "started":
        return _line(record.get("started_at"), "started", f"intent: {_clip(record.get('intent'), 80)}")
    if kind == "turn":
        parts = [f"#{record.get('index')}"]
        for name in ("tool", "prompt", "output"):
            if record.get(name) not in (None, ""):
                parts.append(f"{name}: {_clip(record.get(name), 40)}")
        return _line(record.get("recorded_at"), "turn", "  ".join(parts))
    if kind == "model_turn":
        return _line(
            record.get("recorded_at"),
            "model_turn",
            f"#{record.get('index')}  model: {_clip(record.get('model_id'), 40)}  "
            f"text: {_clip(record.get('assistant_text'), 40)}",
        )
    if kind == "ended":
        termination = record.get("termination")
        if termination == "outcome":
            outcome = record.get("outcome") if isinstance(record.get("outcome"), dict) else {}
            detail = f"outcome {_clip(outcome.get('status'), 20)}: {_clip(outcome.get('summary'), 60)}"
        elif termination == "incomplete":
            detail = f"incomplete: {_clip(record.get('reason'), 60)}"
        else:
            detail = _clip(termination, 20)
        return _line(record.get("ended_at"), "ended", detail)
    return _line(None, _clip(kind, 12), _clip(json.dumps(record), 100))


def _status_line(records: list) -> str:
    last = records[-1] if records else {}
    if last.get("record") != "ended":
        return "in_progress"
    if last.get("termination") == "outcome" and isinstance(last.get("outcome"), dict):
        return f"completed ({_printable(last['outcome'].get('status'))})"
    return _printable(last.get("termination"))


def _line(stamp, kind, detail) -> str:
    return f"{_printable(stamp or '-'):<24}  {kind:<10}  {detail}"


def _table(header, rows) -> str:
    """Columns padded to their widest cell; every cell made printable."""
    cells = [[_printable(c) for c in row] for row in ([header] if header else []) + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in cells
    )


def _printable(value) -> str:
    """
    Text safe for a terminal: the daemon's data is whatever agents sent, so
    control characters (escape sequences included) are shown escaped.
    """
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _clip(value, width: int) -> str:
    text = _printable(value)
    return text if len(text) <= width else text[: width - 1] + "…"


if __name__ == "__main__":
    main()
