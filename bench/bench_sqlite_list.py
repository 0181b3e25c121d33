"""
Benchmark (not a test) of the SQLite run store, printing figures:

1. the first page of C{list_runs} (50 runs, newest first) for an agent with
   100 runs and for one with 1,000,000 runs in the same database, with and
   without a status filter, and a page 500,000 runs deep. Goal: the large
   agent's first page within 2x of the small one's.
2. durable C{start_run} throughput at 1 and 50 concurrent starters, SQLite
   against the memory store, in process (no WebSocket), with the number of
   starts the SQLite writer committed per transaction.

Usage: python bench/bench_sqlite_list.py [--runs 1000000]
Everything lives in a temporary directory removed at the end (about 0.5 GB
at a million runs); the whole run takes about a minute here.
"""

import argparse
import os
import shutil
import sqlite3
import tempfile
import time

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react

from car_twisted.records import new_run_id, started_record
from car_twisted.store.memory import MemoryRunStore
from car_twisted.store.sqlite import DATABASE_NAME, SQLiteRunStore
from latency import median_latency

SMALL, LARGE = "agent-small", "agent-large"
STATUSES = ["completed", "incomplete", "cancelled", "in_progress"]


def bulk_load(path: str, large_runs: int, small_runs: int) -> None:
    """
    Write runs straight into the store's schema in one transaction: the
    large agent's runs with the small agent's spread evenly among them, a
    quarter in each status, each with its ``started`` record.
    """
    every = max(1, large_runs // small_runs)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")

    total = large_runs + small_runs

    def run_id(seq):
        return f"{seq:08x}-0000-7000-8000-000000000000"

    def runs():
        small = 0
        for seq in range(1, total + 1):
            if small < small_runs and seq % (every + 1) == 0:
                agent, small = SMALL, small + 1
            else:
                agent = LARGE
            status = STATUSES[seq % 4]
            yield (
                seq,
                run_id(seq).encode(),
                agent.encode(),
                b"bench intent",
                f"2026-01-01T00:00:00.{seq % 1000:03d}Z".encode(),
                None if status == "in_progress" else b"2026-01-01T00:01:00.000Z",
                status,
                "success" if status == "completed" else None,
            )

    db.executemany(
        "INSERT INTO runs (seq, run_id, agent_id, intent, started_at, ended_at,"
        " status, outcome_status, turn_count, record_count)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 1)",
        runs(),
    )
    db.executemany(
        "INSERT INTO records (run, position, body) VALUES (?, 0, ?)",
        (
            (seq, f'{{"record":"started","run_id":"{run_id(seq)}","intent":"bench intent"}}')
            for seq in range(1, total + 1)
        ),
    )
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


async def list_figures(reactor, directory: str, large_runs: int) -> None:
    data_dir = os.path.join(directory, "list")
    schema = SQLiteRunStore(data_dir, reactor)
    await schema.open()
    await schema.close()
    began = time.perf_counter()
    bulk_load(os.path.join(data_dir, DATABASE_NAME), large_runs, 100)
    size = os.path.getsize(os.path.join(data_dir, DATABASE_NAME))
    print(
        f"bulk-loaded {large_runs:,} + 100 runs in {time.perf_counter() - began:.1f} s"
        f" ({size / 2**20:.0f} MiB)"
    )
    store = SQLiteRunStore(data_dir, reactor)
    await store.open()
    try:
        page, _ = await store.list_runs(LARGE, None, 50, None)
        assert len(page) == 50 and page[0].agent_id == LARGE
        _, deep = await store.list_runs(LARGE, str(large_runs // 2), 50, None)
        assert deep is not None
        for label, status in [("no filter", None), ("status=completed", "completed")]:
            figures = {}
            for agent in (SMALL, LARGE):
                page, _ = await store.list_runs(agent, None, 50, status)
                latency = await median_latency(lambda: store.list_runs(agent, None, 50, status), 300, 20)
                figures[agent] = latency, len(page)
            (small, small_rows), (large, large_rows) = figures[SMALL], figures[LARGE]
            print(
                f"list_runs first page, {label:16}: 100 runs {small * 1e3:.3f} ms"
                f" ({small_rows} rows), {large_runs:,} runs {large * 1e3:.3f} ms"
                f" ({large_rows} rows), ratio {large / small:.2f}"
            )
        deep_latency = await median_latency(lambda: store.list_runs(LARGE, deep, 50, None), 300, 20)
        print(f"list_runs page {large_runs // 2:,} runs deep: {deep_latency * 1e3:.3f} ms")
        open_began = time.perf_counter()
        open_runs = await store.open_runs()
        print(
            f"open_runs: {len(open_runs):,} open runs in"
            f" {time.perf_counter() - open_began:.2f} s"
        )
    finally:
        await store.close()


async def start_rate(store, starters: int, per_starter: int) -> float:
    """Durable starts per second with C{starters} concurrent loops."""

    async def starter(n):
        for i in range(per_starter):
            await store.start_run(
                started_record(new_run_id(), f"agent-{n}", "bench", "bench intent", None)
            )

    began = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(starter(n)) for n in range(starters)])
    return starters * per_starter / (time.perf_counter() - began)


async def start_figures(reactor, directory: str) -> None:
    for starters, per_starter in [(1, 1000), (50, 100)]:
        memory = await start_rate(MemoryRunStore(), starters, per_starter)
        store = SQLiteRunStore(os.path.join(directory, f"starts-{starters}"), reactor)
        await store.open()
        try:
            commits = store.commits
            sqlite_rate = await start_rate(store, starters, per_starter)
            per_commit = starters * per_starter / (store.commits - commits)
        finally:
            await store.close()
        print(
            f"durable start_run, {starters:2} concurrent: memory {memory:,.0f}/s,"
            f" sqlite {sqlite_rate:,.0f}/s ({per_commit:.1f} starts per commit),"
            f" ratio {sqlite_rate / memory:.3f}"
        )


async def main(reactor, large_runs: int) -> None:
    directory = tempfile.mkdtemp(prefix="car-bench-sqlite-")
    try:
        await start_figures(reactor, directory)
        await list_figures(reactor, directory, large_runs)
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="runs of the large agent")
    arguments = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments.runs)))
