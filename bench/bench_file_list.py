"""
Benchmark (not a test) of the file store holding many runs, printing for a
store of 100 runs and one of C{--runs} (spread over C{--agents} agents, one
run in 1,000 left open): the time C{FileRunStore.open()} takes, the
process's RSS after it (and its peak), and the first C{list_runs} page (50
runs, newest first) for every agent's runs, for one agent's and with a
status filter. Goals (issue 15): open within 10 s, RSS within 256 MiB, the
large store's first page within 2x of the small one's.

Each store is written straight in the store's layout (per-agent
``.index`` and one run file per run, as the store itself writes them) and
opened by the real code in a fresh process, so RSS is that process's alone.

Usage: python bench/bench_file_list.py [--runs 1000000] [--agents 1000]
Everything lives in a temporary directory removed at the end (about 4.5 GB
at a million runs: a run file takes a file-system block); writing it takes
about a minute here, removing it a few.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

from car_twisted.store import naming  # noqa: E402
from car_twisted.store.runfiles import encode_line  # noqa: E402

#: About one run in this many is left open (a stored population after a
#: restart has few), spread over the agents.
OPEN_EVERY = 1001
ENDINGS = [
    ("completed", {"termination": "outcome", "outcome": {"status": "success"}}),
    ("incomplete", {"termination": "incomplete", "reason": "connection closed"}),
    ("cancelled", {"termination": "cancelled", "reason": "bench"}),
]


def stamp(seq: int) -> str:
    """A distinct, increasing RFC 3339 time for run C{seq}."""
    seconds, millis = divmod(seq, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_767_225_600 + seconds)) + f".{millis:03d}Z"


def generate(data_dir: str, runs: int, agents: int) -> None:
    """
    Write C{runs} runs in the file store's layout, started in turn by
    C{agents} agents: a ``started`` and (but one in L{OPEN_EVERY}) an
    ``ended`` record each, and each agent's index.
    """
    root = os.path.join(data_dir, naming.RUNS)
    indexes = []
    for n in range(agents):
        agent_id = f"agent-{n:05d}"
        os.makedirs(os.path.join(root, naming.encode_name(agent_id)), mode=0o700)
        indexes.append([encode_line({"agent_id": agent_id})])
    for seq in range(runs):
        agent = seq % agents
        agent_id = f"agent-{agent:05d}"
        run_id = f"{seq:08x}-0000-7000-8000-000000000000"
        started_at = stamp(seq)
        lines = [
            encode_line(
                {
                    "record": "started",
                    "run_id": run_id,
                    "agent_id": agent_id,
                    "client_id": "bench",
                    "intent": "bench intent",
                    "outcome_description": None,
                    "started_at": started_at,
                }
            )
        ]
        index = indexes[agent]
        index.append(encode_line({"start": run_id, "intent": "bench intent", "started_at": started_at}))
        if seq % OPEN_EVERY:
            status, ending = ENDINGS[seq % len(ENDINGS)]
            ended_at = stamp(seq + 500)
            lines.append(encode_line({"record": "ended", **ending, "ended_at": ended_at}))
            index.append(
                encode_line(
                    {
                        "end": run_id,
                        "ended_at": ended_at,
                        "status": status,
                        "outcome_status": ending.get("outcome", {}).get("status"),
                        "turn_count": 0,
                    }
                )
            )
        path = os.path.join(root, naming.encode_name(agent_id), naming.encode_name(run_id) + naming.RUN_SUFFIX)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"".join(lines))
        os.close(fd)
    for n, lines in enumerate(indexes):
        with open(os.path.join(root, naming.encode_name(f"agent-{n:05d}"), naming.INDEX), "wb") as f:
            f.write(b"".join(lines))


PROBE = """
import json, sys, time
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react
from car_twisted.store.file import FileRunStore
from latency import median_latency

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

async def main(reactor, data_dir, agent):
    before = rss()[0]
    store = FileRunStore(reactor, data_dir, "none")
    began, cpu = time.perf_counter(), time.process_time()
    await store.open()
    opened, cpu = time.perf_counter() - began, time.process_time() - cpu
    now, peak = rss()
    figures = {"open": opened, "open cpu": cpu, "rss": now, "peak": peak, "baseline": before}
    for label, agent_id, status in [("everyone", None, None), ("agent", agent, None), ("completed", None, "completed")]:
        page, _ = await store.list_runs(agent_id, None, 50, status)
        figures[label + " rows"] = len(page)
        figures[label] = await median_latency(lambda: store.list_runs(agent_id, None, 50, status), 200, 10)
    await store.close()
    print(json.dumps(figures))

react(lambda reactor: ensureDeferred(main(reactor, sys.argv[1], sys.argv[2])))
"""


def probe(data_dir: str, agent: str) -> dict:
    """Open the store in a fresh process: its figures."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, data_dir, agent],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=os.path.dirname(BENCH),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(BENCH), BENCH])},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(runs: int, agents: int, keep: bool) -> None:
    directory = tempfile.mkdtemp(prefix="car-bench-file-")
    try:
        figures = {}
        # The small store: 100 runs of one agent and its neighbours, so a page is full.
        for size, spread in [(100, 1), (runs, agents)]:
            data_dir = os.path.join(directory, str(size))
            began = time.perf_counter()
            generate(data_dir, size, spread)
            print(f"wrote {size:,} runs of {spread:,} agents in {time.perf_counter() - began:.1f} s")
            figures[size] = probe(data_dir, "agent-00000")
            f = figures[size]
            print(
                f"{size:>9,} runs: open {f['open']:.2f} s ({f['open cpu']:.2f} s of CPU), RSS {f['rss'] / 2**20:.0f} MiB"
                f" (peak {f['peak'] / 2**20:.0f} MiB, {f['baseline'] / 2**20:.0f} MiB before open)",
                flush=True,
            )
        small, large = figures[100], figures[runs]
        for label in ("everyone", "agent", "completed"):
            print(
                f"list_runs first page, {label:9}: 100 runs {small[label] * 1e3:.3f} ms"
                f" ({small[label + ' rows']} rows), {runs:,} runs {large[label] * 1e3:.3f} ms"
                f" ({large[label + ' rows']} rows), ratio {large[label] / small[label]:.2f}"
            )
        print(f"bytes of RSS per run held after open: {(large['rss'] - small['rss']) / (runs - 100):.0f}", flush=True)
    finally:
        if keep:
            print(f"kept {directory}")
        else:
            print("removing the stores (a million files take minutes)", flush=True)
            shutil.rmtree(directory)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="runs of the large store")
    parser.add_argument("--agents", type=int, default=1000, help="agents of the large store")
    parser.add_argument("--keep", action="store_true", help="keep the stores (for profiling)")
    arguments = parser.parse_args()
    main(arguments.runs, arguments.agents, arguments.keep)
