"""
Durable ``runs.start`` throughput of each store, over loopback: the daemon
in one process, the load generator (bench/load.py) in another, one round
per client count, every store in the same run. Prints starts/s and each
store's ratio to the baseline store (memory by default).

    .venv/bin/python bench/throughput.py [--stores file,memory] [--clients 1,50]
                                         [--seconds 2] [--repeat 3]

The stores take turns round after round and the median round counts, so
load from elsewhere on the machine falls on every store alike. Bounded:
each round lasts --seconds plus a warm-up; the daemons are stopped and their
data directories removed at the end.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.daemon_process import daemon_command, daemon_environment  # noqa: E402

LOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load.py")
_LISTENING = re.compile(r"car-twisted listening on .*port=(\d+)")


def start_daemon(store, data_dir, extra, log_path):
    log = open(log_path, "wb")
    process = subprocess.Popen(
        daemon_command(store, data_dir, *extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=daemon_environment(),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            match = _LISTENING.search(f.read().decode(errors="replace"))
        if match:
            return process, int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    with open(log_path, "rb") as f:
        raise RuntimeError(f"the {store} daemon did not start:\n{f.read().decode(errors='replace')}")


def drive(port, clients, seconds, agents):
    command = [sys.executable, LOAD, "--port", str(port), "--clients", str(clients), "--seconds", str(seconds)]
    if agents:
        command += ["--agents", str(agents)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode:
        raise RuntimeError(f"load generator failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="file,memory", help="comma-separated --store names")
    parser.add_argument("--baseline", default="memory", help="the store ratios are against")
    parser.add_argument("--clients", default="1,50", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per store and client count")
    parser.add_argument("--agents", type=int, default=0, help="distinct agent ids (0: one per client)")
    parser.add_argument("--data-parent", default=None, help="where the data directories go")
    parser.add_argument("--daemon-arg", action="append", default=[], help="extra daemon option (repeatable)")
    args = parser.parse_args()
    stores = args.stores.split(",")
    counts = [int(c) for c in args.clients.split(",")]
    rounds = {}
    daemons = {}
    try:
        for store in stores:
            data_dir = tempfile.mkdtemp(prefix=f"car-bench-{store}-", dir=args.data_parent)
            process, port = start_daemon(
                store, os.path.join(data_dir, "data"), args.daemon_arg, os.path.join(data_dir, "daemon.log")
            )
            daemons[store] = (process, port, data_dir)
        # Stores take turns, round after round, so a neighbour's load on
        # the machine falls on all of them alike.
        for clients in counts:
            for _ in range(args.repeat):
                for store in stores:
                    result = drive(daemons[store][1], clients, args.seconds, args.agents)
                    rounds.setdefault((store, clients), []).append(result["per_second"])
                    print(
                        f"{store:>8} {clients:>4} clients: {result['per_second']:>9.1f} starts/s"
                        f"  ({result['acks']} acks, {result['errors']} errors, {result['connected']} connected)",
                        flush=True,
                    )
    finally:
        for process, _, data_dir in daemons.values():
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            shutil.rmtree(data_dir)
    results = {key: statistics.median(values) for key, values in rounds.items()}
    print(f"median of {args.repeat} rounds of {args.seconds:g} s:")
    for (store, clients), value in results.items():
        print(f"{store:>8} {clients:>4} clients: {value:>9.1f} starts/s")
    if args.baseline in stores:
        for store in stores:
            if store == args.baseline:
                continue
            for clients in counts:
                ratio = results[store, clients] / results[args.baseline, clients]
                print(f"{store}/{args.baseline} at {clients:>3} clients: {ratio:.2f}")


if __name__ == "__main__":
    main()
