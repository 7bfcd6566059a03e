"""A headless Chromium driven over the Chrome DevTools protocol: open a page, evaluate JavaScript, type, screenshot.

Only what the documentation test needs, on Debian's ``chromium`` and the small ``websocket-client`` package
(no chromedriver, no browser download).
"""
from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

# The flags of a quiet, isolated run as root: no sandbox (root), no GPU, no network of its own, a fresh profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1280,900")
EXECUTABLES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> Optional[str]:
    """The path of an installed Chromium, or None."""
    return next((path for path in map(shutil.which, EXECUTABLES) if path), None)


class Chromium:
    """One headless browser with one page, closed on exit."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0) -> None:
        import websocket  # websocket-client, in the dev extra

        self.timeout = timeout
        self.process = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._port(profile / "DevToolsActivePort")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.ids = itertools.count(1)
        self.send("Page.enable")

    def _port(self, port_file: Path) -> int:
        """Chromium writes the port it chose into the profile once it listens."""
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode} before it listened")
            lines = port_file.read_text().splitlines() if port_file.is_file() else []
            if lines and lines[0].isdigit():
                return int(lines[0])
            time.sleep(0.1)
        raise TimeoutError(f"chromium did not write {port_file} within {self.timeout} s")

    def send(self, method: str, **params: Any) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are skipped)."""
        call = next(self.ids)
        self.socket.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{what}: `{expression}` stayed false for {self.timeout} s")

    def open(self, url: str) -> None:
        """Navigate and wait until the page and its scripts have loaded."""
        self.send("Page.navigate", url=url)
        self.wait_for(f"location.href.startsWith({json.dumps(url.split('#')[0])}) && "
                      "document.readyState === 'complete'", f"loading {url}")

    def type_text(self, text: str) -> None:
        """Type into the focused element, one key at a time (keydown, the character, keyup)."""
        for char in text:
            self.send("Input.dispatchKeyEvent", type="keyDown", text=char, key=char)
            self.send("Input.dispatchKeyEvent", type="keyUp", key=char)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the visible page."""
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
