"""``/healthz`` and ``/metrics`` of a daemon service, with real traffic."""

import errno
import json
import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from car_twisted import __version__
from tests.support import SUCCESS_OUTCOME, RPCClient, private_dir, wait_for
from tests.web_support import get, start_service


async def scrape(service) -> dict:
    """The metrics, parsed by prometheus_client's own parser: (name, labels) -> value."""
    code, headers, body = await get(service.http_url + "/metrics")
    assert code == 200, code
    assert headers.getRawHeaders(b"Content-Type")[0].startswith(b"text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class HealthTests(unittest.TestCase):
    async def test_healthz_reports_version_store_sessions_and_open_runs(self):
        """/healthz is 200 with the version, the store's name, the sessions
        connected and the runs open."""
        service = await start_service(self, "--store", "memory", "--no-auth", "--data-dir", private_dir(self))
        agent = await RPCClient.connect(service.port)
        await agent.call("runs.start", {"agent_id": "a", "intent": "x"})
        code, _, body = await get(service.http_url + "/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(
            json.loads(body),
            {"status": "ok", "version": __version__, "store": "memory", "sessions": 1, "open_runs": 1},
        )
        await agent.close()

    async def test_healthz_is_503_while_stopping(self):
        """Once the daemon begins to stop, /healthz answers 503 with the
        reason, while connections are still being closed."""
        service = await start_service(
            self, "--store", "memory", "--no-auth", "--data-dir", private_dir(self),
            "--close-handshake-timeout", "60",
        )  # fmt: skip
        client = await RPCClient.connect(service.port)
        # The client does not read, so the daemon's close waits on it.
        client.protocol.transport.pauseProducing()
        stopped = service.stopService()
        code, _, body = await get(service.http_url + "/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["reason"], "the daemon is stopping")
        self.assertFalse(stopped.called)
        client.protocol.transport.resumeProducing()
        await stopped

    async def test_healthz_is_503_while_the_store_cannot_write(self):
        """While the file store's commits fail (the disk is full), /healthz
        is 503 with the store's error and car_store_failing is 1; the next
        good commit makes both healthy again."""
        service = await start_service(self, "--store", "file", "--no-auth", "--data-dir", private_dir(self))
        agent = await RPCClient.connect(service.port)
        real_syncs = os.fsync, os.fdatasync

        def full_disk(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "fsync", full_disk)
        self.patch(os, "fdatasync", full_disk)
        refused = await agent.call_raw("runs.start", {"agent_id": "a", "intent": "x"})
        self.assertEqual(refused["error"]["code"], -32603)
        self.flushLoggedErrors(OSError)
        code, _, body = await get(service.http_url + "/healthz")
        self.assertEqual(code, 503)
        self.assertIn("the store cannot write: ", json.loads(body)["reason"])
        self.assertIn("No space left on device", json.loads(body)["reason"])
        self.assertEqual(value(await scrape(service), "car_store_failing"), 1)
        self.patch(os, "fsync", real_syncs[0])
        self.patch(os, "fdatasync", real_syncs[1])
        await agent.call("runs.start", {"agent_id": "a", "intent": "x"})
        code, _, _ = await get(service.http_url + "/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(value(await scrape(service), "car_store_failing"), 0)
        await agent.close()


class MetricsTests(unittest.TestCase):
    async def test_counters_move_with_traffic(self):
        """Sessions, frames, errors by code, runs started and ended by
        termination, open runs and the file store's commits all move with
        real traffic; no label carries a run or agent id."""
        service = await start_service(
            self, "--store", "file", "--durability", "none", "--no-auth", "--data-dir", private_dir(self),
            "--grace", "0",
        )  # fmt: skip
        before = await scrape(service)
        agent = await RPCClient.connect(service.port)
        run_id = (await agent.call("runs.start", {"agent_id": "agent-7", "intent": "x"}))["run_id"]
        await agent.call("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": "p"}]})
        await agent.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        self.assertEqual((await agent.call_raw("no.such.method"))["error"]["code"], -32601)
        agent.send_text("not json")
        self.assertEqual((await agent.receive())["error"]["code"], -32700)
        dropped = await RPCClient.connect(service.port)
        await dropped.call("runs.start", {"agent_id": "agent-8", "intent": "y"})
        during = await scrape(service)
        self.assertEqual(value(during, "car_sessions_connected") - value(before, "car_sessions_connected"), 2)
        self.assertEqual(value(during, "car_open_runs"), 1)
        await dropped.drop()
        await wait_for(lambda: service.runs.open_run_count == 0, "the dropped run to end")
        after = await scrape(service)

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(moved("car_frames_received_total"), 6)
        self.assertEqual(moved("car_frames_sent_total"), 6)
        self.assertEqual(moved("car_rpc_errors_total", code="-32601"), 1)
        self.assertEqual(moved("car_rpc_errors_total", code="-32700"), 1)
        self.assertEqual(moved("car_runs_started_total"), 2)
        self.assertEqual(moved("car_runs_ended_total", termination="outcome"), 1)
        self.assertEqual(moved("car_runs_ended_total", termination="incomplete"), 1)
        self.assertEqual(value(after, "car_open_runs"), 0)
        self.assertEqual(value(after, "car_grace_timers_pending"), 0)
        self.assertEqual(value(after, "car_sessions_connected"), 1)
        # Two starts, a turn, two ends: five writes in one or more commits.
        self.assertEqual(moved("car_store_commit_batch_size_sum"), 5)
        self.assertGreaterEqual(moved("car_store_write_seconds_count"), 1)
        self.assertEqual(moved("car_store_write_seconds_count"), moved("car_store_commit_batch_size_count"))
        labels = {label for (_, labelled) in after for label in labelled}
        self.assertFalse({value for _, value in labels} & {run_id, "agent-7", "agent-8"})
        await agent.close()

    async def test_grace_timers_pending(self):
        """A dropped producer's open run counts as a pending grace timer,
        and still as open, while its window lasts."""
        service = await start_service(
            self, "--store", "memory", "--no-auth", "--data-dir", private_dir(self), "--grace", "3600"
        )
        dropped = await RPCClient.connect(service.port)
        await dropped.call("runs.start", {"agent_id": "a", "intent": "x"})
        self.assertEqual(value(await scrape(service), "car_grace_timers_pending"), 0)
        await dropped.drop()
        await wait_for(lambda: service.runs.grace_timer_count == 1, "the grace timer")
        samples = await scrape(service)
        self.assertEqual((value(samples, "car_grace_timers_pending"), value(samples, "car_open_runs")), (1, 1))

    async def test_connections_refused_at_the_cap(self):
        """A connection refused at --max-connections is counted."""
        service = await start_service(
            self, "--store", "memory", "--no-auth", "--data-dir", private_dir(self), "--max-connections", "1"
        )
        first = await RPCClient.connect(service.port)
        with self.assertRaises(ConnectionError):
            await RPCClient.connect(service.port)
        self.assertEqual(value(await scrape(service), "car_connections_refused_total"), 1)
        await first.close()

    async def test_sqlite_commits_are_measured(self):
        """The SQLite store's commits move the write latency and batch size
        histograms too."""
        service = await start_service(self, "--store", "sqlite", "--no-auth", "--data-dir", private_dir(self))
        before = await scrape(service)
        agent = await RPCClient.connect(service.port)
        await agent.call("runs.start", {"agent_id": "a", "intent": "x"})
        after = await scrape(service)
        for name in ("car_store_commit_batch_size_sum", "car_store_write_seconds_count"):
            self.assertEqual(value(after, name) - value(before, name), 1, name)
        await agent.close()

    async def test_each_daemon_has_its_own_registry(self):
        """Two daemons in one process count apart."""
        first = await start_service(self, "--store", "memory", "--no-auth", "--data-dir", private_dir(self))
        second = await start_service(self, "--store", "memory", "--no-auth", "--data-dir", private_dir(self))
        agent = await RPCClient.connect(first.port)
        await agent.call("runs.start", {"agent_id": "a", "intent": "x"})
        self.assertEqual(value(await scrape(first), "car_runs_started_total"), 1)
        self.assertEqual(value(await scrape(second), "car_runs_started_total"), 0)
        await agent.close()
