"""Reliability of a real `anomaly-scores serve` process: SIGTERM under load, SIGHUP reload, a short soak.

Each test starts its own server (`start_server(..., command="serve")`) and stops it, whatever happens.
The full soak is `benchmarks/soak.py`; the one here runs its `run_soak` with 3000 requests.
"""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.bundle.format import WEIGHTS, load_bundle
from app.train.options import Candidate, FitOptions
from app.train.pipeline import TrainRequest, train_bundle
from benchmarks.soak import run_soak

from ..conftest import FEATURES, manifold_rows
from .test_server import Server, free_port, start_server

GRACE_S = 15.0
UNREAD_WINDOW_S = 0.5


@contextmanager
def serving(bundle: Path, log: Path, command: str = "serve", **env: str) -> Iterator[Server]:
    """A server for the block, killed after it whatever happened; env: ANOMALY_<NAME> settings."""
    variables = {f"ANOMALY_{k.upper()}": v for k, v in env.items()}
    server = start_server(bundle, log, command=command, env=variables)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=30)


def metric(base: str, family_name: str, /, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == family_name and sample.labels == labels:
                return sample.value
    return 0.0


def served_version(base: str) -> str | None:
    response = httpx.get(f"{base}/readyz", timeout=5)
    return response.json()["model"]["version"] if response.status_code == 200 else None


def wait_for(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Outcome:
    start: float  # time.monotonic()
    end: float
    status: int | None = None  # the HTTP status, when a response came back
    error: Exception | None = None  # the transport error, when none did


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_SHUTDOWN_GRACE_S", str(GRACE_S))
    # 3000 rows a request: tens of milliseconds of parsing and scoring, so some are always in flight
    body = json.dumps({"instances": manifold_rows(3000, seed=40).tolist()}).encode()
    headers = {"content-type": "application/json", "connection": "close"}
    outcomes: list[Outcome] = []
    sigterm_at = float("inf")
    stop = threading.Event()

    def keep_sending(base: str) -> None:
        # A new connection per request (no keep-alive), so no request can meet a keep-alive connection
        # the server closes as idle: a request fails only by being refused, or dropped.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=base, timeout=30, limits=limits) as client:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    response = client.post("/score", content=body, headers=headers)
                    outcomes.append(Outcome(start, time.monotonic(), status=response.status_code))
                except httpx.ConnectError as e:
                    outcomes.append(Outcome(start, time.monotonic(), error=e))
                    return  # the server is gone (or going): nothing more to send
                except httpx.TransportError as e:
                    outcomes.append(Outcome(start, time.monotonic(), error=e))

    with serving(tiny_bundle, tmp_path / "server.log") as server:
        clients = [threading.Thread(target=keep_sending, args=(server.base,)) for _ in range(4)]
        for c in clients:
            c.start()
        try:
            wait_for(lambda: sum(o.status == 200 for o in outcomes) >= 12, "a steady load")
            sigterm_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(timeout=GRACE_S + 15)
            stopped_after = time.monotonic() - sigterm_at
        finally:
            stop.set()
            for c in clients:
                c.join(timeout=60)
        log = server.log.read_text()

    assert code == 0, log[-3000:]
    assert stopped_after < GRACE_S, stopped_after
    check_nothing_accepted_was_lost(outcomes, sigterm_at, stopped_after, len(clients), log)


def check_nothing_accepted_was_lost(
    outcomes: list[Outcome], sigterm_at: float, stopped_after: float, clients: int, log: str
) -> None:
    answered = [o for o in outcomes if o.status is not None]
    assert all(o.status == 200 for o in answered), sorted({o.status for o in answered})
    # Requests were really in flight when SIGTERM came, and were answered during the shutdown.
    in_flight = [o for o in answered if o.start < sigterm_at < o.end]
    assert in_flight, "no request was in flight when SIGTERM came; the test proved nothing"
    # The application lost nothing: it received exactly the requests that were answered, and logged
    # each with its 200.
    assert log.count('"path": "/score"') == len(answered)
    assert log.count('"path": "/score", "status": 200') == len(answered)
    failed = [o for o in outcomes if o.error is not None]
    dropped = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
    unexpected = [o for o in failed if not isinstance(o.error, (httpx.ConnectError, *dropped))]
    assert not unexpected, [(repr(o.error), o.start - sigterm_at) for o in unexpected]
    # Refused connections only once shutdown began; the clients kept sending until the server was
    # gone, each stopping on one.
    refused = [o for o in failed if isinstance(o.error, httpx.ConnectError)]
    assert all(o.end > sigterm_at for o in refused), [o.start - sigterm_at for o in refused]
    assert len(refused) == clients
    # KNOWN GAP (uvicorn's shutdown; see docs/operations.md and the fix proposed with this test): it
    # closes, without a response, every connection whose request it has not read yet, the listen
    # backlog included. So a request sent in the last moments before SIGTERM (measured: up to 11 ms
    # before, while the event loop was busy parsing other bodies) or after it can be reset; such a
    # request never reached the application (the log counts above). Allowed here, and reported as a
    # warning, only within UNREAD_WINDOW_S before the signal and while the process still ran; a
    # request sent earlier than that and dropped fails the test.
    resets = [o for o in failed if isinstance(o.error, dropped)]
    early = [
        o for o in resets if o.start < sigterm_at - UNREAD_WINDOW_S or o.end > sigterm_at + stopped_after
    ]
    assert not early, [(repr(o.error), o.start - sigterm_at) for o in early]
    if resets:
        offsets = [round(o.start - sigterm_at, 3) for o in resets]
        warnings.warn(
            f"{len(resets)} request(s) sent {offsets} s from SIGTERM were reset unread by uvicorn's shutdown",
            stacklevel=2,
        )
    for line in ("Shutting down", "Application shutdown complete", "Finished server process"):
        assert line in log
    assert "timeout graceful shutdown exceeded" not in log


def test_sighup_reloads_the_bundle_rolled_into_the_served_directory(tiny_bundle, tmp_path):
    served = tmp_path / "models" / "current"
    shutil.copytree(tiny_bundle, served)
    second = tmp_path / "second"
    request = TrainRequest(
        [Candidate(latent_dim=2, hidden=8, components=2)], FitOptions(steps=60, seed=7), name="second"
    )
    train_bundle(manifold_rows(400, seed=11), FEATURES, request, second)
    old, new = load_bundle(served).version, load_bundle(second).version
    assert old != new
    rows = manifold_rows(3, seed=12).tolist()

    with serving(served, tmp_path / "server.log") as server:
        assert served_version(server.base) == old
        for path in served.iterdir():
            path.unlink()
        for path in second.iterdir():
            shutil.copy2(path, served / path.name)
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: served_version(server.base) == new, "the new version on /readyz")
        assert server.process.poll() is None  # SIGHUP is handled, not the default (terminate)
        assert metric(server.base, "anomaly_reloads_total", result="success") == 1
        assert metric(server.base, "anomaly_reloads_total", result="failure") == 0
        assert metric(server.base, "anomaly_model_info", name="second", version=new) == 1
        scored = httpx.post(f"{server.base}/score", json={"instances": rows}, timeout=30)
        assert scored.status_code == 200 and scored.json()["model"]["version"] == new

        # A broken bundle rolled in the same way is refused, and the one serving keeps serving.
        weights = bytearray((served / WEIGHTS).read_bytes())
        weights[-5] ^= 0xFF
        (served / WEIGHTS).write_bytes(bytes(weights))
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: metric(server.base, "anomaly_reloads_total", result="failure") == 1, "the refusal")
        assert served_version(server.base) == new
        assert metric(server.base, "anomaly_reloads_total", result="success") == 1
        assert httpx.post(f"{server.base}/score", json={"instances": rows}, timeout=30).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=GRACE_S + 15) == 0
    log = server.log.read_text()
    assert '"message": "model reloaded"' in log
    assert '"message": "reload refused; the previous model keeps serving"' in log


def test_soak_answers_every_request_and_memory_stays_flat(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_LOG_LEVEL", "warning")  # 3000 access-log lines are not the point here
    body = json.dumps({"instances": manifold_rows(10, seed=50).tolist()}).encode()
    with serving(tiny_bundle, tmp_path / "server.log") as server:
        result = run_soak(server.base, server.process.pid, body, requests=3000, connections=8, samples=20)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=GRACE_S + 15) == 0
    assert result.errors == 0, result.error_examples
    assert [n for n, _ in result.rss_samples] == [0, *range(150, 3001, 150)]
    assert result.rss_mid == dict(result.rss_samples)[1500]
    assert result.growth_ratio < 0.10, result.as_dict()


LEAKY_SERVER = """
import http.server, sys
kept = []
class Leaky(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall between them
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        kept.append(bytearray(200_000))  # touched, hence resident
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Leaky).serve_forever()
"""


def test_the_soak_measurement_sees_a_leak():
    """The memory check can fail: 200 kB kept per request shows as growth far above 10 %."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", LEAKY_SERVER, str(port)])
    try:
        wait_for(lambda: _accepts(port), "the leaky server", timeout=10)
        result = run_soak(f"http://127.0.0.1:{port}", process.pid, b'{"instances": [[1]]}', 400, 4, 8)
    finally:
        process.kill()
        process.wait(timeout=10)
    assert result.errors == 0, result.error_examples
    assert result.growth_ratio > 0.10, result.as_dict()


def _accepts(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    except httpx.TransportError:
        return False
    return True
