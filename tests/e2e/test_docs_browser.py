"""/docs and /redoc rendered by a real browser (Debian's chromium, headless) from a real uvicorn, with
every other host unreachable: the operations appear, so the pages need nothing but the service; and
Swagger UI's "Try it out" on POST /score, with the example it shows, answers 200."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from .test_server import Server, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/system-deps.sh installs Debian's package)"
)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    s = start_server(tiny_bundle, tmp_path_factory.mktemp("docs-server") / "server.log")
    yield s
    s.process.terminate()  # this server's PID only
    try:
        s.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        s.process.kill()
        s.process.wait()


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


def render(server: Server, page: str, profile: Path) -> str:
    """The DOM once the page's scripts have run (virtual time: as long as they need, no longer)."""
    command = chromium(profile, "--virtual-time-budget=10000", "--dump-dom", f"{server.base}{page}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_render_every_operation_offline(server, tmp_path, page):
    dom = render(server, page, tmp_path / "profile")
    # Summaries of /score, the Open Inference Protocol's infer and the other groups: the document was
    # fetched and drawn by the locally served script, not just the bare HTML shell.
    for text in ("Score rows", "Infer: score the rows of input", "Prometheus metrics", "Model metadata"):
        assert text in dom, (page, text, dom[-2000:])
    for tag in ("scoring", "operations", "admin", "Open Inference Protocol (V2)"):
        assert tag in dom, (page, tag)


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


@pytest.fixture()
def browser(tmp_path):
    """A headless chromium to drive (DevTools on a free port), stopped by its PID afterwards."""
    log = tmp_path / "chromium.log"
    with log.open("w") as out:
        command = chromium(tmp_path / "profile", "--remote-debugging-port=0", "about:blank")
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


def test_try_it_out_on_score_answers_200_in_the_browser(server, browser):
    """What a reader does: open POST /score, "Try it out", "Execute" with the example as it is."""
    browser.call("Page.navigate", url=f"{server.base}/docs")
    score = (
        "[...document.querySelectorAll('.opblock-post')]"
        ".find(op => op.querySelector('.opblock-summary-path')?.dataset.path === '/score')"
    )
    browser.wait_for(score)
    browser.evaluate(f"{score}.querySelector('.opblock-summary-control').click()")
    browser.wait_for(f"{score}.querySelector('.try-out__btn')")
    browser.evaluate(f"{score}.querySelector('.try-out__btn').click()")
    browser.wait_for(f"{score}.querySelector('.execute')")
    browser.evaluate(f"{score}.querySelector('.execute').click()")
    status = browser.wait_for(
        f"{score}.querySelector('.live-responses-table tbody .response-col_status')?.textContent.trim()"
    )
    url = browser.evaluate(f"{score}.querySelector('.request-url pre')?.textContent")
    assert str(status).startswith("200"), (status, url)
    assert url == f"{server.base}/score"  # no query parameter sent with the JSON example
