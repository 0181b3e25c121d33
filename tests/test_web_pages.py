"""The dashboard's pages and scripts as shipped: no inline script, and run
content reaches the page as text only."""

import re
from importlib.resources import files

from twisted.trial import unittest

STATIC = files("car_twisted.web").joinpath("static")


def shipped(suffix: str) -> dict:
    return {p.name: p.read_text() for p in STATIC.iterdir() if p.name.endswith(suffix)}


class ShippedPagesTests(unittest.TestCase):
    def test_no_inline_script(self):
        """Every script is a file of this origin: no inline script, no
        event-handler attribute, nothing from another host (the CSP would
        refuse them anyway)."""
        pages = shipped(".html")
        self.assertEqual(sorted(pages), ["login.html", "run.html", "runs.html"])
        for name, page in pages.items():
            for tag in re.findall(r"<script[^>]*>", page):
                self.assertRegex(tag, r'src="/static/[a-z]+\.js"', name)
            self.assertNotRegex(page, r"\son[a-z]+\s*=", name)
            self.assertNotRegex(page, r"(src|href)=\"(https?:)?//", name)

    def test_scripts_never_write_html(self):
        """The scripts never turn text into markup: no innerHTML,
        outerHTML, insertAdjacentHTML, document.write or eval."""
        scripts = shipped(".js")
        self.assertEqual(sorted(scripts), ["rpc.js", "run.js", "runs.js"])
        for name, script in scripts.items():
            self.assertNotRegex(
                script, r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function", name
            )
