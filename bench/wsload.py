"""
The benchmark's load generator: a lean WebSocket client on plain asyncio,
so the process that makes the load costs far less than the server it
measures. It speaks just what a JSON-RPC client needs of RFC 6455:
unfragmented text frames out, masked with the all-zero key (legal on the
wire: the server unmasks every frame all the same, the client skips the
XOR), and unfragmented text, ping and close frames in.

Run by bench/run.py, one mode per process; each prints JSON lines:

- C{throughput}: C{--connections} connections, each keeping C{--depth}
  requests in flight for C{--seconds} after C{--warmup}; answers per
  second, its own CPU and (with C{--server-pid}) the server's, over the
  measured window only: the server's as a share of a core and as CPU
  microseconds per answer (user + system time from /proc/PID/stat at the
  window's start and end, divided by the answers counted in it).
- C{latency}: one connection, C{--count} sequential round trips; p50/p99.
- C{hold}: opens C{--connections} idle connections, with C{--start} each
  also starts a run; prints C{{"ready": ...}} and keeps them until its
  standard input closes (or it is killed: the drop storm).
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import struct
import sys
import time

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO_MASK = b"\0\0\0\0"


def raise_fd_limit() -> int:
    """Raise the open-file limit to its hard limit (thousands of sockets)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def text_frame(payload: bytes) -> bytes:
    """A client text frame (FIN, masked with the zero key)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, 0x80 | n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return header + _ZERO_MASK + payload


def start_request(request_id: int, agent_id: str) -> bytes:
    return text_frame(
        b'{"jsonrpc":"2.0","id":%d,"method":"runs.start","params":{"agent_id":"%s","intent":"benchmark run"}}'
        % (request_id, agent_id.encode())
    )


class ProtocolViolation(Exception):
    """The server sent something this client does not speak."""


class Connection(asyncio.Protocol):
    """
    One WebSocket client connection. C{on_message(payload)} is called for
    every text message and may return frame bytes to send; the frames
    answered in one read go out in one write.
    """

    def __init__(self, on_message=None):
        loop = asyncio.get_running_loop()
        self.opened = loop.create_future()
        self.closed = loop.create_future()
        self.on_message = on_message
        self.transport = None
        self._buffer = bytearray()
        self._open = False
        self._key = base64.b64encode(os.urandom(16))
        self._calls = {}
        self._next_id = 0

    @classmethod
    async def open(cls, port: int, on_message=None) -> "Connection":
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(lambda: cls(on_message), "127.0.0.1", port)
        await connection.opened
        return connection

    def connection_made(self, transport):
        self.transport = transport
        port = transport.get_extra_info("peername")[1]
        transport.write(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (port, self._key)
        )

    def connection_lost(self, exc):
        error = exc or ConnectionError("the server closed the connection")
        if not self.opened.done():
            self.opened.set_exception(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data):
        buffer = self._buffer
        buffer += data
        if not self._open and not self._handshake(buffer):
            return
        out = []
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            size, start = second & 0x7F, 2
            if size == 126:
                if len(buffer) < 4:
                    break
                size, start = int.from_bytes(buffer[2:4], "big"), 4
            elif size == 127:
                if len(buffer) < 10:
                    break
                size, start = int.from_bytes(buffer[2:10], "big"), 10
            end = start + size
            if len(buffer) < end:
                break
            payload = bytes(buffer[start:end])
            del buffer[:end]
            opcode = first & 0x0F
            if first & 0x80 == 0 or second & 0x80 or opcode not in (1, 8, 9, 10):
                self.transport.abort()
                raise ProtocolViolation(f"unexpected frame header {first:#x} {second:#x}")
            if opcode == 1:
                frame = self.on_message(payload)
                if frame:
                    out.append(frame)
            elif opcode == 9:
                out.append(bytes((0x8A, 0x80 | len(payload))) + _ZERO_MASK + payload)
            elif opcode == 8:
                self.transport.write(b"\x88\x80" + _ZERO_MASK)
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out))

    def _handshake(self, buffer) -> bool:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buffer[:end]).decode("latin-1")
        del buffer[: end + 4]
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if not head.startswith("HTTP/1.1 101") or accept not in head:
            self.transport.abort()
            self.opened.set_exception(ProtocolViolation(f"handshake refused: {head.splitlines()[0]}"))
            return False
        self._open = True
        self.opened.set_result(self)
        return True

    def send(self, frame: bytes) -> None:
        self.transport.write(frame)

    def close(self) -> None:
        """Start the closing handshake; C{closed} fires when the socket is gone."""
        if not self.transport.is_closing():
            self.transport.write(b"\x88\x82" + _ZERO_MASK + b"\x03\xe8")

    async def call(self, method: str, params: dict):
        """A JSON-RPC request on a connection opened without C{on_message}."""
        if self.on_message is None:
            self.on_message = self._answered
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._calls[self._next_id] = future
        request = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params}
        self.send(text_frame(json.dumps(request).encode()))
        reply = await future
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def _answered(self, payload):
        reply = json.loads(payload)
        future = self._calls.pop(reply.get("id"), None)
        if future is not None and not future.done():
            future.set_result(reply)


async def open_many(port: int, count: int, on_message=None, parallel: int = 64) -> list:
    """Open C{count} connections, at most C{parallel} handshakes at a time."""
    gate = asyncio.Semaphore(parallel)

    async def one():
        async with gate:
            return await Connection.open(port, on_message)

    return await asyncio.gather(*(one() for _ in range(count)))


def cpu_seconds(pid=None) -> float:
    """User + system CPU seconds of this process, or of process C{pid}."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Counts answers, and only inside the measured window."""

    def __init__(self):
        self.measuring = False
        self.stopping = False
        self.answers = 0
        self.errors = 0


async def throughput(args) -> dict:
    meter = Meter()
    agents = args.agents or args.connections
    connections = []
    for n in range(args.connections):
        agent = f"bench-agent-{n % agents}"
        sent = [0]

        def on_message(payload, agent=agent, sent=sent):
            if meter.measuring:
                if b'"error"' in payload:
                    meter.errors += 1
                else:
                    meter.answers += 1
            if meter.stopping:
                return None
            sent[0] += 1
            return start_request(sent[0], agent)

        connections.append((Connection.open(args.port, on_message), agent, sent))
    opened = []
    for pending, agent, sent in connections:
        connection = await pending
        opened.append(connection)
        first = []
        for _ in range(args.depth):
            sent[0] += 1
            first.append(start_request(sent[0], agent))
        connection.send(b"".join(first))
    await asyncio.sleep(args.warmup)
    began, cpu, server_cpu = time.perf_counter(), cpu_seconds(), server_seconds(args)
    meter.measuring = True
    await asyncio.sleep(args.seconds)
    meter.measuring = False
    elapsed = time.perf_counter() - began
    cpu, server_cpu = cpu_seconds() - cpu, server_seconds(args) - server_cpu
    meter.stopping = True
    await close_all(opened)
    return {
        "connections": args.connections,
        "depth": args.depth,
        "answers": meter.answers,
        "errors": meter.errors,
        "seconds": round(elapsed, 3),
        "per_second": round(meter.answers / elapsed, 1),
        "client_cpu": round(cpu / elapsed, 3),
        "server_cpu": None if server_cpu is None else round(server_cpu / elapsed, 3),
        "server_cpu_us": (
            None if server_cpu is None or not meter.answers else round(server_cpu / meter.answers * 1e6, 2)
        ),
    }


def server_seconds(args):
    return None if args.server_pid is None else cpu_seconds(args.server_pid)


async def close_all(connections: list, timeout: float = 5.0) -> None:
    for connection in connections:
        connection.close()
    await asyncio.wait([c.closed for c in connections], timeout=timeout)
    for connection in connections:
        if not connection.closed.done():
            connection.transport.abort()


async def latency(args) -> dict:
    answered = asyncio.Event()
    connection = await Connection.open(args.port, lambda payload: answered.set())
    samples = []
    for n in range(args.warmup_count + args.count):
        answered.clear()
        began = time.perf_counter()
        connection.send(start_request(n, "bench-latency"))
        await answered.wait()
        if n >= args.warmup_count:
            samples.append(time.perf_counter() - began)
    await close_all([connection])
    samples.sort()

    def percentile(p):
        return round(samples[min(len(samples) - 1, int(len(samples) * p))] * 1e6, 1)

    return {"count": len(samples), "p50_us": percentile(0.50), "p99_us": percentile(0.99), "max_us": percentile(1.0)}


async def hold(args) -> None:
    connections = await open_many(args.port, args.connections)
    if args.start:
        starts = [c.call("runs.start", {"agent_id": args.start, "intent": "storm run"}) for c in connections]
        await asyncio.gather(*starts)
    emit({"ready": len(connections)})
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await close_all(connections)


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "latency", "hold"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--depth", type=int, default=1, help="requests in flight per connection")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--agents", type=int, default=0, help="distinct agent ids (0: one per connection)")
    parser.add_argument("--count", type=int, default=5000, help="round trips (latency)")
    parser.add_argument("--warmup-count", type=int, default=200)
    parser.add_argument("--start", metavar="AGENT_ID", help="hold: each connection starts a run as AGENT_ID")
    parser.add_argument("--server-pid", type=int, help="also report this process's CPU")
    args = parser.parse_args(argv)
    raise_fd_limit()
    if args.mode == "hold":
        asyncio.run(hold(args))
    else:
        emit(asyncio.run({"throughput": throughput, "latency": latency}[args.mode](args)))


if __name__ == "__main__":
    main()
