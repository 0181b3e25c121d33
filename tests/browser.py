"""
Browser tests' support: Debian's headless Chromium driven by Playwright's
sync API, on a thread of its own so trial's and pytest's reactor keeps
running while the browser waits.

Nothing here downloads a browser: Chromium is the system's
(C{/usr/bin/chromium}, which C{.ci/run} installs when it is missing).
Outside CI (C{CI} unset) the browser tests skip when it or Playwright is
missing; under CI they fail instead.
"""

import os
import queue
import shutil
import tempfile
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
#: Milliseconds a page gets to show what a test waits for.
WAIT_MS = 15000


def missing() -> str:
    """Why the browser tests cannot run here, or the empty string."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"
    return ""


def skip_reason() -> str:
    """The reason to skip the browser tests, or None to run them (always under CI)."""
    if os.environ.get("CI") == "true":
        return None
    return missing() or None


class BrowserThread:
    """
    A headless Chromium with a fresh profile, driven on one thread:
    C{await browser.run(f, *args)} calls C{f(page, *args)} there.
    """

    def __init__(self):
        self._calls = queue.Queue()
        self._profile = tempfile.mkdtemp(prefix="car-twisted-chromium-")
        self._thread = threading.Thread(target=self._loop, name="car-twisted-browser", daemon=True)
        self._thread.start()

    def _loop(self):
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            try:
                context = playwright.chromium.launch_persistent_context(
                    self._profile,
                    executable_path=CHROMIUM,
                    headless=True,
                    args=CHROMIUM_ARGS,
                    viewport={"width": 1200, "height": 800},
                )
            except BaseException:
                # Every call fails with why the browser did not start.
                failed = Failure()
                self._serve(lambda f, args: failed.raiseException())
                return
            context.set_default_timeout(WAIT_MS)
            page = context.pages[0] if context.pages else context.new_page()
            #: Every JavaScript dialog the page opened (none should open).
            page.dialogs = []
            page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
            self._serve(lambda f, args: f(page, *args))
            context.close()

    def _serve(self, call):
        while True:
            queued = self._calls.get()
            if queued is None:
                return
            f, args, d = queued
            try:
                result = call(f, args)
            except BaseException:
                reactor.callFromThread(d.errback, Failure())
            else:
                reactor.callFromThread(d.callback, result)

    def run(self, f, *args) -> Deferred:
        d = Deferred()
        self._calls.put((f, args, d))
        return d

    async def close(self):
        """Close the browser and remove its profile."""
        self._calls.put(None)
        from twisted.internet.threads import deferToThread

        await deferToThread(self._thread.join)
        shutil.rmtree(self._profile, True)
