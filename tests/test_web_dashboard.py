"""
The dashboard in a real headless Chromium against a real daemon process:
login, runs appearing and changing status live, a run's timeline growing
live, a dropped agent's run turning incomplete, hostile run content shown
as text; and what a browser without the cookie, or a page of another
origin, gets.

With C{CAR_SCREENSHOTS=DIR} the tests also save a screenshot of each page
in DIR (docs/ keeps them).
"""

import os

from twisted.trial import unittest

from car_twisted.auth import HOST_TOKEN_FILE, SECRET_FILE, agent_token
from tests.browser import BrowserThread, skip_reason
from tests.daemon_process import SOURCE_ROOT, DaemonProcess
from tests.support import SUCCESS_OUTCOME, RPCClient, private_dir
from tests.web_support import get, upgrade_headers

HOSTILE = "<img src=x onerror=alert(1)>"
MARKER = "window.carNotReloaded"


class Dashboard:
    """A daemon process with auth on, its agents, and a browser on its dashboard."""

    @classmethod
    async def start(cls, testcase, browser=True):
        self = cls()
        self.data_dir = private_dir(testcase)
        self.daemon = DaemonProcess("memory", self.data_dir, auth=True)
        testcase.addCleanup(self.daemon.kill)
        await self.daemon.start()
        self.url = f"http://127.0.0.1:{self.daemon.http_port}"
        self.secret = _read(os.path.join(self.data_dir, SECRET_FILE))
        self.host_token = _read(os.path.join(self.data_dir, HOST_TOKEN_FILE))
        if browser:
            self.browser = BrowserThread()
            testcase.addCleanup(self.browser.close)
        return self

    async def agent(self, agent_id: str) -> RPCClient:
        client = await RPCClient.connect(self.daemon.port)
        await client.call("session.auth", {"agent_id": agent_id, "token": agent_token(self.secret, agent_id)})
        return client

    def run(self, f, *args):
        """C{f(page, *args)} on the browser's thread."""
        return self.browser.run(f, *args)

    async def log_in(self):
        await self.run(log_in, self.url, self.host_token)


def _read(path):
    with open(path) as f:
        return f.read().strip()


def screenshot(page, name: str) -> None:
    """
    Save the page as DIR/dashboard-NAME.png when CAR_SCREENSHOTS=DIR is set
    (DIR relative to the source tree: trial runs in a directory of its own).
    """
    directory = os.environ.get("CAR_SCREENSHOTS")
    if directory:
        path = os.path.join(SOURCE_ROOT, directory, f"dashboard-{name}.png")
        page.screenshot(path=path, full_page=True)


# Browser steps: each runs on the browser's thread with the page.


def log_in(page, url, token):
    response = page.goto(url + "/")
    assert response.status == 401, response.status
    screenshot(page, "login")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")
    page.wait_for_selector('#connection[data-state="live"]')
    page.evaluate(MARKER + " = true")


def run_row(page, run_id, status):
    """Wait for the run's row to show C{status}; the page was not reloaded."""
    page.wait_for_selector(f'tr[data-run-id="{run_id}"][data-status="{status}"]')
    assert page.evaluate(MARKER) is True


def open_run(page, run_id):
    page.click(f'tr[data-run-id="{run_id}"] a')
    page.wait_for_selector('li[data-record="started"]')
    page.wait_for_selector('#connection[data-state="live"]')
    page.evaluate(MARKER + " = true")


def entries(page, kind, count):
    """Wait for C{count} timeline entries of C{kind}; their texts."""
    page.wait_for_function(
        "([kind, count]) => document.querySelectorAll(`li[data-record=\"${kind}\"]`).length === count",
        arg=[kind, count],
    )
    assert page.evaluate(MARKER) is True
    return page.locator(f'li[data-record="{kind}"]').all_inner_texts()


def run_status(page, status):
    page.wait_for_selector(f'#status[data-status="{status}"]')
    assert page.evaluate(MARKER) is True
    return page.inner_text("#header")


def counted(page, expected):
    """Wait for the last hour's counts by status to be C{expected}; their texts."""
    for status, count in expected.items():
        page.wait_for_selector(f'#counts li[data-status="{status}"] .count:text-is("{count}")')
    return page.locator("#counts .count").all_inner_texts()


def shown_rows(page, count):
    """Wait for C{count} run rows; their C{(run id, status)}."""
    page.wait_for_function("(count) => document.querySelectorAll('#runs tr').length === count", arg=count)
    rows = page.locator("#runs tr")
    return [(rows.nth(n).get_attribute("data-run-id"), rows.nth(n).get_attribute("data-status")) for n in range(count)]


def click_and_show(page, button, count):
    page.click(button)
    return shown_rows(page, count)


def filter_runs(page, agent, status, count):
    page.fill("#agent", agent)
    page.select_option("#status", status)
    page.click("#filter button[type=submit]")
    return shown_rows(page, count)


def go_home(page, url):
    page.goto(url + "/")
    page.wait_for_selector('#connection[data-state="live"]')
    page.evaluate(MARKER + " = true")


def hostile_page_state(page):
    """What the page made of hostile content: texts, images, dialogs."""
    return {
        "intent": page.inner_text("#intent"),
        "prompt": page.locator('li[data-record="turn"] dd').first.inner_text(),
        "images": page.locator("img").count(),
        "dialogs": list(page.dialogs),
    }


class DashboardBrowserTests(unittest.TestCase):
    skip = skip_reason()

    async def test_runs_appear_and_a_run_grows_live(self):
        """After logging in with the host token, a run an agent starts
        appears on the runs page without a reload; its page shows each turn
        and model turn as it is recorded, then the outcome; back on the runs
        page its row is completed, and a run another agent starts and
        completes changes status in place."""
        dashboard = await Dashboard.start(self)
        await dashboard.log_in()
        agent = await dashboard.agent("agent-a")
        run_id = (await agent.call("runs.start", {"intent": "summarise the quarterly report"}))["run_id"]
        await dashboard.run(run_row, run_id, "in_progress")
        await dashboard.run(open_run, run_id)
        await agent.call("runs.record_turns", {"run_id": run_id, "turns": [
            {"prompt": "list the files", "tool": "ls", "parameters": {"path": "reports/"}, "output": "q1.pdf q2.pdf q3.pdf"},
        ]})  # fmt: skip
        (turn,) = await dashboard.run(entries, "turn", 1)
        self.assertIn("reports/", turn)
        self.assertIn("q3.pdf", turn)
        await agent.call("runs.record_model_turn", {
            "run_id": run_id, "turn_index": 1, "model_id": "model-7b", "assistant_text": "Reading q3.pdf.",
            "token_usage": {"input": 812, "output": 64}, "duration_ms": 930,
        })  # fmt: skip
        (model_turn,) = await dashboard.run(entries, "model_turn", 1)
        self.assertIn("model-7b", model_turn)
        await agent.call("runs.record_turns", {"run_id": run_id, "turns": [
            {"prompt": "read q3.pdf", "tool": "cat", "output": "revenue up 12% " * 2000},
        ]})  # fmt: skip
        turns = await dashboard.run(entries, "turn", 2)
        self.assertIn("truncated", turns[1])
        await agent.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
        await dashboard.run(entries, "ended", 1)
        header = await dashboard.run(run_status, "completed")
        self.assertIn("did the thing", header)
        self.assertIn("agent-a", header)
        await dashboard.run(screenshot, "run")

        await dashboard.run(go_home, dashboard.url)
        await dashboard.run(run_row, run_id, "completed")
        other = await dashboard.agent("agent-b")
        second = (await other.call("runs.start", {"intent": "triage the inbox"}))["run_id"]
        await dashboard.run(run_row, second, "in_progress")
        await other.call("runs.complete", {"run_id": second, "outcome": SUCCESS_OUTCOME})
        await dashboard.run(run_row, second, "completed")
        dropped = await dashboard.agent("agent-c")
        third = (await dropped.call("runs.start", {"intent": "rebuild the search index"}))["run_id"]
        await dropped.drop()
        await dashboard.run(run_row, third, "incomplete")
        fourth = (await agent.call("runs.start", {"intent": "draft the release notes"}))["run_id"]
        await dashboard.run(run_row, fourth, "in_progress")
        counts = await dashboard.run(counted, {"in_progress": 1, "completed": 2, "incomplete": 1, "cancelled": 0})
        self.assertEqual(counts, ["1", "2", "1", "0"])
        await dashboard.run(screenshot, "runs")
        await agent.close()
        await other.close()

    async def test_pages_and_filters(self):
        """The runs page shows 25 runs a page, newest first, with Older and
        Newer; the agent and status filters narrow it."""
        dashboard = await Dashboard.start(self)
        agent = await dashboard.agent("agent-a")
        runs = []
        for n in range(27):
            run_id = (await agent.call("runs.start", {"intent": f"goal {n}"}))["run_id"]
            if n % 3 == 0:
                await agent.call("runs.complete", {"run_id": run_id, "outcome": SUCCESS_OUTCOME})
            runs.append((run_id, "completed" if n % 3 == 0 else "in_progress"))
        other = await dashboard.agent("agent-b")
        lone = (await other.call("runs.start", {"intent": "alone"}))["run_id"]
        await dashboard.log_in()
        newest = [(lone, "in_progress")] + runs[::-1]
        self.assertEqual(await dashboard.run(shown_rows, 25), newest[:25])
        self.assertEqual(await dashboard.run(click_and_show, "#older", 3), newest[25:])
        self.assertEqual(await dashboard.run(click_and_show, "#newer", 25), newest[:25])
        self.assertEqual(await dashboard.run(filter_runs, "agent-b", "", 1), [(lone, "in_progress")])
        completed = [row for row in newest if row[1] == "completed"]
        self.assertEqual(await dashboard.run(filter_runs, "agent-a", "completed", 9), completed)
        await agent.close()
        await other.close()

    async def test_dropped_agent_run_turns_incomplete_live(self):
        """When the producing agent's connection drops, its open run's page
        turns incomplete (after the grace window) without a reload."""
        dashboard = await Dashboard.start(self)
        await dashboard.log_in()
        agent = await dashboard.agent("agent-d")
        run_id = (await agent.call("runs.start", {"intent": "crawl the docs"}))["run_id"]
        await dashboard.run(run_row, run_id, "in_progress")
        await dashboard.run(open_run, run_id)
        await agent.drop()
        (ended,) = await dashboard.run(entries, "ended", 1)
        self.assertIn("connection closed", ended)
        await dashboard.run(run_status, "incomplete")

    async def test_hostile_content_is_shown_as_text(self):
        """An intent and a prompt of HTML with a script handler show as the
        literal text on both pages: no element is made, no script runs."""
        dashboard = await Dashboard.start(self)
        await dashboard.log_in()
        agent = await dashboard.agent("agent-e")
        run_id = (await agent.call("runs.start", {"intent": HOSTILE}))["run_id"]
        await agent.call("runs.record_turns", {"run_id": run_id, "turns": [{"prompt": HOSTILE}]})
        await dashboard.run(run_row, run_id, "in_progress")
        await dashboard.run(open_run, run_id)
        await dashboard.run(entries, "turn", 1)
        state = await dashboard.run(hostile_page_state)
        self.assertEqual(state, {"intent": HOSTILE, "prompt": HOSTILE, "images": 0, "dialogs": []})
        await agent.close()


class DashboardAccessTests(unittest.TestCase):
    async def test_pages_and_socket_need_the_cookie_and_this_origin(self):
        """Without the login cookie the pages answer 401 (with the login
        form) and /ws 401; with it, /ws from another origin (or none) is
        403. /healthz and /metrics stay open to monitoring."""
        dashboard = await Dashboard.start(self, browser=False)
        for path in ("/", "/runs/some-run", "/?status=completed"):
            code, _, body = await get(dashboard.url + path)
            self.assertEqual(code, 401, path)
            self.assertIn(b'name="token"', body)
        code, _, _ = await get(dashboard.url + "/ws", upgrade_headers(origin=dashboard.url))
        self.assertEqual(code, 401)
        code, headers, _ = await get(dashboard.url + "/login?token=" + dashboard.host_token)
        self.assertEqual(code, 303)
        (cookie,) = headers.getRawHeaders(b"Set-Cookie")
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"SameSite=strict", cookie)
        cookie = cookie.split(b";")[0].decode()
        code, headers, _ = await get(dashboard.url + "/", {"Cookie": cookie})
        self.assertEqual(code, 200)
        (policy,) = headers.getRawHeaders(b"Content-Security-Policy")
        self.assertIn(b"script-src 'self';", policy)
        self.assertNotIn(b"unsafe", policy)
        for origin in ("http://evil.example", "null", None):
            code, _, _ = await get(dashboard.url + "/ws", upgrade_headers(origin=origin, cookie=cookie))
            self.assertEqual(code, 403, origin)
        code, headers, body = await get(dashboard.url + "/login?token=not-the-host-token")
        self.assertEqual(code, 401)
        self.assertIn(b'<p id="failed" class="error">', body)
        self.assertIsNone(headers.getRawHeaders(b"Set-Cookie"))
        for path in ("/healthz", "/metrics"):
            code, _, _ = await get(dashboard.url + path)
            self.assertEqual(code, 200, path)
