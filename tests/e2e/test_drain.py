"""SIGTERM first drains: /readyz turns 503 while scoring still answers, then the process exits 0."""

import signal
import time

import httpx

from ..conftest import manifold_rows
from .test_server import start_server


def test_sigterm_turns_readiness_off_while_requests_are_still_served(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_DRAIN_S", "3")
    server = start_server(tiny_bundle, tmp_path / "server.log", command="serve")
    rows = manifold_rows(3, seed=4).tolist()
    try:
        assert httpx.get(f"{server.base}/readyz").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while httpx.get(f"{server.base}/readyz").status_code != 503:
            assert time.monotonic() < deadline, "readiness did not turn off"
            time.sleep(0.05)
        # draining: not ready, yet scoring and liveness still answer
        assert httpx.post(f"{server.base}/score", json={"instances": rows}).status_code == 200
        assert httpx.get(f"{server.base}/healthz").status_code == 200
        assert server.process.wait(timeout=30) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log.read_text()
    assert "SIGTERM: draining" in log and "Application shutdown complete" in log
