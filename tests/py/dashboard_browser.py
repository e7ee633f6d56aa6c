#!/usr/bin/env python3
"""Drives Debian's chromium (headless, through chromedriver's W3C WebDriver
HTTP API, with nothing but the standard library) on a magicmx dashboard.

  dashboard_browser.py URL SCREENSHOT.png

Opens URL, waits until the page has loaded the node's JSON, checks that the
peers and blocks it shows are those of /status, clicks the Release button of
the first quarantined message, waits for the page to say it was released,
and saves a screenshot. Prints one JSON line with what it saw (the released
queue id among it); exits 1 with the reason on stderr when a check fails.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Driver:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        self.session = None

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            fail(f"webdriver {method} {path}: {e.code} {e.read()[:500]!r}")

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script, timeout=20, what="the page"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.js(script)
            if v:
                return v
            time.sleep(0.2)
        fail(f"timed out waiting for {what}")


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def main():
    url, screenshot = sys.argv[1], sys.argv[2]
    base = url.rstrip("/")
    chromedriver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    port = free_port()
    profile = tempfile.mkdtemp(prefix="magicmx-chromium-")
    proc = subprocess.Popen(
        [chromedriver, f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    driver = Driver(port)
    try:
        deadline = time.time() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    fail("chromedriver did not start")
                time.sleep(0.1)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            f"--user-data-dir={profile}",
                            "--window-size=1280,1100",
                        ],
                    },
                }
            }
        }
        value = driver.call("POST", "/session", caps)
        driver.session = value["sessionId"]
        driver.s("POST", "/url", {"url": url})
        driver.wait("return document.body.dataset.loaded === '1'", what="the first refresh")
        # Wait for a quarantined message to show (the demo's flood).
        driver.wait(
            "return document.querySelectorAll('button[data-release]').length > 0",
            what="a quarantined message",
        )
        shown = driver.js(
            """
            const rows = (sel, attr) => [...document.querySelectorAll(sel)].map((r) => r.getAttribute(attr));
            return {
              node: document.getElementById('node').textContent,
              peers: [...document.querySelectorAll('tr[data-peer]')].map((r) =>
                  [r.getAttribute('data-peer'), r.children[1].textContent]),
              blocks: rows('tr[data-block]', 'data-block'),
              quarantined: rows('button[data-release]', 'data-release'),
            };
            """
        )
        status = get_json(base + "/status")
        if shown["node"] != status["node"]:
            fail(f"node shown {shown['node']!r}, /status says {status['node']!r}")
        want_peers = sorted([p["name"], p["state"]] for p in status["peers"])
        if sorted(shown["peers"]) != want_peers:
            fail(f"peers shown {shown['peers']}, /status says {want_peers}")
        if not want_peers:
            fail("the node has no peers")
        want_blocks = sorted(b["block"] for b in status["hottest"])
        if sorted(shown["blocks"]) != want_blocks:
            fail(f"blocks shown {shown['blocks']}, /status says {want_blocks}")
        if not want_blocks:
            fail("no blocks shown")
        # Release the first quarantined message with its button.
        queue_id = shown["quarantined"][0]
        button = driver.s(
            "POST",
            "/element",
            {"using": "css selector", "value": f'button[data-release="{queue_id}"]'},
        )
        driver.s("POST", f"/element/{button[ELEMENT]}/click", {})
        message = driver.wait(
            "const t = document.getElementById('message').textContent;"
            " return t.includes('released') ? t : null",
            what="the release to be confirmed",
        )
        # The list is redrawn without it.
        driver.wait(
            f"return !document.querySelector('button[data-release=\"{queue_id}\"]')",
            what="the released message to leave the list",
        )
        png = base64.b64decode(driver.s("GET", "/screenshot"))
        with open(screenshot, "wb") as f:
            f.write(png)
        print(
            json.dumps(
                {
                    "peers": shown["peers"],
                    "blocks": shown["blocks"],
                    "released": queue_id,
                    "message": message,
                    "screenshot_bytes": len(png),
                }
            )
        )
    finally:
        if driver.session:
            try:
                driver.call("DELETE", f"/session/{driver.session}")
            except SystemExit:
                pass
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
