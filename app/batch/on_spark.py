"""Spark: score a DataFrame a user already holds, or a Parquet or CSV table, through mapInArrow (the
`spark` extra; the service and the plain command line never import it).

The bundle travels to the executors as bytes inside the task closure (a few hundred kB), so they
need no shared storage for it; each Python worker writes it to a temporary directory once, loads
and checks it, and scores every Arrow batch of its partitions through app.batch.core with a
single-threaded onnxruntime session. See docs/scale-out.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from app.batch.core import (
    BatchOptions,
    Part,
    distributed_schema,
    output_schema,
    plan_parts,
    score_batch,
    score_part,
    staged_output,
)
from app.bundle.format import MANIFEST, load_bundle
from app.bundle.signing import SIGNATURE
from app.engine.factory import create_scorer
from app.engine.scorer import Scorer

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

COUNTS = pa.schema([pa.field("rows", pa.int64())])
# One scorer per bundle version per Python worker: Spark reuses its workers across tasks.
_SCORERS: dict[str, Scorer] = {}


def bundle_files(path: str | Path) -> dict[str, bytes]:
    """A bundle's files, after the bundle has been loaded and checked here, on the driver."""
    bundle = load_bundle(path)
    names = [MANIFEST, *bundle.manifest["files"], SIGNATURE]
    return {name: (bundle.path / name).read_bytes() for name in names if (bundle.path / name).is_file()}


def _scorer(files: dict[str, bytes]) -> Scorer:
    key = files[MANIFEST].decode()  # the manifest holds every file's hash: it names the bundle exactly
    if key not in _SCORERS:
        # The files are read while the scorer is built (graphs into onnxruntime's sessions, weights
        # into memory), so the copy goes with the block: a long-lived executor keeps no litter.
        with tempfile.TemporaryDirectory(prefix="anomaly-scores-bundle-") as name:
            directory = Path(name)
            for file, data in files.items():
                (directory / file).write_bytes(data)
            _SCORERS[key] = create_scorer(load_bundle(directory), "onnx", threads=1)
    return _SCORERS[key]


def score_dataframe(df: DataFrame, bundle_path: str | Path, options: BatchOptions | None = None) -> DataFrame:
    """A DataFrame of the bundle's columns (and options.id_columns) -> a DataFrame of the output
    columns of `anomaly-scores score`, lazily. Row numbers are not written (a partition has no
    position in a file): carry an id column to join the rows back."""
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    options = replace(options or BatchOptions(), row_numbers=False)
    files = bundle_files(bundle_path)
    bundle = load_bundle(bundle_path)
    ids = to_arrow_schema(df.select(*options.id_columns).schema) if options.id_columns else pa.schema([])
    schema = output_schema(bundle, options, {f.name: f.type for f in ids})

    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer = _scorer(files)
        for batch in batches:
            yield from score_batch(scorer, batch, options, schema, what="a Spark partition")

    return df.mapInArrow(score_partition, from_arrow_schema(schema))


def session(master: str | None = None, workers: int | None = None) -> SparkSession:
    """A session on `master`, or a local instance of `workers` cores (default: all) bound to
    127.0.0.1 without its web UI; local Python workers run this interpreter, where the package is."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("anomaly-scores").config(
        "spark.sql.execution.arrow.maxRecordsPerBatch", "65536"
    )
    if master is not None:
        return builder.master(master).getOrCreate()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (
        builder.master(f"local[{workers or os.cpu_count() or 1}]")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )


def _score_parts(
    files: dict[str, bytes],
    options: BatchOptions,
    schema: pa.Schema,
    staging: Path,
    units: Iterator[pa.RecordBatch],
) -> Iterator[pa.RecordBatch]:
    """A task: each unit of work (index, path, file, row group) scored into its own part file,
    part-<index>.parquet. Written under a name of this attempt's and renamed into place: a retried
    or speculative attempt of the same part replaces a whole file with a whole file."""
    import pyarrow.parquet as pq
    from pyspark import TaskContext

    scorer = _scorer(files)
    context = TaskContext.get()
    attempt = str(context.taskAttemptId()) if context else uuid.uuid4().hex  # unique per attempt
    for batch in units:
        for row in batch.to_pylist():
            group = None if row["row_group"] < 0 else row["row_group"]
            part = Part(row["path"], row["file"], group)
            final = staging / f"part-{row['index']:06d}.parquet"
            temporary = staging / f".{final.name}.attempt-{attempt}"
            written = 0
            with pq.ParquetWriter(temporary, schema) as writer:
                for scored in score_part(scorer, part, options, schema):
                    writer.write_batch(scored)
                    written += scored.num_rows
            os.replace(temporary, final)
            yield pa.RecordBatch.from_pydict({"rows": [written]}, schema=COUNTS)


def score_files(
    bundle_path: str | Path,
    data: str | Path,
    out: str | Path,
    options: BatchOptions | None = None,
    *,
    spark: SparkSession | None = None,
    master: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Score a Parquet or CSV file, or a directory of them, into Parquet part files under `out`: one
    task per row group (or CSV file), each row with `file` and `row` to join it back, exactly the
    rows `anomaly-scores score` writes. Runs on `spark` (a session of any master), else on this
    process's active session, else on a new session of `master` (see `session`), stopped at the
    end. `out` appears whole or not at all. On a cluster, `data` and `out` must be paths every
    executor sees (shared storage).

    Each task writes its part's Parquet file itself (part-<n>.parquet, n its place in the plan) and
    hands Spark only its row count: moving every scored batch back into the JVM for Spark's own
    writer cost a quarter of the throughput. A retried or speculative attempt replaces the whole
    file, so nothing is written twice."""
    options = replace(options or BatchOptions(), row_numbers=True)
    files = bundle_files(bundle_path)
    bundle = load_bundle(bundle_path)
    parts = plan_parts(data)
    schema = distributed_schema(bundle, options, parts)
    from pyspark.sql import SparkSession

    spark = spark or SparkSession.getActiveSession()
    spark_session = spark or session(master, workers)

    rows = [(i, p.path, p.file, -1 if p.row_group is None else p.row_group) for i, p in enumerate(parts)]
    units = spark_session.sparkContext.parallelize(rows, len(rows)).toDF(
        "index int, path string, file string, row_group int"
    )
    try:
        with staged_output(out) as staging:
            staging.mkdir(parents=True)
            units.mapInArrow(partial(_score_parts, files, options, schema, staging), "rows long").collect()
    finally:
        if spark is None:
            spark_session.stop()
    return {"parts": len(parts), "out": str(out)}
