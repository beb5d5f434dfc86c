"""Memory a request body costs the service: peak RSS growth for one and for N concurrent large bodies.

Starts `anomaly-scores serve` on 127.0.0.1 (benchmarks/serving.py; stopped by its PID at the end),
sends JSON (or .npy) bodies of about --mb MiB each (rows of the served model's width), and prints
the process's peak resident memory (VmHWM) above its idle level, per body byte.

    python -m benchmarks.body_memory [--model models/default] [--mb 16] [--concurrent 20] [--npy]
"""

from __future__ import annotations

import argparse
import io
import threading
from pathlib import Path

import httpx
import numpy as np
import orjson

from app.bundle.format import load_bundle
from benchmarks.serving import serve


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def body(features: int, mb: float, npy: bool) -> tuple[bytes, str]:
    rows = np.round(np.random.default_rng(0).standard_normal((1, features)), 6)
    if npy:
        n = int(mb * 2**20 / (8 * features))
        buffer = io.BytesIO()
        np.save(buffer, np.repeat(rows, n, axis=0))
        return buffer.getvalue(), "application/x-npy"
    one = len(orjson.dumps(rows[0].tolist())) + 1
    n = int(mb * 2**20 / one)
    return orjson.dumps({"instances": np.repeat(rows, n, axis=0).tolist()}), "application/json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--mb", type=float, default=16.0)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--npy", action="store_true")
    args = parser.parse_args()
    payload, content_type = body(len(load_bundle(args.model).features), args.mb, args.npy)
    settings = {
        "ANOMALY_MAX_ROWS": "10000000",
        "ANOMALY_MAX_BODY_BYTES": str(len(payload) + 1024),
        "ANOMALY_MAX_INFLIGHT_BODY_BYTES": str((len(payload) + 1024) * args.concurrent),
        "ANOMALY_MAX_QUEUE": str(args.concurrent),
        "ANOMALY_REQUEST_TIMEOUT_S": "600",
    }
    with serve(args.model, settings) as server:
        base = server.url
        idle = peak_rss_mb(server.pid)
        headers = {"content-type": content_type}
        statuses: list[int] = []

        def send() -> None:
            r = httpx.post(f"{base}/score", content=payload, headers=headers, timeout=600)
            statuses.append(r.status_code)

        send()
        one = peak_rss_mb(server.pid) - idle
        threads = [threading.Thread(target=send) for _ in range(args.concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        many = peak_rss_mb(server.pid) - idle
        size = len(payload) / 2**20
        kind = content_type.split("/")[1]
        print(f"body {size:.1f} MiB {kind}; idle peak RSS {idle:.0f} MB; statuses {sorted(set(statuses))}")
        print(f"one body:      peak RSS +{one:.0f} MB ({one / size:.1f} x the body)")
        per_body = many / size / args.concurrent
        print(f"{args.concurrent} at once:  peak RSS +{many:.0f} MB ({per_body:.1f} x per body)")


if __name__ == "__main__":
    main()
