"""/docs and /redoc rendered by a real browser (Debian's chromium, headless) from a real uvicorn, with
every other host unreachable: the operations appear, so the pages need nothing but the service; and
Swagger UI's "Try it out" on POST /score, with the example it shows, answers 200."""

import subprocess
from pathlib import Path

import pytest

from ..browser import dump_dom, needs_chromium, open_browser
from .test_server import Server, start_server

pytestmark = needs_chromium


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


def render(server: Server, page: str, profile: Path) -> str:
    return dump_dom(f"{server.base}{page}", profile)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_render_every_operation_offline(server, tmp_path, page):
    dom = render(server, page, tmp_path / "profile")
    # Summaries of /score, the Open Inference Protocol's infer and the other groups: the document was
    # fetched and drawn by the locally served script, not just the bare HTML shell.
    for text in ("Score rows", "Infer: score the rows of input", "Prometheus metrics", "Model metadata"):
        assert text in dom, (page, text, dom[-2000:])
    for tag in ("scoring", "operations", "admin", "Open Inference Protocol (V2)"):
        assert tag in dom, (page, tag)


@pytest.fixture()
def browser(tmp_path):
    with open_browser(tmp_path) as page:
        yield page


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
