"""Ray Data: score a Parquet or CSV table, or a Dataset a user already holds, on a Ray cluster or a
local Ray instance (the `ray` extra; the service and the plain command line never import it).

Each actor builds its scorer once from the bundle path (onnxruntime sessions do not pickle) with
one onnxruntime thread per actor CPU, and scores through app.batch.core, so the part files hold
exactly the rows `anomaly-scores score` writes for the same input. See docs/scale-out.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, replace
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
from app.bundle.format import load_bundle
from app.engine.factory import create_scorer

if TYPE_CHECKING:
    import ray.data


class _Scorer:
    """Built once per actor: the bundle loaded and checked, one single-threaded onnx scorer."""

    def __init__(self, bundle_path: str, options: BatchOptions, schema: pa.Schema) -> None:
        self.scorer = create_scorer(load_bundle(bundle_path), "onnx", threads=1)
        self.options, self.schema = options, schema


class _PartScorer(_Scorer):
    def __call__(self, parts: pa.Table) -> Iterator[pa.Table]:
        for row in parts.to_pylist():
            part = Part(**row)
            for batch in score_part(self.scorer, part, self.options, self.schema):
                yield pa.Table.from_batches([batch])


class _BatchScorer(_Scorer):
    def __call__(self, block: pa.Table) -> Iterator[pa.Table]:
        for batch in score_batch(self.scorer, block, self.options, self.schema, what="a Ray block"):
            yield pa.Table.from_batches([batch])


def _arrow_schema(dataset: ray.data.Dataset) -> pa.Schema:
    """The Dataset's columns as Arrow types, whether its blocks are Arrow tables or pandas frames
    (whose object columns, such as string ids, become strings)."""
    schema = dataset.schema()
    if schema is None:
        raise ValueError("the Dataset has no rows and no schema: nothing to score")
    fields = []
    for name, kind in zip(schema.names, schema.types, strict=True):
        if isinstance(kind, pa.DataType):
            fields.append(pa.field(name, kind))
        elif kind is None or getattr(kind, "kind", "O") == "O":
            fields.append(pa.field(name, pa.string()))
        else:
            fields.append(pa.field(name, pa.from_numpy_dtype(kind)))
    return pa.schema(fields)


def _workers(requested: int | None) -> int:
    import ray

    return requested or max(1, int(ray.cluster_resources().get("CPU", 1)))


def score_dataset(
    dataset: ray.data.Dataset,
    bundle_path: str | Path,
    options: BatchOptions | None = None,
    *,
    workers: int | None = None,
    batch_size: int = 65_536,
) -> ray.data.Dataset:
    """A Dataset of the bundle's columns (and options.id_columns) -> a Dataset of the output columns
    of `anomaly-scores score`, lazily: write it, or iterate it. Row numbers are not written (a
    Dataset's blocks have no position in a file): carry an id column to join the rows back.

    workers: scoring actors of one CPU each; by default the cluster's CPUs but one, which is left to
    the tasks that read the blocks (actors holding every CPU would wait forever for their input)."""
    import ray.data

    from app.train.data import id_types

    bundle = load_bundle(bundle_path)  # refused here, on the driver, rather than in every actor
    options = replace(options or BatchOptions(), row_numbers=False)
    schema = output_schema(bundle, options, id_types(_arrow_schema(dataset), options.id_columns))
    return dataset.map_batches(
        _BatchScorer,
        fn_constructor_args=(str(bundle.path), options, schema),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers or max(1, _workers(None) - 1)),
        num_cpus=1,
    )


def score_files(
    bundle_path: str | Path,
    data: str | Path,
    out: str | Path,
    options: BatchOptions | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Score a Parquet or CSV file, or a directory of them, into Parquet part files under `out`,
    one part of work per row group (or CSV file), each row with `file` and `row` to join it back.
    Connects to the cluster at `address` (as ray.init), or starts a local instance of `workers`
    CPUs. `out` appears whole or not at all: the parts are written beside it and moved in. On a
    cluster, the bundle, `data` and `out` must be paths every node sees (shared storage): the
    workers read the data and write the parts there, and the driver moves them into place."""
    import ray
    import ray.data

    bundle = load_bundle(bundle_path)
    options = replace(options or BatchOptions(), row_numbers=True)
    parts = plan_parts(data)
    schema = distributed_schema(bundle, options, parts)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False)
    try:
        size = min(_workers(workers), len(parts))
        units = ray.data.from_items([asdict(p) for p in parts], override_num_blocks=len(parts))
        scored = units.map_batches(
            _PartScorer,
            fn_constructor_args=(str(bundle.path), options, schema),
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=size),
            num_cpus=1,
        )
        with staged_output(out) as staging:
            scored.write_parquet(str(staging))
    finally:
        if started:
            ray.shutdown()
    return {"parts": len(parts), "workers": size, "out": str(out)}
