"""
The benchmark suite: one command, every figure with its goal and ratio.

    .venv/bin/python bench/run.py                       # the default sections, about 4 minutes
    .venv/bin/python bench/run.py --sections stores     # one section
    .venv/bin/python bench/run.py --smoke               # every default section, tiny (seconds)

Each server (the daemon with a given store, or the plain Autobahn echo
server it is measured against) runs in its own process on an ephemeral
port of 127.0.0.1; the load comes from other processes (bench/wsload.py).
Everything is bounded in time and count; servers are stopped and their data
removed at the end. Not a test: it prints figures, nothing passes or fails.

Sections:
  throughput  runs.start/s, memory store against the echo server:
              50 connections x 1 in flight, 1 connection x 100 pipelined;
              server CPU per request, and the daemon's own work (memory
              minus echo CPU per request)
  latency     p50/p99 of sequential round trips, memory store and echo
  stores      durable runs.start/s of each of --stores (file, sqlite) against memory:
              1 and 50 connections x 1, 1 connection x 100 pipelined; server
              CPU per request
  sessions    RSS per idle session at --sessions connections, daemon and echo
  storm       --sessions sessions with an open run drop at once: time until
              all are ended incomplete, and the daemon's delayed calls left
  list        (not in the default run) SQLite list_runs at 100 vs --list-runs
              runs, via bench/bench_sqlite_list.py
  filelist    (not in the default run) the file store holding --list-runs runs:
              open time, RSS and list_runs against 100 runs, via
              bench/bench_file_list.py
  auth        (not in the default run) bench/auth_sessions.py
  export      (not in the default run) car-twisted export's peak RSS at 10k vs
              100k runs, SQLite and file stores, via bench/bench_export.py
  postgresql  (not in the default run) runs.start/s at 50 connections x 1 on the
              PostgreSQL store against memory, and two daemons on one database
              against one; PostgreSQL's CPU per start. Uses --dsn (or
              $CAR_DATABASE_URL), else starts a throwaway server (fsync on)
              with the machine's PostgreSQL binaries
"""

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import wsload  # noqa: E402

sys.path.insert(0, ROOT)
from tests import postgres_server  # noqa: E402

DEFAULT_SECTIONS = ["throughput", "latency", "stores", "sessions", "storm"]
EXTRA_SECTIONS = ["list", "filelist", "auth", "export", "postgresql"]
SECTION_METHODS = {"list": "sqlite_list", "filelist": "file_list"}
LISTEN = "tcp:0:interface=127.0.0.1:backlog=1024"
#: Descriptors and connections a server needs beyond one per held session
#: (its listener, log, data, the storm's watcher).
HEADROOM = 100
#: RSS per idle session the daemon should stay under (issue 15).
SESSION_GOAL_KIB = 10
_PORT = re.compile(rb"(?:car-twisted listening on .*port=|echo listening on port )(\d+)")


class Server:
    """A server process on 127.0.0.1 (the daemon, or the echo server)."""

    def __init__(self, name: str, command: list, workdir: str):
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )  # fmt: skip
        self.pid = self.process.pid
        self.port = self._wait_for_port()

    @classmethod
    def daemon(cls, name, store, workdir, extra=()):
        data_dir = os.path.join(workdir, f"{name}-data")
        command = [
            sys.executable, os.path.join(BENCH, "daemon_probe.py"), "-n", "--pidfile=",
            "car", "--no-auth", "--store", store, "--data-dir", data_dir, "--listen", LISTEN,
            "--http", "none", *extra,
        ]  # fmt: skip
        return cls(name, command, workdir)

    @classmethod
    def echo(cls, workdir):
        return cls("echo", [sys.executable, os.path.join(BENCH, "echo_server.py")], workdir)

    def log(self) -> bytes:
        with open(self.log_path, "rb") as f:
            return f.read()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = _PORT.search(self.log())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log().decode(errors='replace')}")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))

    def delayed_calls(self):
        """(count, {what: how many}) of the daemon's pending delayed calls."""
        seen = self.log().count(b"bench-probe delayed-calls")
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = re.findall(rb"bench-probe delayed-calls (\d+) (.*)", self.log())
            if len(lines) > seen:
                count, names = lines[-1]
                return int(count), json.loads(names)
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not report its delayed calls")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def load(mode: str, port: int, timeout: float, **options) -> dict:
    """Run bench/wsload.py in its own process; its last JSON line."""
    command = [sys.executable, os.path.join(BENCH, "wsload.py"), mode, "--port", str(port)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"load generator failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Suite:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.servers = {}
        self.figures = []  # (name, measured, goal, ratio)

    def server(self, name: str, store: str = None, extra=()) -> Server:
        """The named server, started on first use."""
        if name not in self.servers:
            if store is None:
                self.servers[name] = Server.echo(self.workdir)
            else:
                self.servers[name] = Server.daemon(name, store, self.workdir, [*extra, *self.args.daemon_arg])
        return self.servers[name]

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def figure(self, name, measured, goal="-", ratio="-") -> None:
        self.figures.append((name, measured, goal, ratio))

    def rate(self, server: Server, connections: int, depth: int) -> dict:
        args = self.args
        result = load(
            "throughput", server.port, timeout=args.warmup + args.seconds + 60,
            connections=connections, depth=depth, seconds=args.seconds, warmup=args.warmup,
            agents=args.agents, server_pid=server.pid,
        )  # fmt: skip
        print(
            f"  {server.name:>7} {connections:>3} conn x {depth:>3}: {result['per_second']:>9,.0f}/s"
            f"  errors {result['errors']}, server CPU {_us(result['server_cpu_us'])}/request,"
            f" CPU: server {result['server_cpu']:.2f}, load generator {result['client_cpu']:.2f} of a core",
            flush=True,
        )
        return result

    def rates(self, servers: list, shapes: list) -> dict:
        """
        Median answers/s per (server name, shape); servers take turns round
        after round, so load from elsewhere on the machine falls on all alike.
        """
        rounds = {}
        for connections, depth in shapes:
            for _ in range(self.args.repeat):
                for server in servers:
                    rounds.setdefault((server.name, connections, depth), []).append(
                        self.rate(server, connections, depth)
                    )
        return {key: Rate(results) for key, results in rounds.items()}

    # Sections

    def throughput(self) -> None:
        echo, memory = self.server("echo"), self.server("memory", "memory")
        shapes = [(50, 1), (1, 100)]
        medians = self.rates([echo, memory], shapes)
        for connections, depth in shapes:
            e, m = medians["echo", connections, depth], medians["memory", connections, depth]
            self.figure(
                f"runs.start {connections} conn x {depth}, memory store",
                f"{m} (echo {e})",
                ">= 0.85x echo",
                f"{m.per_second / e.per_second:.2f}x echo",
            )
            self.figure(
                f"  server CPU per request at {connections} conn x {depth}",
                f"memory {_us(m.cpu_us)} (echo {_us(e.cpu_us)})",
                "-",
                _ratio(m.cpu_us, e.cpu_us, "echo"),
            )
            self.figure(
                f"  daemon's own work at {connections} conn x {depth}",
                f"{_us(_minus(m.cpu_us, e.cpu_us))}/request",
                "<= 15 us",
                _ratio(_minus(m.cpu_us, e.cpu_us), 15, "goal"),
            )
            self.figure(
                f"  CPU at {connections} conn x {depth}, of one core",
                f"daemon {m.server_cpu:.2f}, echo {e.server_cpu:.2f}",
                "-",
                f"load gen {m.client_cpu:.2f} / {e.client_cpu:.2f}",
            )

    def latency(self) -> None:
        results = {}
        for server in (self.server("echo"), self.server("memory", "memory")):
            results[server.name] = result = load(
                "latency", server.port, timeout=120, count=self.args.count,
                warmup_count=min(200, self.args.count),
            )  # fmt: skip
            print(f"  {server.name:>7}: p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us,"
                  f" max {result['max_us']:.0f} us over {result['count']} round trips", flush=True)
        e, m = results["echo"], results["memory"]
        for p in ("p50", "p99"):
            self.figure(
                f"sequential runs.start round trip {p}, memory",
                f"{m[p + '_us']:.0f} us (echo {e[p + '_us']:.0f} us)",
                "-",
                f"{m[p + '_us'] / e[p + '_us']:.2f}x echo",
            )

    def stores(self) -> None:
        names = ["memory", *self.args.stores.split(",")]
        servers = [self.server(name, name) for name in names]
        shapes = [(1, 1), (50, 1), (1, 100)]
        medians = self.rates(servers, shapes)
        goals = {
            ("file", 50, 1): ">= 0.6x memory",
            ("file", 1, 100): ">= 0.5x memory",
            ("sqlite", 50, 1): ">= 0.7x memory",
        }
        for connections, depth in shapes:
            base = medians["memory", connections, depth]
            for name in names[1:]:
                value = medians[name, connections, depth]
                self.figure(
                    f"durable runs.start {connections} conn x {depth}, {name}",
                    f"{value} (memory {base})",
                    goals.get((name, connections, depth), "-"),
                    f"{value.per_second / base.per_second:.2f}x memory",
                )
                self.figure(
                    f"  server CPU per request, {name}",
                    f"{_us(value.cpu_us)} (memory {_us(base.cpu_us)})",
                    "-",
                    _ratio(value.cpu_us, base.cpu_us, "memory"),
                )

    def sessions(self) -> None:
        floor = None
        for server in (self.server("echo"), self._sessions_daemon()):
            per_session = self._rss_per_session(server)
            if server.name == "echo":
                floor = per_session
                self.figure(f"RSS per idle session, echo ({self.args.sessions:,})",
                            f"{per_session:.1f} KiB", "(the Autobahn floor)")  # fmt: skip
            else:
                self.figure(
                    f"RSS per idle session, daemon ({self.args.sessions:,})", f"{per_session:.1f} KiB",
                    f"<= {SESSION_GOAL_KIB} KiB",
                    f"{per_session / floor:.2f}x echo, {per_session / SESSION_GOAL_KIB:.2f}x goal",
                )  # fmt: skip

    def _rss_per_session(self, server: Server) -> float:
        count = self.args.sessions
        # Warm up first, so allocations done once per process are not counted.
        with Holder(server.port, max(50, count // 10)):
            pass
        before = server.rss_kib()
        with Holder(server.port, count):
            time.sleep(1.0)
            after = server.rss_kib()
        print(f"  {server.name:>8}: RSS {before:,} KiB -> {after:,} KiB with {count:,} idle sessions", flush=True)
        return (after - before) / count

    def storm(self) -> None:
        daemon = self._sessions_daemon()
        grace = self.args.grace if self.args.grace is not None else 0.25
        count = self.args.sessions
        agent = f"storm-{os.getpid()}-{time.monotonic_ns()}"
        holder = Holder(daemon.port, count, start=agent).__enter__()
        calls_before, _ = daemon.delayed_calls()
        dropped_at, dropped_wall, cpu = time.monotonic(), time.time(), wsload.cpu_seconds(daemon.pid)
        holder.kill()
        report = asyncio.run(_watch_storm(daemon.port, agent, count, dropped_at, cpu_of=daemon.pid))
        storm_cpu = report["cpu_at_all_ended"] - cpu
        calls_after, names = daemon.delayed_calls()
        last_end = report["last_ended_at"] - dropped_wall
        print(
            f"  {count:,} sessions dropped: the last run ended {last_end:.2f} s later (its ended_at; the"
            f" watcher saw none open {report['all_ended']:.2f} s later), daemon CPU meanwhile {storm_cpu:.2f} s"
            f" ({storm_cpu / count * 1e6:.0f} us a session); runs: {report['statuses']},"
            f" traces ending incomplete/'connection closed': {report['traces_ok']}"
            f"; delayed calls before {calls_before}, after {calls_after} {names}",
            flush=True,
        )
        # When the daemon ended the last run (its ended_at), not when the
        # watcher's poll saw it: the polls would otherwise be part of the load.
        extra = last_end - grace
        self.figure(
            f"drop storm, {count:,} open runs: all ended incomplete",
            f"grace + {extra:.2f} s ({report['statuses'].get('incomplete', 0):,} incomplete)",
            "grace + 2 s",
            f"{extra / 2:.2f}x allowance",
        )
        self.figure("  delayed calls left after the storm", f"{calls_after} (before the drop: {calls_before})", "0")

    def _sessions_daemon(self) -> Server:
        """The memory-store daemon of the sessions and storm sections: room for --sessions."""
        grace = [] if self.args.grace is None else ["--grace", str(self.args.grace)]
        return self.server("sessions", "memory", [*grace, "--max-connections", str(self.args.sessions + HEADROOM)])

    def sqlite_list(self) -> None:
        script = os.path.join(BENCH, "bench_sqlite_list.py")
        subprocess.run([sys.executable, script, "--runs", str(self.args.list_runs)], check=True, timeout=1800)

    def file_list(self) -> None:
        script = os.path.join(BENCH, "bench_file_list.py")
        subprocess.run([sys.executable, script, "--runs", str(self.args.list_runs)], check=True, timeout=1800)

    def auth(self) -> None:
        subprocess.run([sys.executable, os.path.join(BENCH, "auth_sessions.py")], check=True, timeout=600)

    def export(self) -> None:
        subprocess.run([sys.executable, os.path.join(BENCH, "bench_export.py")], check=True, timeout=1800)


    def postgresql(self) -> None:
        with postgres_database(self.args.dsn) as database:
            extra = ["--dsn", database.dsn]
            memory = self.server("memory", "memory")
            one = self.server("postgresql", "postgresql", extra)
            second = self.server("postgresql-2", "postgresql", extra)
            rounds = {"memory": [], "one": [], "two": [], "postgres_cpu": []}
            for _ in range(self.args.repeat):
                rounds["memory"].append(self.rate(memory, 50, 1))
                # Each round leaves its runs open; their ends must not weigh on the next.
                database.settle()
                before, began = database.cpu(), time.monotonic()
                rounds["one"].append(self.rate(one, 50, 1))
                if before is not None:
                    rounds["postgres_cpu"].append((database.cpu() - before) / (time.monotonic() - began))
                database.settle()
                rounds["two"].append(self.rate_together([one, second], 25))
                database.settle()
            base, value = Rate(rounds["memory"]), Rate(rounds["one"])
            two = statistics.median(rounds["two"])
            self.figure(
                "runs.start 50 conn x 1, postgresql",
                f"{value} (memory {base})",
                ">= 0.5x memory",
                f"{value.per_second / base.per_second:.2f}x memory",
            )
            self.figure(
                "  daemon CPU per 1,000 starts, postgresql",
                f"{1000 * value.server_cpu / value.per_second:.3f} s",
                "-",
                f"memory {1000 * base.server_cpu / base.per_second:.3f} s",
            )
            if rounds["postgres_cpu"]:
                cpu = statistics.median(rounds["postgres_cpu"])
                self.figure(
                    "  PostgreSQL CPU per 1,000 starts",
                    f"{1000 * cpu / value.per_second:.3f} s",
                    "-",
                    f"{cpu:.2f} of a core",
                )
            self.figure(
                "runs.start 2 daemons x 25 conn, one database",
                f"{two:,.0f}/s (one daemon x 50: {value.per_second:,.0f}/s)",
                "-",
                f"{two / value.per_second:.2f}x one daemon",
            )

    def rate_together(self, servers: list, connections: int) -> float:
        """Answers/s of C{connections} per server, all loaded at once."""
        args = self.args
        processes = [
            subprocess.Popen(
                [sys.executable, os.path.join(BENCH, "wsload.py"), "throughput", "--port", str(s.port),
                 "--connections", str(connections), "--depth", "1", "--seconds", str(args.seconds),
                 "--warmup", str(args.warmup), "--server-pid", str(s.pid)],
                stdout=subprocess.PIPE, text=True,
            )
            for s in servers
        ]  # fmt: skip
        results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in processes]
        total = sum(r["per_second"] for r in results)
        print(
            f"  {len(servers)} daemons x {connections} conn: {total:>9,.0f}/s  CPU: "
            + ", ".join(f"{r['server_cpu']:.2f}" for r in results),
            flush=True,
        )
        return total


class postgres_database:
    """
    A fresh database for the postgresql section, on --dsn's server or on a
    throwaway one (fsync on), dropped at the end.
    """

    def __init__(self, dsn):
        self._admin = dsn or os.environ.get("CAR_DATABASE_URL")
        self._stop = None
        self.dsn = None

    def __enter__(self):
        import psycopg

        if self._admin is None:
            self._admin, self._stop = postgres_server.start_server(fsync=True)
        self._name = f"car_bench_{os.getpid()}"
        with psycopg.connect(self._admin, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {self._name}")
        self.dsn = psycopg.conninfo.make_conninfo(self._admin, dbname=self._name)
        return self

    def settle(self, limit: float = 120) -> None:
        """Wait until no run is open (the daemons ended the last round's)."""
        import psycopg

        deadline = time.monotonic() + limit
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            while time.monotonic() < deadline:
                (count,) = connection.execute(
                    "SELECT count(*) FROM car_runs WHERE status = 'in_progress'"
                ).fetchone()
                if not count:
                    return
                time.sleep(0.2)
        raise RuntimeError("the daemons did not end the last round's runs")

    def cpu(self):
        """CPU seconds so far of the postgres user's processes, if the server is ours."""
        if self._stop is None:
            return None
        import pwd

        uid = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
        total = 0.0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def __exit__(self, *exc):
        import psycopg

        try:
            with psycopg.connect(self._admin, autocommit=True) as connection:
                connection.execute(f"DROP DATABASE {self._name} WITH (FORCE)")
        finally:
            if self._stop is not None:
                self._stop()


class Rate:
    """The median of throughput rounds, and the range they spanned."""

    def __init__(self, results: list):
        rates = [r["per_second"] for r in results]
        self.per_second = statistics.median(rates)
        self.low, self.high = min(rates), max(rates)
        self.client_cpu = statistics.median(r["client_cpu"] for r in results)
        self.server_cpu = statistics.median(r["server_cpu"] for r in results)
        #: Server CPU microseconds per answer (user + system, over the
        #: window); None if no round answered anything (a smoke round).
        measured = [r["server_cpu_us"] for r in results if r["server_cpu_us"] is not None]
        self.cpu_us = statistics.median(measured) if measured else None

    def __str__(self):
        spread = f" [{self.low:,.0f}-{self.high:,.0f}]" if self.low != self.high else ""
        return f"{self.per_second:,.0f}/s{spread}"


def _us(value) -> str:
    return "-" if value is None else f"{value:.1f} us"


def _minus(value, base):
    return None if value is None or base is None else value - base


def _ratio(value, base, name: str) -> str:
    # A smoke round can be shorter than one CPU clock tick of the server.
    return f"{value / base:.2f}x {name}" if value is not None and base else "-"


class Holder:
    """
    C{count} open sessions until left or killed, held by wsload ``hold``
    processes of at most L{PER_PROCESS} sessions each, so no process nears
    its open-file limit.
    """

    #: Sessions one load-generator process holds.
    PER_PROCESS = 5000

    def __init__(self, port: int, count: int, start: str = None):
        shares = [min(self.PER_PROCESS, count - n) for n in range(0, count, self.PER_PROCESS)]
        self.processes = []
        for share in shares:
            command = [sys.executable, os.path.join(BENCH, "wsload.py"), "hold", "--port", str(port),
                       "--connections", str(share)]  # fmt: skip
            if start:
                command += ["--start", start]
            self.processes.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )

    def __enter__(self):
        for process in self.processes:
            if not process.stdout.readline():
                self.kill()
                raise RuntimeError("a session holder failed before its sessions were open")
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.stdin.close()
        for process in self.processes:
            process.wait(timeout=120)

    def kill(self) -> None:
        """Drop every session at once: the kernel closes all their sockets."""
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()
            process.stdin.close()


async def _watch_storm(port: int, agent: str, count: int, dropped_at: float, cpu_of: int, limit: float = 120) -> dict:
    """
    Poll until no run of C{agent} is open, then read every run and trace.
    Each poll costs the daemon a scan of the agent's runs (the memory
    store's status filter), so it polls every 200 ms: the figure is the
    last run's C{ended_at}, the poll only says when to read them back.
    """
    watcher = await wsload.Connection.open(port)
    try:
        while True:
            page = await watcher.call("runs.list", {"agent_id": agent, "status": "in_progress", "limit": 1})
            if not page["runs"]:
                all_ended, cpu = time.monotonic() - dropped_at, wsload.cpu_seconds(cpu_of)
                break
            if time.monotonic() - dropped_at > limit:
                raise RuntimeError(f"runs still open {limit} s after the drop")
            await asyncio.sleep(0.2)
        runs, cursor = [], None
        while True:
            params = {"agent_id": agent, "limit": 500, **({"cursor": cursor} if cursor else {})}
            page = await watcher.call("runs.list", params)
            runs += page["runs"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        statuses = {}
        for run in runs:
            statuses[run["status"]] = statuses.get(run["status"], 0) + 1
        traces_ok, last_ended = 0, 0.0
        for chunk in range(0, len(runs), 500):
            traces = await asyncio.gather(
                *(watcher.call("runs.get_trace", {"run_id": r["run_id"]}) for r in runs[chunk : chunk + 500])
            )
            for trace in traces:
                ended = trace["records"][-1]
                if ended.get("termination") == "incomplete" and ended.get("reason") == "connection closed":
                    traces_ok += 1
                    stamp = datetime.fromisoformat(ended["ended_at"].replace("Z", "+00:00")).timestamp()
                    last_ended = max(last_ended, stamp)
        if len(runs) != count:
            raise RuntimeError(f"{count} runs were started, runs.list shows {len(runs)}")
        return {
            "all_ended": all_ended, "statuses": statuses, "traces_ok": traces_ok, "last_ended_at": last_ended,
            "cpu_at_all_ended": cpu,
        }  # fmt: skip
    finally:
        watcher.close()
        await asyncio.wait_for(watcher.closed, 10)


def machine() -> str:
    import autobahn
    import twisted

    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores, {model}, Linux {platform.release()}; Python {platform.python_version()},"
        f" Twisted {twisted.__version__}, Autobahn {autobahn.__version__}"
        f" (NVX {'on' if _nvx() else 'off'}); load generator: bench/wsload.py on asyncio"
    )


def _nvx() -> bool:
    from autobahn.websocket import USES_NVX

    return USES_NVX


def print_figures(figures: list) -> None:
    widths = [max(len(str(row[i])) for row in figures) for i in range(4)]
    header = ("figure", "measured", "goal", "ratio")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for row in [header, *figures]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help="comma-separated, from: " + ", ".join(DEFAULT_SECTIONS + EXTRA_SECTIONS))  # fmt: skip
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per throughput round")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per server and shape (median counts)")
    parser.add_argument("--stores", default="file,sqlite", help="durable stores measured against memory")
    parser.add_argument("--agents", type=int, default=0, help="distinct agent ids per round (0: one per connection)")
    parser.add_argument("--count", type=int, default=5000, help="sequential round trips (latency)")
    parser.add_argument("--sessions", type=int, default=5000, help="sessions (sessions, storm)")
    parser.add_argument("--grace", type=float, default=None, help="--grace of the sessions/storm daemon")
    parser.add_argument("--list-runs", type=int, default=1_000_000, help="runs of the large agent (list) or store (filelist)")
    parser.add_argument("--dsn", default=None, help="PostgreSQL server of the postgresql section [default: $CAR_DATABASE_URL, else a throwaway one]")
    parser.add_argument("--daemon-arg", action="append", default=[], help="extra daemon option (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="every default section, tiny and short")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.repeat, args.count, args.sessions = 0.2, 0.1, 1, 50, 20
    sections = args.sections.split(",")
    unknown = set(sections) - set(DEFAULT_SECTIONS + EXTRA_SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    fd_limit = wsload.raise_fd_limit()  # the servers inherit it: thousands of sessions
    if args.sessions + HEADROOM > fd_limit:
        parser.error(f"--sessions {args.sessions} needs {args.sessions + HEADROOM} open files per server,"
                     f" the hard limit here is {fd_limit}")  # fmt: skip
    print(f"machine: {machine()}", flush=True)
    workdir = tempfile.mkdtemp(prefix="car-bench-")
    suite = Suite(args, workdir)
    try:
        for section in sections:
            print(f"[{section}]", flush=True)
            getattr(suite, SECTION_METHODS.get(section, section))()
    finally:
        suite.stop()
        shutil.rmtree(workdir)
    if suite.figures:
        print()
        print_figures(suite.figures)


if __name__ == "__main__":
    main()
