"""
Benchmark (not a test) of ``car-twisted export``: peak RSS of the command
exporting 10,000 and then 100,000 ended runs (JSON Lines to /dev/null) from
the SQLite and the file store. Goal: flat memory, the 100k figure within a
few MiB of the 10k one, because the command holds one run at a time.

Usage: python bench/bench_export.py [--runs 100000] [--small 10000]
The runs (a started record, two turns, an ended record each) are written
straight into each store's format; everything lives in a temporary
directory removed at the end.
"""

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

from car_twisted.records import ended_record, started_record
from car_twisted.store import naming, runfiles
from car_twisted.store.sqlite import DATABASE_NAME, open_database

AGENTS = 10
OUTCOME = {"status": "success", "summary": "done", "evidence": [], "metrics": {}, "timestamp": "t"}


def run_records(n: int) -> list:
    run_id = f"{n:08x}-0000-7000-8000-000000000000"
    started = started_record(run_id, f"agent-{n % AGENTS}", "c", f"goal {n}", None)
    turns = [
        {"record": "turn", "tool": "shell", "prompt": "p" * 200, "output": "o" * 400,
         "recorded_at": started["started_at"], "index": i}
        for i in range(2)
    ]  # fmt: skip
    return [started, *turns, ended_record("outcome", outcome=OUTCOME)]


def blob(text: str) -> bytes:
    return text.encode()


def fill_sqlite(data_dir: str, first: int, last: int) -> None:
    path = os.path.join(data_dir, DATABASE_NAME)
    open_database(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    for n in range(first, last):
        records = run_records(n)
        started = records[0]
        seq = db.execute(
            "INSERT INTO runs (run_id, agent_id, intent, started_at, ended_at, status,"
            " outcome_status, turn_count, record_count) VALUES (?, ?, ?, ?, ?, 'completed', 'success', 2, 4)",
            (blob(started["run_id"]), blob(started["agent_id"]), blob(started["intent"]),
             blob(started["started_at"]), blob(records[-1]["ended_at"])),
        ).lastrowid  # fmt: skip
        db.executemany(
            "INSERT INTO records (run, position, body) VALUES (?, ?, ?)",
            [(seq, i, runfiles.encode_line(r).decode()) for i, r in enumerate(records)],
        )
    db.execute("COMMIT")
    db.close()


def fill_file(data_dir: str, first: int, last: int) -> None:
    runs_dir = os.path.join(data_dir, naming.RUNS)
    os.makedirs(runs_dir, exist_ok=True)
    for n in range(first, last):
        records = run_records(n)
        agent_dir = os.path.join(runs_dir, naming.encode_name(records[0]["agent_id"]))
        os.makedirs(agent_dir, exist_ok=True)
        path = os.path.join(agent_dir, naming.encode_name(records[0]["run_id"]) + naming.RUN_SUFFIX)
        with open(path, "wb") as f:
            f.write(b"".join(runfiles.encode_line(r) for r in records))


def export_peak_rss(store: str, data_dir: str) -> tuple:
    """Run the command to /dev/null: (its peak RSS in MiB, seconds)."""
    command = [
        sys.executable, "-m", "car_twisted.cli", "export", "--store", store,
        "--data-dir", data_dir, "--format", "jsonl", "--out", "/dev/null",
    ]  # fmt: skip
    began = time.monotonic()
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - began
    if status != 0:
        raise SystemExit(f"export failed: {process.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="car-bench-export-")
    try:
        print(f"{'store':<8} {'runs':>8} {'peak RSS':>10} {'seconds':>8} {'runs/s':>8}")
        for store, fill in (("sqlite", fill_sqlite), ("file", fill_file)):
            data_dir = os.path.join(workdir, store)
            os.makedirs(data_dir)
            done = 0
            for count in (args.small, args.runs):
                fill(data_dir, done, count)
                done = count
                rss, seconds = export_peak_rss(store, data_dir)
                print(f"{store:<8} {count:>8,} {rss:>7.1f} MiB {seconds:>8.1f} {count / seconds:>8,.0f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
