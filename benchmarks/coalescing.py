"""Does request coalescing pay? Single-row POST /score from many concurrent connections, with
ANOMALY_COALESCE off and on, interleaved A/B runs against real server processes. Prints JSON.

    .venv/bin/python benchmarks/coalescing.py [--connections 64] [--seconds 8] [--rounds 2]

Needs wrk (Debian package). The load generator shares the machine's cores with the server, so
compare the two settings within one run only.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import shutil

from app.bundle.format import load_bundle
from benchmarks.http_load import wrk
from benchmarks.serving import serve

JSON = {"Content-Type": "application/json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs, interleaved")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk (apt-get install wrk)")
    bundle = load_bundle(args.model)
    row = bundle.sample_rows(1)[0]
    single = json.dumps({"instances": [row.tolist()]}).encode()
    runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for setting in ("off", "on"):
            env = {"ANOMALY_COALESCE": "true" if setting == "on" else "false", "ANOMALY_MAX_QUEUE": "1024"}
            with serve(args.model, env) as server:
                wrk(f"{server.url}/score", 2, args.connections, single, JSON)  # warm-up
                runs[setting].append(wrk(f"{server.url}/score", args.seconds, args.connections, single, JSON))
    summary = {
        setting: {key: [round(r[key], 2) for r in results] for key in ("requests_per_s", "p50_ms", "p99_ms")}
        for setting, results in runs.items()
    }
    best = {setting: max(r["requests_per_s"] for r in results) for setting, results in runs.items()}
    print(
        json.dumps(
            {
                "benchmark": f"single-row POST /score, {args.connections} connections, coalescing off vs on",
                "runs": summary,
                "best_on_over_off": round(best["on"] / best["off"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
