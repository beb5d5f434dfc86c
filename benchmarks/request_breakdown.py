"""Where a /score request's time goes inside the app, against a no-op in the same process. Prints JSON.

    .venv/bin/python benchmarks/request_breakdown.py [--rows 1] [--requests 3000]

Calls the ASGI app directly (no sockets, no HTTP parsing: what uvicorn adds is the same for both
routes), first GET /healthz, then POST /score with `--rows` rows, and times each stage of the
score route by wrapping it: the scorer's onnxruntime call, parsing, flags and p-values, metrics,
the response. Then the same stages alone in a tight loop, for comparison (inside the app they run slower, most
likely because the framework's code between them evicts their data and code from the caches).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from app.api import routes
from app.api.main import create_app
from app.api.settings import Settings
from app.bundle.format import EnsembleBundle
from app.engine import onnx_backend as onnx_scorer


async def call(app: Any, method: str, path: str, body: bytes = b"") -> None:
    """One request through the ASGI app; raises unless it answers 200."""
    headers = [(b"host", b"bench"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # a disconnect never comes
        raise AssertionError

    status = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"{method} {path} answered {status}")


def microseconds(total_s: float, count: int) -> float:
    return round(total_s / count * 1e6, 1)


async def per_request(app: Any, count: int, *request: Any) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await call(app, *request)
    return microseconds(time.perf_counter() - start, count)


def alone(fn: Callable[[], object], count: int) -> float:
    for _ in range(count // 10):
        fn()
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return microseconds(time.perf_counter() - start, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    app = create_app(Settings(model_path=args.model, log_level="warning"))
    service = app.state.service
    service.host.load()  # what the lifespan's loading thread does
    served = service.host.served
    bundle, scorer = served.bundle, served.scorer
    x = bundle.sample_rows(args.rows)
    body = orjson.dumps({"instances": x.tolist()})

    spent: dict[str, float] = defaultdict(float)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    ensemble = isinstance(bundle, EnsembleBundle)
    assembling = "assemble_combined" if ensemble else "assemble_members"
    originals = (scorer._run, routes.parse_json, getattr(onnx_scorer, assembling))
    observe, respond = service.metrics.observe_scores, routes.json_response
    # Instance and module attributes, looked up at call time by the route and the scorer.
    scorer._run = timed("onnxruntime", scorer._run)
    routes.parse_json = timed("parse", routes.parse_json)
    setattr(onnx_scorer, assembling, timed("flags_and_p_values", originals[2]))
    service.metrics.observe_scores = timed("metrics", observe)
    routes.json_response = timed("response", respond)

    async def measure() -> dict[str, Any]:
        await per_request(app, args.requests // 10, "GET", "/healthz")  # warm-up
        noop = await per_request(app, args.requests, "GET", "/healthz")
        await per_request(app, args.requests // 10, "POST", "/score", body)
        spent.clear()  # the stages of the timed requests only
        score = await per_request(app, args.requests, "POST", "/score", body)
        stages = {name: microseconds(total, args.requests) for name, total in spent.items()}
        return {"noop_us": noop, "score_us": score, "stages_us": stages}

    inside = asyncio.run(measure())
    run, parse, assemble = originals
    session, method, fpr = scorer.sessions[served.method], served.method, served.fpr
    x64 = np.ascontiguousarray(x, dtype=np.float64)  # what the scorer hands the graphs
    results = run(session, x64, False)
    parts = results if ensemble else [results]
    mismatch = bundle.split_columns(x64)[1]
    out = assemble(bundle, method, fpr, parts, False, x64.shape[0], mismatch)
    parsed = parse(body, bundle.features, service.settings.max_rows)
    answer = routes._response_body(served, out, parsed)  # the body the route writes
    n = args.requests
    isolated = {
        "onnxruntime": alone(lambda: run(session, x64, False), n),
        "parse": alone(lambda: parse(body, bundle.features, service.settings.max_rows), n),
        "flags_and_p_values": alone(
            lambda: assemble(bundle, method, fpr, parts, False, x64.shape[0], mismatch), n
        ),
        "metrics": alone(lambda: observe(bundle, method, out.threshold.name, out.score, 0), n),
        "response": alone(lambda: respond(answer), n),
    }
    print(json.dumps({"rows": args.rows, "inside_app": inside, "alone_us": isolated}, indent=2))


if __name__ == "__main__":
    main()
