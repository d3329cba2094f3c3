"""The page at `/` in headless Chromium: it connects, speaks, plays the PCM chunks through Web Audio, shows TTFB/RTF.

The page's autotest mode (`/?autotest=1&text=...&mode=read`) speaks on load and writes what it received and played
into `#result`; the test reads it over the Chrome DevTools protocol. Chromium comes from Debian's packages through
tests/setup_chromium.sh; if it cannot be installed the test is skipped with the reason, never silently.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from websockets.sync.client import connect

from omnivox.engine.types import SAMPLE_RATE

pytest_plugins = ("server_fixtures",)

SETUP = Path(__file__).parent / "setup_chromium.sh"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0"]


def chromium_binary() -> str:
    path = shutil.which("chromium")
    if path:
        return path
    result = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    path = shutil.which("chromium")
    if path is None:
        reason = (f"headless Chromium is not installed and {SETUP.name} could not install it "
                  f"(exit {result.returncode}): {(result.stderr or result.stdout).strip()[-300:]}")
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    return path


class Browser:
    """One headless Chromium with a fresh profile, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile: Path, url: str):
        self.profile = profile
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", url], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._id = 0

    def page_socket(self, url_prefix: str, timeout_s: float = 60):
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]!r}")
            if port_file.exists() and port_file.read_text().strip():
                port = int(port_file.read_text().split()[0])
                pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                         if t.get("type") == "page" and t.get("url", "").startswith(url_prefix)]
                if pages:
                    return connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
            time.sleep(0.1)
        raise AssertionError("chromium did not open the page within the timeout")

    def evaluate(self, ws, expression: str):
        self._id += 1
        ws.send(json.dumps({"id": self._id, "method": "Runtime.evaluate",
                            "params": {"expression": expression, "returnByValue": True}}))
        while True:
            reply = json.loads(ws.recv(timeout=30))
            if reply.get("id") == self._id:
                return reply["result"]["result"].get("value")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started
                self.proc.wait(timeout=10)


def test_page_plays_streamed_reply_in_headless_chromium(server, tmp_path):
    binary = chromium_binary()
    text = "The browser plays this sentence as it streams."
    url = f"{server.url}/?{urlencode({'autotest': 1, 'mode': 'read', 'text': text})}"
    browser = Browser(binary, tmp_path / "profile", url)
    try:
        with browser.page_socket(server.url) as ws:
            deadline = time.monotonic() + 90
            result = ""
            while not result and time.monotonic() < deadline:
                result = browser.evaluate(ws, "document.getElementById('result').textContent")
                time.sleep(0.2)
            assert result, "the page did not finish playing: " + str(browser.evaluate(ws, "document.body.innerText"))
            shown = browser.evaluate(ws, "[document.getElementById('ttfb').textContent, "
                                         "document.getElementById('rtf').textContent]")
    finally:
        browser.close()
    report = json.loads(result)
    print("page report:", {k: v for k, v in report.items() if k != "server_metrics"})
    assert report["error"] is None and report["finish_reason"] == "eos", report
    assert report["chunks"] >= 2 and report["samples"] > 0
    assert report["samples"] == round(report["server_metrics"]["audio_s"] * SAMPLE_RATE)
    assert report["played"] == report["chunks"], "every chunk was scheduled and played through Web Audio"
    assert report["audio_context"]["state"] == "running"
    assert report["audio_context"]["current_time"] >= report["samples"] / SAMPLE_RATE * 0.9
    assert report["ttfb_ms"] > 0 and report["rtf"] > 0 and report["transcript"] == text
    assert shown[0].endswith("ms") and shown[1] != "–"  # TTFB and RTF are on the page
    assert server.wait_idle()["live_requests"] == 0
