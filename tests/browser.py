"""Headless Chromium driven over the DevTools protocol through a pipe (--remote-debugging-pipe), for page tests.

Only the standard library: the browser reads NUL-terminated JSON commands on its fd 3 and writes replies and
events on its fd 4.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    """The Chromium binary; skips the test with the reason where there is none, fails under CI (``CI=true``)."""
    path = find_chromium()
    if path is None:
        reason = "no Chromium found (apt-get install chromium) for the viewer's page tests"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + "; CI must provide it", pytrace=False)
        pytest.skip(reason)
    return path


def _above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium with one page of `width` x `height` CSS pixels (device scale 1)."""

    def __init__(self, binary: str, *, width: int = 1200, height: int = 800, timeout: float = 60.0):
        self.timeout = timeout
        self._buffer = b""
        self._next_id = 0
        self.console: list[str] = []  # the page's console messages and uncaught exceptions
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        try:
            # the shell puts the browser's ends on the descriptors 3 and 4 that --remote-debugging-pipe uses;
            # moved above 9 first, so that neither is 3 or 4 already (the first redirection would overwrite the other)
            to_browser_r, from_browser_w = (_above_nine(fd) for fd in (to_browser_r, from_browser_w))
            args = [
                binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                f"--window-size={width},{height}", "--force-device-scale-factor=1", "about:blank",
            ]
            self._process = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "bash", *args],
                pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (self._to_browser, self._from_browser):
                os.close(fd)
            raise
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False, session=True)
            self.call("Page.enable", session=True)
            self.call("Runtime.enable", session=True)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *, session: bool = False, **params) -> dict:
        """Send one command (to the page's session when `session`) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("method") == "Runtime.consoleAPICalled":
                args = reply["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif reply.get("method") == "Runtime.exceptionThrown":
                self.console.append(str(reply["params"]["exceptionDetails"]))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            readable, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, session=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url, session=True)

    def wait_for(self, expression: str, *, timeout: float | None = None) -> None:
        """Poll until `expression` is truthy in the page."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                if self.evaluate(expression):
                    return
            except RuntimeError:  # the page is still loading
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression}")
            time.sleep(0.1)

    def screenshot(self, path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png", session=True)["data"])
        with open(path, "wb") as f:
            f.write(data)
        return data

    def close(self) -> None:
        """Ask the browser to close; kill it where it does not answer or does not exit within 10 s."""
        self.timeout = min(self.timeout, 10.0)
        try:
            self.call("Browser.close")
            self._process.wait(timeout=10)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
