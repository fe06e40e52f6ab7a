"""A headless Chromium driven over the DevTools protocol through a pipe: no websocket library, no driver download.

Chromium started with `--remote-debugging-pipe` reads JSON commands on fd 3 and writes replies and events on fd 4,
each message ended by a NUL byte. `Chromium.open(url)` loads a page and returns a `Page` whose `evaluate` runs
JavaScript in it and returns the value.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class Chromium:
    def __init__(self, binary: str | None = None, width: int = 1200, height: int = 900):
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError(f"no Chromium found (tried {', '.join(CHROMIUM_NAMES)}); "
                                    "install Debian's `chromium` (`.ci/run` does when it is missing)")
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        commands_in, self._commands = os.pipe()  # we write commands, Chromium reads them on fd 3
        self._replies, replies_out = os.pipe()  # Chromium writes replies on fd 4, we read them

        def wire_fds():  # runs in the child before exec: put the pipe ends where Chromium expects them
            os.dup2(commands_in, 3)
            os.dup2(replies_out, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", f"--window-size={width},{height}", f"--user-data-dir={self.profile}",
             "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_in)
        os.close(replies_out)
        self._next_id = 0
        self._pending = b""

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        """Send one command and wait for its reply (events in between are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe (did it crash?)")
            self._pending += chunk
        message, self._pending = self._pending.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str, timeout: float = 60) -> "Page":
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        deadline = time.monotonic() + timeout
        # One expression, so that both conditions hold in the same document (not the blank one it starts from).
        while not page.evaluate("document.readyState === 'complete' && location.href !== 'about:blank'"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.05)
        return page

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._commands)
        os.close(self._replies)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    def __init__(self, browser: Chromium, session: str, target: str):
        self.browser, self.session, self.target = browser, session, target

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def close(self):
        self.browser.send("Target.closeTarget", {"targetId": self.target})
