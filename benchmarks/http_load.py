"""End-to-end HTTP figures against a real server process, with an async load generator. Prints JSON.

    .venv/bin/python benchmarks/http_load.py [--model models/default] [--workers 1] [--seconds 10]

Starts `anomaly-scores serve` (onnx backend; `--workers N` processes, e.g. one per core as the
compose stack runs two replicas) on a free loopback port, times process start to
/readyz 200, then measures with wrk (Debian package; an async httpx client where wrk is missing,
which is itself the bottleneck: its figures are a floor), with 16 concurrent connections:
  - the no-op ceiling: GET /healthz of the same app,
  - single-row POST /score: requests/s, p50 and p99 latency,
  - 1000-row JSON batches and 1000-row .npy batches: rows/s.
The load generator shares the machine's cores with the server, so the figures are a floor.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, sys.path[0] is benchmarks/: the repository root instead, so `benchmarks.` imports
    # resolve and no module here can shadow the standard library's.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import io
import json
import re
import shutil
import subprocess
import tempfile
import time

import httpx
import numpy as np

from app.bundle.format import load_bundle
from benchmarks.serving import serve


async def load(url: str, count: int, connections: int, make_request) -> dict[str, float]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                response = await make_request(client)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "requests_per_s": count / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


WRK_SCRIPT = """
local f = io.open("{body}", "rb")
wrk.method = "{method}"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "{content_type}"
"""


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


def wrk(url: str, seconds: int, connections: int, body: bytes | None = None, content_type: str = "") -> dict:
    """requests/s, p50 and p99 from `wrk --latency`, for a GET, or a POST of `body`."""
    with tempfile.TemporaryDirectory() as tmp:
        command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
        if body is not None:
            (Path(tmp) / "body").write_bytes(body)
            script = WRK_SCRIPT.format(body=Path(tmp) / "body", method="POST", content_type=content_type)
            (Path(tmp) / "post.lua").write_text(script)
            command += ["-s", str(Path(tmp) / "post.lua")]
        out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        # Anchored to the distribution's own lines: a thread-stats column such as "72.50%" ends in 50% too.
        "p50_ms": _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
    }


def measure(
    url: str, args: argparse.Namespace, single: bytes, batch_json: bytes, batch_npy: bytes
) -> tuple[str, dict, dict, dict, dict]:
    """The no-op, single-row, 1000-row JSON and 1000-row .npy figures, with wrk where installed."""
    if shutil.which("wrk"):
        return (
            "wrk",
            wrk(f"{url}/healthz", args.seconds, args.connections),
            wrk(f"{url}/score", args.seconds, args.connections, single, "application/json"),
            wrk(f"{url}/score", args.seconds, args.connections, batch_json, "application/json"),
            wrk(f"{url}/score", args.seconds, args.connections, batch_npy, "application/x-npy"),
        )
    json_headers = {"content-type": "application/json"}
    npy_headers = {"content-type": "application/x-npy"}

    def run(count: int, request) -> dict[str, float]:  # type: ignore[no-untyped-def]
        return asyncio.run(load(url, count, args.connections, request))

    return (
        "httpx (async)",
        run(args.requests, lambda c: c.get("/healthz")),
        run(args.requests, lambda c: c.post("/score", content=single, headers=json_headers)),
        run(args.batches, lambda c: c.post("/score", content=batch_json, headers=json_headers)),
        run(args.batches, lambda c: c.post("/score", content=batch_npy, headers=npy_headers)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--requests", type=int, default=3000, help="single-row and no-op requests")
    parser.add_argument("--batches", type=int, default=100, help="1000-row requests of each kind")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10, help="per measurement, with wrk")
    parser.add_argument("--workers", type=int, default=1, help="server processes (`serve --workers`)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="ANOMALY_X=VALUE", help="a setting of the server"
    )
    args = parser.parse_args()
    settings = {"ANOMALY_MAX_ROWS": "10000"} | dict(item.split("=", 1) for item in args.env)
    bundle = load_bundle(args.model)
    rng = np.random.default_rng(0)
    rows = bundle.scaler.mean + rng.standard_normal((1000, len(bundle.features))) * bundle.scaler.scale
    single = json.dumps({"instances": rows[:1].tolist()}).encode()
    batch_json = json.dumps({"instances": rows.tolist()}).encode()
    buffer = io.BytesIO()
    np.save(buffer, rows.astype(np.float32))
    batch_npy = buffer.getvalue()
    with serve(args.model, settings, workers=args.workers) as server:
        generator, noop, one, many_json, many_npy = measure(server.url, args, single, batch_json, batch_npy)
    print(
        json.dumps(
            {
                "benchmark": f"HTTP, serve (onnx), {args.connections} connections, d={len(bundle.features)}",
                "workers": args.workers,
                "load_generator": generator,
                "settings": settings,
                "seconds_to_ready": round(server.seconds_to_ready, 2),
                "noop_requests_per_s": round(noop["requests_per_s"]),
                "single_row": {k: round(v, 2) for k, v in one.items()},
                "single_row_over_noop": round(one["requests_per_s"] / noop["requests_per_s"], 2),
                "json_1000_rows_per_s": round(many_json["requests_per_s"] * 1000),
                "npy_1000_rows_per_s": round(many_npy["requests_per_s"] * 1000),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
