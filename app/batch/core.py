"""Scoring a table in batches: one function from a batch of rows to its output columns.

`anomaly-scores score`, the Python API and the distributed engines all score through
score_chunks, so a file scored in one process and the same file scored by Ray or Spark, in any
number of parts, give the same rows: the same checks and missing-value policy (app.train.data), the
same columns in the same order and of the same Arrow types in every part (output_schema), row
numbers counted in the whole input.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from app.bundle.format import Bundle
from app.engine.scorer import Scorer
from app.train.data import Chunk, iter_batch_chunks, iter_chunks

# The score columns, in the order `score` writes them (ScoreOutput.columns), and their types.
SCORE_TYPES: dict[str, pa.DataType] = {
    "score": pa.float64(),
    "log_likelihood": pa.float64(),
    "log_prior": pa.float64(),
    "log_volume": pa.float64(),
    "log_residual": pa.float64(),
    "reconstruction_error": pa.float64(),
    "p_value": pa.float64(),
    "is_anomaly": pa.bool_(),
}
ROW = "row"


@dataclass(frozen=True)
class BatchOptions:
    """How a table is scored, the same for a file, a row group, a Ray block or a Spark partition."""

    method: str | None = None  # default: the bundle's
    fpr: float | None = None  # default: the bundle's
    id_columns: tuple[str, ...] = ()
    missing: Literal["error", "skip", "impute"] = "error"
    # Write `row`, the 1-based number of the row in its file: always when rows are skipped, and in
    # distributed runs, whose parts come back in no particular order.
    row_numbers: bool = False
    chunk_rows: int = 65_536

    @property
    def writes_rows(self) -> bool:
        return self.row_numbers or self.missing == "skip"


def output_schema(bundle: Bundle, options: BatchOptions, ids: Mapping[str, pa.DataType]) -> pa.Schema:
    """The columns every batch of a run is written with: ids, row, scores, constant_mismatch, imputed."""
    fields = []
    if options.writes_rows:
        fields.append(pa.field(ROW, pa.int64()))
    fields += [pa.field(name, kind) for name, kind in SCORE_TYPES.items()]
    if bundle.constants:
        fields.append(pa.field("constant_mismatch", pa.string()))
    if options.missing == "impute":
        fields.append(pa.field("imputed", pa.int64()))
    outputs = {f.name for f in fields}
    for i, name in enumerate(options.id_columns):
        if name in outputs or name in options.id_columns[:i]:
            clash = "is named twice" if name in options.id_columns[:i] else "has the name of an output column"
            raise ValueError(f"id column {name!r} {clash}; the output's are {sorted(outputs)}")
    return pa.schema([pa.field(name, ids[name]) for name in options.id_columns] + fields)


def score_chunks(
    scorer: Scorer,
    chunks: Iterable[Chunk],
    options: BatchOptions,
    schema: pa.Schema,
    on_chunk: Callable[[Chunk], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Each chunk of checked rows scored into one record batch of `schema` (output_schema);
    `on_chunk` sees each chunk first (how many rows of the file it read, kept or skipped)."""
    constants = list(scorer.bundle.constants)
    for chunk in chunks:
        if on_chunk is not None:
            on_chunk(chunk)
        output = scorer.score(chunk.values, options.method, options.fpr)
        columns: dict[str, object] = dict(chunk.ids)
        if options.writes_rows:
            columns[ROW] = chunk.rows + 1
        columns |= output.columns(constants)
        if chunk.imputed is not None:
            columns["imputed"] = chunk.imputed
        yield pa.record_batch([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)


def _reading(bundle: Bundle, options: BatchOptions) -> dict[str, Any]:
    """How rows are read for `options`, the same from a file as from memory (app.train.data)."""
    return {
        "feature_names": bundle.columns,
        "chunk_rows": options.chunk_rows,
        "id_columns": options.id_columns,
        "missing": options.missing,
        "fill": bundle.fill_values if options.missing == "impute" else None,
    }


def score_file(
    scorer: Scorer,
    path: str | Path,
    options: BatchOptions,
    schema: pa.Schema,
    row_group: int | None = None,
    on_chunk: Callable[[Chunk], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """A file (or one Parquet row group of it) streamed in chunks and scored; memory stays bounded by
    options.chunk_rows. Errors name the file, the row and the column."""
    chunks = iter_chunks(path, **_reading(scorer.bundle, options), row_group=row_group)
    return score_chunks(scorer, chunks, options, schema, on_chunk)


def score_batch(
    scorer: Scorer,
    batch: pa.RecordBatch | pa.Table,
    options: BatchOptions,
    schema: pa.Schema,
    *,
    what: str = "the batch",
    first_row: int = 0,
) -> Iterator[pa.RecordBatch]:
    """Rows already in memory (a Ray block, a Spark partition's Arrow batch, a DataFrame through
    pa.Table.from_pandas), columns by name, checked and scored as a file's rows are."""
    reading = _reading(scorer.bundle, options)
    offset = first_row
    for part in batch.to_batches() if isinstance(batch, pa.Table) else [batch]:
        chunks = iter_batch_chunks(part, **reading, what=what, first_row=offset)
        yield from score_chunks(scorer, chunks, options, schema)
        offset += part.num_rows


def as_numpy_columns(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """A scored batch as the column dict the command line's CSV and Parquet writers take."""
    return {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.schema.names}


# --- distributed runs --------------------------------------------------------------------------------

FILE = "file"
INPUT_SUFFIXES = (".parquet", ".pq", ".csv")


@dataclass(frozen=True)
class Part:
    """One unit of distributed work: a Parquet row group, or a whole CSV file (which has no index to
    split it by). `file` names it in the output: its path relative to the input directory."""

    path: str
    file: str
    row_group: int | None


def plan_parts(data: str | Path) -> list[Part]:
    """The parts of a Parquet or CSV file, or of a directory of them (searched recursively, in name
    order, skipping files and folders whose names start with '.' or '_', such as Spark's _SUCCESS
    and _temporary/), read from the Parquet footers alone: the driver never reads the rows."""
    import pyarrow.parquet as pq

    root = Path(data)
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in INPUT_SUFFIXES
            # Spark's _temporary/ of a running or failed job, .ipynb_checkpoints/: not the table's rows
            and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
        )
        if not files:
            raise ValueError(f"{root} holds no {', '.join(INPUT_SUFFIXES)} file")
    elif root.is_file():
        files = [root]
    else:
        raise ValueError(f"{root}: no such file or directory")
    kinds = {"csv" if p.suffix.lower() == ".csv" else "parquet" for p in files}
    if len(kinds) > 1:  # their ids would be typed differently (CSV cells are strings)
        raise ValueError(f"{root} mixes CSV and Parquet files; score each kind on its own")
    parts = []
    for path in files:
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        if path.suffix.lower() == ".csv":
            parts.append(Part(str(path), name, None))
            continue
        groups = pq.ParquetFile(path).metadata.num_row_groups
        parts += [Part(str(path), name, i) for i in range(groups)]
    return parts


def distributed_schema(bundle: Bundle, options: BatchOptions, parts: list[Part]) -> pa.Schema:
    """What every part file of a distributed run holds: `file`, then output_schema with `row`."""
    from app.train.data import id_types

    ids = id_types(parts[0].path, options.id_columns) if parts else {}
    schema = output_schema(bundle, options, ids)
    return schema.insert(0, pa.field(FILE, pa.string()))


def score_part(
    scorer: Scorer, part: Part, options: BatchOptions, schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    """One part scored as `score` scores its file, its rows numbered in the file, `file` added."""
    inner = pa.schema([field for field in schema if field.name != FILE])
    for batch in score_file(scorer, part.path, options, inner, part.row_group):
        name = pa.array([part.file] * batch.num_rows, type=pa.string())
        yield pa.RecordBatch.from_arrays([name, *batch.columns], schema=schema)


# How a data error reads in the remote traceback that Ray and Spark put into their own exceptions.
_REMOTE_DATA_ERROR = re.compile(r"app\.train\.data\.(DataError|MissingValue): ([^\n]+)")


def user_error(error: BaseException) -> Exception | None:
    """The data error (app.train.data.DataError, MissingValue) a worker raised, rebuilt from the
    exception an engine wrapped it in, so that a user reads the message the single-process command
    gives: the file, the row and the column. None if the failure was something else."""
    from app.train.data import DataError, MissingValue

    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        found = _REMOTE_DATA_ERROR.search(str(current))
        if found is not None:
            return (MissingValue if found.group(1) == "MissingValue" else DataError)(found.group(2))
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """A new directory beside `out` for a run's part files, moved to `out` when the block ends
    without an error and removed when it does not: `out` holds a whole result or nothing. A data
    error that an engine wrapped in its own exception is raised as the user's (user_error)."""
    final = Path(out)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        try:
            yield staging
        except Exception as error:
            cause = user_error(error)
            if cause is None:
                raise
            raise cause from None
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
