"""End-to-end HTTP figures against a real server process, with an async load generator. Prints JSON.

    .venv/bin/python benchmarks/http_load.py [--model models/default] [--workers 1] [--seconds 10]

Starts `anomaly-scores serve` (onnx backend; `--workers N` processes, e.g. one per core as the
compose stack runs two replicas) on a free loopback port, times process start to
/readyz 200, then measures with wrk (Debian package; an async httpx client where wrk is missing,
which is itself the bottleneck: its figures are a floor), with 16 concurrent connections:
  - the no-op ceiling: GET /healthz of the same app,
  - single-row POST /score: requests/s, p50 and p99 latency,
  - 1000-row JSON batches and 1000-row .npy batches: rows/s;
  - the same 1000 rows through the Open Inference Protocol's /v2/models/<name>/infer, as JSON and
    with the binary tensor extension (FP32 in, the four default outputs binary out): rows/s, and the
    binary figure as a share of the .npy one.
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
from numpy.typing import NDArray

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
"""


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


def wrk(
    url: str, seconds: int, connections: int, body: bytes | None = None, headers: dict[str, str] | None = None
) -> dict:
    """requests/s, p50 and p99 from `wrk --latency`, for a GET, or a POST of `body`."""
    with tempfile.TemporaryDirectory() as tmp:
        command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
        if body is not None:
            (Path(tmp) / "body").write_bytes(body)
            script = WRK_SCRIPT.format(body=Path(tmp) / "body", method="POST")
            script += "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
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


Case = tuple[str, bytes | None, dict[str, str]]  # path, body (None: GET), headers


def measure(url: str, args: argparse.Namespace, cases: dict[str, Case]) -> tuple[str, dict[str, dict]]:
    """Each case's figures, with wrk where installed."""
    if shutil.which("wrk"):
        figures = {
            name: wrk(f"{url}{path}", args.seconds, args.connections, body, headers)
            for name, (path, body, headers) in cases.items()
        }
        return "wrk", figures

    def run(path: str, body: bytes | None, headers: dict[str, str], count: int) -> dict[str, float]:
        def request(client: httpx.AsyncClient):  # type: ignore[no-untyped-def]
            return client.get(path) if body is None else client.post(path, content=body, headers=headers)

        return asyncio.run(load(url, count, args.connections, request))

    figures = {
        name: run(path, body, headers, args.requests if name in ("noop", "single") else args.batches)
        for name, (path, body, headers) in cases.items()
    }
    return "httpx (async)", figures


def v2_bodies(rows: NDArray[np.float64]) -> tuple[bytes, bytes, dict[str, str]]:
    """The Open Inference Protocol's JSON request and its binary-extension form, with its header."""
    shape = list(rows.shape)
    as_json = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP64", "data": rows.ravel().tolist()}]}
    data = rows.astype("<f4").tobytes()
    parameters = {"binary_data_size": len(data)}
    header = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "parameters": parameters}]}
    header |= {"parameters": {"binary_data_output": True}}
    head = json.dumps(header).encode()
    return json.dumps(as_json).encode(), head + data, {"Inference-Header-Content-Length": str(len(head))}


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
    rows = bundle.sample_rows(1000)
    single = json.dumps({"instances": rows[:1].tolist()}).encode()
    batch_json = json.dumps({"instances": rows.tolist()}).encode()
    buffer = io.BytesIO()
    np.save(buffer, rows.astype(np.float32))
    batch_npy = buffer.getvalue()
    v2_json, v2_binary, v2_headers = v2_bodies(rows)
    infer = f"/v2/models/{bundle.name}/infer"
    json_type, npy_type = {"Content-Type": "application/json"}, {"Content-Type": "application/x-npy"}
    cases: dict[str, Case] = {
        "noop": ("/healthz", None, {}),
        "single": ("/score", single, json_type),
        "json": ("/score", batch_json, json_type),
        "npy": ("/score", batch_npy, npy_type),
        "v2_json": (infer, v2_json, json_type),
        "v2_binary": (infer, v2_binary, {"Content-Type": "application/octet-stream"} | v2_headers),
    }
    with serve(args.model, settings, workers=args.workers) as server:
        generator, figures = measure(server.url, args, cases)
    noop, one = figures["noop"], figures["single"]
    rows_per_s = {
        name: figures[name]["requests_per_s"] * 1000 for name in ("json", "npy", "v2_json", "v2_binary")
    }
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
                "json_1000_rows_per_s": round(rows_per_s["json"]),
                "npy_1000_rows_per_s": round(rows_per_s["npy"]),
                "v2_json_1000_rows_per_s": round(rows_per_s["v2_json"]),
                "v2_binary_1000_rows_per_s": round(rows_per_s["v2_binary"]),
                "v2_binary_over_npy": round(rows_per_s["v2_binary"] / rows_per_s["npy"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
