"""
The file store's own CPU per durable write, without sockets or the daemon:
N writers in process, each starting a run and ending its previous one (what
a `runs.start` on a session that already produced a run costs the store),
on a real reactor with the store's disk threads; CPU per start-and-end of
the reactor thread and of the disk threads, user and system time, read
from /proc/self/task over the measured window.

    .venv/bin/python bench/file_store_cpu.py                 # 50 writers, 3 s, under $TMPDIR
    .venv/bin/python bench/file_store_cpu.py --writers 1 --dir /dev/shm
"""

import argparse
import os
import shutil
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from car_twisted.records import ended_record, new_run_id, started_record
from car_twisted.store.file import FileRunStore

TICK = os.sysconf("SC_CLK_TCK")


def thread_times() -> dict:
    """Thread id -> (user, system) seconds of this process's threads."""
    times = {}
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        times[int(task)] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return times


async def measure(args) -> None:
    data_dir = tempfile.mkdtemp(prefix="file-store-cpu-", dir=args.dir)
    try:
        await run_writers(args, data_dir)
    finally:
        shutil.rmtree(data_dir)


async def run_writers(args, data_dir: str) -> None:
    store = FileRunStore(reactor, data_dir)
    await store.open()
    batches = []
    store.on_commit = lambda writes, seconds: batches.append(writes)
    done, running = [0], [True]

    async def writer(agent_id):
        previous = None
        while running[0]:
            run_id = new_run_id()
            started = store.start_run(started_record(run_id, agent_id, "bench", "benchmark run", None))
            if previous is not None:
                store.end_run(previous, ended_record("incomplete", reason="connection closed"))
            await started
            previous = run_id
            done[0] += 1

    writers = [defer.ensureDeferred(writer(f"agent-{i}")) for i in range(args.writers)]
    await deferLater(reactor, 0.5, lambda: None)
    before, began, count, batch_count = thread_times(), time.monotonic(), done[0], len(batches)
    await deferLater(reactor, args.seconds, lambda: None)
    after, seconds = thread_times(), time.monotonic() - began
    count, sizes = done[0] - count, batches[batch_count:]
    running[0] = False
    await defer.gatherResults(writers)
    await store.close()
    reactor_user = reactor_system = disk_user = disk_system = 0.0
    for task, (user, system) in after.items():
        user0, system0 = before.get(task, (0.0, 0.0))
        if task == os.getpid():
            reactor_user, reactor_system = user - user0, system - system0
        else:
            disk_user, disk_system = disk_user + user - user0, disk_system + system - system0
    us = 1e6 / count
    print(
        f"{args.writers} writers: {count / seconds:,.0f} start-and-ends/s,"
        f" {len(sizes) / seconds:,.0f} batches/s of {sum(sizes) / max(len(sizes), 1):.1f} writes"
    )
    print(f"  reactor thread: user {reactor_user * us:.1f} us, system {reactor_system * us:.1f} us")
    print(f"  disk threads:   user {disk_user * us:.1f} us, system {disk_system * us:.1f} us")
    total = (reactor_user + reactor_system + disk_user + disk_system) * us
    print(f"  CPU per start-and-end: {total:.1f} us")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", default=None, help="where the store's directory is made")
    args = parser.parse_args()
    outcome = []
    d = defer.ensureDeferred(measure(args))
    d.addBoth(outcome.append)
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()


if __name__ == "__main__":
    main()
