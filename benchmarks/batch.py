"""Whole-table scoring: rows/s of `anomaly-scores score` in one process against Ray Data and Spark in
local mode, on one generated Parquet table, each engine's start-up cost printed apart.

Generates --rows rows of the model's width (5 million x 30 for the shipped model: about 1.2 GB of
Parquet in row groups of --row-group rows; reused when it exists), then scores it three ways with
the same bundle, writing Parquet: the plain command (one process, onnxruntime on every core),
`--engine ray` and `--engine spark` (one single-threaded scorer per core). Start-up (ray.init, the
Spark session) is timed apart from the scoring, which the ratios compare.

    python -m benchmarks.batch [--model models/default] [--rows 5000000] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from app.batch.core import BatchOptions
from app.bundle.format import load_bundle
from app.cli import main as cli


def generate(bundle_path: Path, path: Path, rows: int, row_group: int) -> None:
    bundle = load_bundle(bundle_path)
    schema = pa.schema([pa.field(c, pa.float64()) for c in bundle.columns])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            values = bundle.sample_rows(min(row_group, rows - start), seed=start)
            writer.write_table(
                pa.table({c: values[:, j] for j, c in enumerate(bundle.columns)}, schema=schema)
            )


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--row-group", type=int, default=250_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--keep", type=Path, help="directory for the generated table (default: a temporary one)"
    )
    parser.add_argument("--engines", default="local,ray,spark")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    table = work / f"table-{args.rows}.parquet"
    if not table.exists():
        generated = timed(lambda: generate(args.model, table, args.rows, args.row_group))
        size = table.stat().st_size / 2**20
        print(f"generated {args.rows} rows in {generated:.1f} s -> {table} ({size:.0f} MiB)")
    results: dict[str, dict[str, float]] = {}
    engines = args.engines.split(",")
    if "local" in engines:
        out = work / "local.parquet"
        seconds = timed(
            lambda: cli(["score", str(args.model), str(table), "--out", str(out), "--chunk-rows", "262144"])
        )
        results["local"] = {"startup_s": 0.0, "score_s": seconds}
    if "ray" in engines:
        import ray

        from app.batch import on_ray

        startup = timed(lambda: ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False))
        out = work / "ray"
        shutil.rmtree(out, ignore_errors=True)
        seconds = timed(
            lambda: on_ray.score_files(args.model, table, out, BatchOptions(), workers=args.workers)
        )
        ray.shutdown()
        results["ray"] = {"startup_s": startup, "score_s": seconds}
    if "spark" in engines:
        from app.batch import on_spark

        sessions: list[object] = []
        startup = timed(lambda: sessions.append(on_spark.session(workers=args.workers)))
        out = work / "spark"
        shutil.rmtree(out, ignore_errors=True)
        seconds = timed(
            lambda: on_spark.score_files(args.model, table, out, BatchOptions(), spark=sessions[0])
        )
        sessions[0].stop()  # type: ignore[attr-defined]
        results["spark"] = {"startup_s": startup, "score_s": seconds}
    base = results.get("local", {}).get("score_s")
    for figures in results.values():
        figures["rows_per_s"] = args.rows / figures["score_s"]
        if base:
            figures["over_local"] = base / figures["score_s"]
    width = len(load_bundle(args.model).columns)
    report = {
        "benchmark": f"whole-table scoring, {args.rows} rows x {width} columns, {args.workers} workers, "
        "Parquet in and out",
        "results": {k: {n: round(v, 3) for n, v in f.items()} for k, f in results.items()},
    }
    print(json.dumps(report, indent=2))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
