"""
Reading ended runs straight from a daemon's data directory, one run at a
time, for ``car-twisted export``: memory stays flat however many runs the
store holds.

Only ended runs are read: their records never change again, so reading
them beside a running daemon is safe (the file store's run files are read
without its lock; the SQLite database is opened read-only, a WAL reader).
"""

import json
import os
import sqlite3
from datetime import datetime, timezone

from car_twisted import disk
from car_twisted.store import naming, runfiles

#: The stores whose runs can be read offline (the memory store lives in the daemon).
OFFLINE_STORES = ("file", "sqlite")
#: Runs listed per SQLite query.
PAGE = 1000


def parse_time(text: str) -> str:
    """
    C{--since} / C{--until}: an RFC 3339 time or a date (UTC), in the form
    the records are stamped with, so stamps compare as strings.

    @raise ValueError: not a time.
    """
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    stamp = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def ended_runs(store: str, data_dir: str, agent=None, since=None, until=None):
    """
    An iterator over the records of every ended run in C{data_dir}'s
    C{store}, one list per run, optionally only C{agent}'s and those started
    in C{[since, until)} (stamps from L{parse_time}).

    @raise ValueError: C{store} cannot be read offline.
    @raise FileNotFoundError: the store holds nothing at C{data_dir}.
    """
    if store == "file":
        runs_dir = os.path.join(data_dir, naming.RUNS)
        if not os.path.isdir(runs_dir):
            raise FileNotFoundError(f"no file store at {runs_dir}")
        runs = _file_runs(runs_dir, agent)
    elif store == "sqlite":
        from car_twisted.store.sqlite import DATABASE_NAME

        path = os.path.join(data_dir, DATABASE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no SQLite store at {path}")
        runs = _sqlite_runs(path, agent, since, until)
    else:
        raise ValueError(
            f"the {store} store lives in the daemon's memory; only the "
            f"{' and '.join(OFFLINE_STORES)} stores can be exported"
        )
    return (
        records
        for records in runs
        if (since is None or records[0]["started_at"] >= since)
        and (until is None or records[0]["started_at"] < until)
    )


def _file_runs(runs_dir: str, agent):
    if agent is None:
        with os.scandir(runs_dir) as entries:
            agent_dirs = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
    else:
        agent_dirs = [os.path.join(runs_dir, naming.encode_name(agent))]
    for agent_dir in agent_dirs:
        try:
            entries = os.scandir(agent_dir)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(naming.RUN_SUFFIX):
                    continue
                try:
                    records = runfiles.read_run_file(entry.path).records
                except FileNotFoundError:
                    continue  # pruned since the directory was listed
                except disk.NotRegularFile:
                    continue  # the daemon never serves it either
                if _ended(records) and (agent is None or records[0].get("agent_id") == agent):
                    yield records


def _ended(records: list) -> bool:
    return (
        len(records) >= 2
        and records[0]["record"] == "started"
        and records[-1]["record"] == "ended"
        and isinstance(records[0].get("started_at"), str)
    )


def sqlite_page_query(agent, since, until):
    """
    The query listing the next C{PAGE} ended runs (their seqs) after a seq,
    its first argument, and its other arguments. An agent's runs are read
    in seq order from its index: SQLite would otherwise pick the ended
    runs' index, whose order is by status, and sort all the agent's runs
    for every page.
    """
    conditions, arguments = ["status != 'in_progress'", "seq > ?"], []
    for condition, value in (
        ("agent_id = ?", agent),
        ("started_at >= ?", since),
        ("started_at < ?", until),
    ):
        if value is not None:
            conditions.append(condition)
            arguments.append(value.encode("utf-8", "surrogatepass"))
    runs = "runs" if agent is None else "runs INDEXED BY runs_by_agent"
    query = f"SELECT seq FROM {runs} WHERE {' AND '.join(conditions)} ORDER BY seq LIMIT {PAGE}"
    return query, arguments


def _sqlite_runs(path: str, agent, since, until):
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        connection.execute("PRAGMA busy_timeout = 10000")
        query, arguments = sqlite_page_query(agent, since, until)
        after = 0
        while True:
            seqs = [seq for (seq,) in connection.execute(query, (after, *arguments))]
            for seq in seqs:
                records = [
                    json.loads(body)
                    for (body,) in connection.execute(
                        "SELECT body FROM records WHERE run = ? ORDER BY position", (seq,)
                    )
                ]
                if _ended(records):
                    yield records
            if len(seqs) < PAGE:
                return
            after = seqs[-1]
    finally:
        connection.close()
