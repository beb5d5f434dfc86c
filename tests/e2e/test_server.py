"""A real uvicorn process on a free port, real HTTP: the same numbers as the command line."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.bundle.format import load_bundle

from ..conftest import FEATURES, manifold_rows, off_manifold_rows
from ..tolerances import float32_rtol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base: str
    process: subprocess.Popen
    log: Path
    bundle: Path


def start_server(
    bundle: Path,
    log: Path,
    command: str = "uvicorn",
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Server:
    """`uvicorn`: the app factory under plain uvicorn; `serve`: the product's own command. Returns
    once /readyz says 200, or at once with wait_ready=False."""
    port = free_port()
    variables = os.environ | {"ANOMALY_MODEL_PATH": str(bundle), "ANOMALY_WARMUP_ROWS": "8"} | (env or {})
    program = {
        "uvicorn": ["-m", "uvicorn", "app.api.main:create_app", "--factory", "--no-access-log"],
        "serve": ["-m", "app.cli", "serve"],
    }[command]
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, *program, "--host", "127.0.0.1", "--port", str(port)],
            env=variables,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log, bundle)
    if not wait_ready:
        return server
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{server.base}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not become ready:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    s = start_server(tiny_bundle, tmp_path_factory.mktemp("server") / "server.log")
    yield s
    if s.process.poll() is None:
        s.process.kill()
        s.process.wait()


def test_http_scores_equal_the_command_line_on_the_same_file(server, tmp_path):
    rows = np.r_[manifold_rows(60, seed=31), off_manifold_rows(20, seed=32)]
    pd.DataFrame(rows, columns=FEATURES).to_csv(tmp_path / "rows.csv", index=False)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "score",
            str(server.bundle),
            str(tmp_path / "rows.csv"),
            "--out",
            str(tmp_path / "scores.csv"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    expected = pd.read_csv(tmp_path / "scores.csv")
    named = pd.read_csv(tmp_path / "rows.csv").to_dict("records")
    body = httpx.post(f"{server.base}/score", json={"instances": named, "components": True}).json()
    # the same graphs; the CLI may cut the rows into other blocks (float32 kernels' blocking)
    rtol = float32_rtol(load_bundle(server.bundle).architecture)
    np.testing.assert_allclose(body["scores"], expected["score"], rtol=rtol)
    np.testing.assert_allclose(body["p_values"], expected["p_value"], rtol=1e-8)  # CSV keeps 9 digits
    np.testing.assert_allclose(body["log_volume"], expected["log_volume"], rtol=rtol, atol=rtol)
    assert body["is_anomaly"] == expected["is_anomaly"].tolist()


def test_metrics_parse_and_pass_promtool(server):
    text = httpx.get(f"{server.base}/metrics").text
    names = {family.name for family in text_string_to_metric_families(text)}
    expected = {
        "anomaly_requests",
        "anomaly_request_duration_seconds",
        "anomaly_rows_scored",
        "anomaly_batch_rows",
        "anomaly_score",
        "anomaly_flagged",
        "anomaly_threshold",
        "anomaly_model_info",
    }
    assert expected <= names
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus); the parser check above ran")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_health_answers_while_a_large_batch_is_scored(server):
    big = np.r_[manifold_rows(5000, seed=33), off_manifold_rows(5000, seed=34)].tolist()
    done = threading.Event()
    finished_at: list[float] = []

    def score_big() -> None:
        response = httpx.post(
            f"{server.base}/score", json={"instances": big, "method": "projected"}, timeout=120
        )
        finished_at.append(time.monotonic())
        assert response.status_code == 200
        done.set()

    worker = threading.Thread(target=score_big)
    worker.start()
    health_times = []
    while not done.is_set() and len(health_times) < 200:
        response = httpx.get(f"{server.base}/healthz", timeout=5)
        assert response.status_code == 200
        health_times.append(time.monotonic())
        time.sleep(0.01)
    worker.join()
    # The event loop stayed free: probes completed while the batch was still being scored.
    assert sum(t < finished_at[0] for t in health_times) >= 3


def test_sigterm_stops_the_serve_command_cleanly_with_exit_0(tiny_bundle, tmp_path):
    s = start_server(tiny_bundle, tmp_path / "server.log", command="serve")
    assert (
        httpx.post(f"{s.base}/score", json={"instances": manifold_rows(3, seed=35).tolist()}).status_code
        == 200
    )
    s.process.send_signal(signal.SIGTERM)
    assert s.process.wait(timeout=30) == 0
    log = s.log.read_text()
    assert "Application shutdown complete" in log and "Finished server process" in log
    assert '"message": "request", "method": "POST", "path": "/score", "status": 200, "rows": 3' in log


def test_head_is_answered_wherever_get_is_without_a_body(server):
    """Audit finding: HEAD /healthz, /readyz and /model were 405 (RFC 9110 9.1: a server that
    supports GET supports HEAD). Over a real connection: GET's status and headers, no body, and the
    connection stays usable; a route without GET still answers 405."""

    def counted() -> float:
        text = httpx.get(f"{server.base}/metrics").text
        labels = {"endpoint": "/model", "code": "200"}
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        return next(
            (s.value for s in samples if s.name == "anomaly_requests_total" and s.labels == labels), 0
        )

    before = counted()
    with httpx.Client(base_url=server.base, timeout=10) as client:
        for path in ("/healthz", "/readyz", "/model", "/metrics", "/v2/health/ready"):
            get, head = client.get(path), client.head(path)
            assert (head.status_code, head.content) == (get.status_code, b""), path
            assert head.headers["content-type"] == get.headers["content-type"], path
            if path != "/metrics":  # a scrape's text grows with the requests counted meanwhile
                assert head.headers["content-length"] == str(len(get.content)), path
        assert client.head("/score").status_code == 405
        assert client.get("/healthz").json() == {"status": "ok"}  # the same connection, still in step
    # the GET and the HEAD, under the route's label
    assert counted() == before + 2
