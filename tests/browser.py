"""A headless chromium for the tests that look at pages as a reader's browser draws them (the
service's /docs, the HTML report): the command line, a DOM dump, and just enough of the Chrome
DevTools Protocol to run JavaScript in a page. Every host but 127.0.0.1 resolves to nothing, so a
page that needs the network fails as it would offline."""

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/system-deps.sh installs Debian's package)"
)


def chromium(profile: Path, *arguments: str) -> list[str]:
    return [
        str(CHROMIUM),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",  # as root (CI) chromium refuses to start with its sandbox
        f"--user-data-dir={profile}",  # a fresh profile: nothing cached from an earlier run
        # Any host but the server's resolves to nothing: a CDN asset would fail to load, as offline.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--no-first-run",
        *arguments,
    ]


def dump_dom(url: str, profile: Path) -> str:
    """The DOM once the page's scripts have run (virtual time: as long as they need, no longer)."""
    command = chromium(profile, "--virtual-time-budget=10000", "--dump-dom", url)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Page:
    """Just enough of the Chrome DevTools Protocol to run JavaScript in a page of a headless chromium."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.calls = 0

    def call(self, method: str, **params: object) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events arrive too; only the answer to this call matters
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> object:
        """The expression's value once truthy; an element found counts as true (it has no JSON value)."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(f"(v => v instanceof Node || v)({expression})")):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)
        return value


@contextmanager
def open_browser(directory: Path) -> Iterator[Page]:
    """A headless chromium to drive (DevTools on a free port, profile and log in `directory`),
    stopped by its PID afterwards."""
    log = directory / "chromium.log"
    with log.open("w") as out:
        command = chromium(directory / "profile", "--remote-debugging-port=0", "about:blank")
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        targets = httpx.get(f"http://127.0.0.1:{found.group(1)}/json/list", timeout=10).json()
        with connect(
            next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=None
        ) as socket:
            yield Page(socket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
