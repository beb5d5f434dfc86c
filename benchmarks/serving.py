"""A real `anomaly-scores serve` process on a free loopback port, for the benchmarks that load it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVE = [sys.executable, "-m", "app.cli", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Served:
    url: str
    pid: int
    seconds_to_ready: float  # from process start to /readyz answering 200


@contextmanager
def serve(
    model: Path, env: dict[str, str] | None = None, timeout: float = 120, workers: int = 1
) -> Iterator[Served]:
    """Start the server (`workers` processes), wait for /readyz 200, yield it; SIGTERM it (then
    kill) on the way out."""
    port = free_port()
    variables = os.environ | {"ANOMALY_MODEL_PATH": str(model), "ANOMALY_LOG_LEVEL": "warning"} | (env or {})
    started = time.perf_counter()
    process = subprocess.Popen(
        [*SERVE, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        env=variables,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.perf_counter() - started > timeout:
                raise SystemExit(f"the server did not become ready (exit status {process.poll()})")
            time.sleep(0.02)
        yield Served(url, process.pid, time.perf_counter() - started)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
