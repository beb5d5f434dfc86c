"""Soak: a sustained load against a real `anomaly-scores serve` process, watching its memory. Prints JSON.

    .venv/bin/python benchmarks/soak.py [--model models/default] [--requests 100000] [--rows 10]
                                        [--connections 8] [--samples 40]

Starts the server on a free loopback port, sends `--requests` POST /score requests of `--rows` rows
each over `--connections` concurrent keep-alive connections, and reads the server's resident memory
(VmRSS in /proc/<pid>/status) `--samples` times at even steps of completed requests. Prints
requests, errors (non-200 answers and transport errors), requests/s, the RSS samples and
`growth_ratio`: final RSS over the RSS at the end of the second quarter of the run, minus 1. The
first half absorbs warm-up (allocator arenas, caches); a leak keeps growing through the second.
Exits 1 when there were errors or the growth reached `--max-growth` (default 0.10).

tests/e2e/test_reliability.py runs the same `run_soak` with 3000 requests in CI; this script is
the full run: about 300 requests/s on the 2-core CPU machine (client and server share the cores),
so 5 to 6 minutes for the defaults. `--model` must be a bundle directory; the rows are drawn
around its training mean. Linux only (/proc).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, sys.path[0] is benchmarks/, whose modules could shadow the standard library's
    # (a benchmarks/http.py once hid the http package httpx imports): the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx

from benchmarks.serving import serve


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, reported in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class SoakResult:
    requests: int
    rows_per_request: int
    connections: int
    errors: int
    error_examples: list[str]
    seconds: float
    requests_per_s: float
    # (requests completed, RSS bytes) pairs; the first is taken before the load starts
    rss_samples: list[tuple[int, int]] = field(default_factory=list)
    rss_mid: int = 0  # at the end of the second quarter: half the requests completed
    rss_final: int = 0
    growth_ratio: float = 0.0  # rss_final / rss_mid - 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_soak(
    base_url: str, pid: int, body: bytes, requests: int, connections: int = 8, samples: int = 20
) -> SoakResult:
    """Send `requests` POST /score with `body` over `connections` connections, sampling `pid`'s RSS.

    `samples` is rounded up to a multiple of 4 so that one sample falls exactly at the half-way
    point; never raises on a failed request, counts it.
    """
    samples = max(4, -(-samples // 4) * 4)
    step = max(1, requests // samples)
    half = requests // 2
    marks = sorted({*range(step, requests + 1, step), half, requests})
    rows = len(json.loads(body)["instances"])
    return asyncio.run(_soak(base_url, pid, body, requests, connections, marks, half, rows))


async def _soak(
    base_url: str,
    pid: int,
    body: bytes,
    requests: int,
    connections: int,
    marks: list[int],
    half: int,
    rows: int,
) -> SoakResult:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"content-type": "application/json"}
    samples: list[tuple[int, int]] = [(0, rss_bytes(pid))]
    pending_marks = list(reversed(marks))
    errors: list[str] = []
    issued = completed = 0
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal issued, completed
            while issued < requests:
                issued += 1
                try:
                    response = await client.post("/score", content=body, headers=headers)
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                completed += 1
                while pending_marks and completed >= pending_marks[-1]:
                    samples.append((pending_marks.pop(), rss_bytes(pid)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        seconds = time.perf_counter() - start
    by_count = dict(samples[1:])
    mid, final = by_count[half], by_count[requests]
    return SoakResult(
        requests=requests,
        rows_per_request=rows,
        connections=connections,
        errors=len(errors),
        error_examples=errors[:5],
        seconds=seconds,
        requests_per_s=requests / seconds,
        rss_samples=samples,
        rss_mid=mid,
        rss_final=final,
        growth_ratio=final / mid - 1,
    )


def score_body(model: Path, rows: int, seed: int = 0) -> bytes:
    """A /score body of `rows` rows around the bundle's training mean."""
    from app.bundle.format import load_bundle

    bundle = load_bundle(model)
    x = bundle.sample_rows(rows, seed)
    return json.dumps({"instances": x.tolist()}).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=10, help="rows per request")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--samples", type=int, default=40, help="RSS samples (rounded up to a multiple of 4)")
    parser.add_argument("--max-growth", type=float, default=0.10, help="exit 1 at this growth ratio or more")
    args = parser.parse_args()
    body = score_body(args.model, args.rows)
    with serve(args.model) as server:
        result = run_soak(server.url, server.pid, body, args.requests, args.connections, args.samples)
    out = result.as_dict() | {"max_growth": args.max_growth}
    out["rss_samples"] = {str(n): rss for n, rss in result.rss_samples}  # requests completed: bytes
    print(json.dumps(out, indent=1))
    return 0 if result.errors == 0 and result.growth_ratio < args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
