"""Readers that turn a user's data file into a float64 matrix, or say exactly what is wrong with it.

Anything a user can fix in their file is a DataError naming the file and, where there is one, the row and
column. Library exceptions are wrapped (kept as __cause__) so a user never has to read a pyarrow or numpy
traceback, and no row is dropped without being reported: Table.dropped_rows lists them.

CSV is parsed by pyarrow rather than pandas because pandas' C parser pads a short row with empty cells,
which would turn a ragged row into "missing values" (and, with missing="drop", into a dropped row).
"""

from __future__ import annotations

import csv
import itertools
import stat
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from app.model.methods import MAX_ABS_VALUE, npy_problem


class DataError(ValueError):
    """A user's data file cannot be used; the message names the file and the row and/or column."""


class MissingValue(DataError):
    """A missing value where the caller's policy does not allow one: the caller can name its option."""


# Column names that usually hold anomaly labels, not measurements (compared lower-cased).
LABEL_LIKE_NAMES = frozenset(
    {
        "label",
        "labels",
        "target",
        "class",
        "anomaly",
        "anomalies",
        "outlier",
        "is_anomaly",
        "y",
        "ground_truth",
    }
)


@dataclass(frozen=True, eq=False)
class Chunk:
    """Consecutive rows of a file being scored: their values, their ids, and how missing values went."""

    values: np.ndarray  # (m, d) float64, the rows kept
    rows: np.ndarray  # (m,) 0-based row numbers in the file, so rows skipped for missing values show
    ids: dict[str, list[Any]]  # id column -> its values for the kept rows, as the file holds them
    imputed: np.ndarray | None  # (m,) cells filled in per row, with missing="impute"
    end: int  # rows of the file read once this chunk is, kept or skipped


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == has no single truth value
class Table:
    """A data file as a checked matrix: every value finite, enough rows."""

    values: np.ndarray  # (n, d) float64, C-contiguous
    feature_names: list[str]  # length d
    labels: np.ndarray | None  # (n,) bool when labels were given, else None
    dropped_rows: tuple[int, ...] = ()  # 0-based rows removed by missing="drop", for the caller to report


_Column = pa.Array | np.ndarray

_READ_CHUNK = 65536
# Compared after trimming and lower-casing: the spellings spreadsheets and pandas write for "no value".
_MISSING_TOKENS = pa.array(["", "na", "n/a", "nan", "null", "none"])
_TRUE_TOKENS = pa.array(["1", "1.0", "true"])
_FALSE_TOKENS = pa.array(["0", "0.0", "false"])


@dataclass(frozen=True)
class _Batch:
    """Consecutive data rows of a file, as raw columns in the order they were asked for."""

    start: int  # 0-based data row of the first row, so errors can name rows of the whole file
    n_rows: int
    columns: list[_Column]
    lines: list[int] | None = None  # file line of each row, where skipped lines make it differ from the row


class _Source(ABC):
    """A data file opened far enough to know its columns; the rows are read in batches on demand."""

    by_name: bool  # whether columns are chosen by header name (CSV, Parquet) or by position
    row_convention: str  # spelled out in messages because editors and tools count rows differently
    names: list[str]

    def __init__(self, path: Path | str) -> None:
        self.path = path  # a file, or the description of an in-memory batch in messages

    @abstractmethod
    def batches(self, columns: list[int], chunk_rows: int) -> Iterator[_Batch]:
        """All data rows in file order, at most chunk_rows at a time, holding the given columns."""

    def error(self, message: str) -> DataError:
        return DataError(f"{self.path}: {message}")

    def row(self, index: int, line: int | None = None) -> str:
        text = f"row {index + 1} ({self.row_convention})"
        return text if line is None else f"{text}, line {line}"

    def where(self, batch: _Batch, i: int) -> str:
        return self.row(batch.start + i, None if batch.lines is None else batch.lines[i])

    def select(self, wanted: Sequence[str]) -> list[int]:
        """Positions of the wanted columns: by name where the file has names, else by width alone."""
        if not self.by_name:
            if len(wanted) != len(self.names):
                raise self.error(f"expected {len(wanted)} columns, found {len(self.names)}")
            return list(range(len(wanted)))
        position = {name: j for j, name in enumerate(self.names)}
        absent = [name for name in wanted if name not in position]
        if absent:
            raise self.error(f"no column {_quoted(absent)}; the columns are {_quoted(self.names)}")
        return [position[name] for name in wanted]


class _CsvSource(_Source):
    by_name = True
    row_convention = "1-based, header not counted"

    def __init__(self, path: Path, head: bytes) -> None:
        super().__init__(path)
        _reject_binary(path, head, "CSV")
        with self._arrow_errors():
            raw_names = self._reader().schema.names
        names = [name.strip() for name in raw_names]
        if "" in names:
            raise self.error(
                f"column {names.index('') + 1} has no name in the header "
                "(a row index written by pandas' to_csv? write the file with index=False)"
            )
        duplicates = [name for name, count in Counter(names).items() if count > 1]
        if duplicates:
            raise self.error(f"duplicate column name(s) in the header: {_quoted(duplicates)}")
        if len(names) == 1 and ";" in names[0]:
            raise self.error(
                f"has one column, named {names[0][:60]!r}: it looks separated by semicolons; "
                "save it with commas (a spreadsheet's 'CSV (comma delimited)')"
            )
        # pandas writes 0, 1, 2, ... as the header of an unnamed frame, and sensors may be numbered:
        # whole numbers in increasing order can be names. A first row of data rarely is in order (a
        # headerless table of integers lost its first row to the header, silently).
        numbered = all(name.isdigit() for name in names) and all(
            int(a) < int(b) for a, b in itertools.pairwise(names)
        )
        if all(_is_float(name) for name in names) and not numbered:
            raise self.error(
                "its first line holds numbers, not column names: a CSV file needs a header line "
                "(headerless numbers can be a whitespace-separated .txt file)"
            )
        self.names = names

    def _reader(self) -> pa_csv.CSVStreamingReader:
        # Every cell is read as a string so that the numeric parse, and its error messages, are ours.
        return pa_csv.open_csv(
            self.path,
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(default_column_type=pa.string(), strings_can_be_null=False),
        )

    @contextmanager
    def _arrow_errors(self) -> Iterator[None]:
        try:
            yield
        except pa.ArrowInvalid as error:
            raise self._explain(error) from error

    def _explain(self, error: pa.ArrowInvalid) -> DataError:
        """Arrow names neither the line nor the row reliably, so the error is found by re-reading the file."""
        line = _non_utf8_line(self.path)
        if line is not None:
            return self.error(f"line {line} is not UTF-8 text; save the file as UTF-8")
        ragged = _ragged_csv_row(self.path)
        if ragged is not None:
            row, line, found, width = ragged
            return self.error(f"{self.row(row, line)} has {found} fields but the header has {width}")
        if "straddl" in str(error):  # arrow's "straddling object straddles two block boundaries"
            return self.error(
                "holds a field longer than the CSV reader's block of 1 MiB: a value of megabytes, or a "
                "quote opened and never closed, which runs on to the end of the file"
            )
        return self.error(f"cannot be parsed as CSV: {error}")

    def batches(self, columns: list[int], chunk_rows: int) -> Iterator[_Batch]:
        start = 0
        with self._arrow_errors():
            for block in self._reader():
                for offset in range(0, block.num_rows, chunk_rows):
                    rows = block.slice(offset, chunk_rows)
                    yield _Batch(start, rows.num_rows, [rows.column(j) for j in columns])
                    start += rows.num_rows


class _ParquetSource(_Source):
    by_name = True
    row_convention = "1-based"

    def __init__(self, path: Path, head: bytes) -> None:
        super().__init__(path)
        if not head.startswith(b"PAR1"):
            raise self.error("is not a Parquet file (it does not start with the Parquet magic bytes)")
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as error:  # Arrow's IO errors are plain OSError
            raise self.error(f"cannot be read as Parquet: {error}") from error
        # pandas stores a non-default index as a column; it labels rows and is not a feature.
        index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
        names = [name for name in schema.names if name not in index]
        duplicates = [name for name, count in Counter(names).items() if count > 1]
        if duplicates:
            raise self.error(f"duplicate column name(s): {_quoted(duplicates)}")
        self.names = names

    row_group: int | None = None  # one row group of the file, or all of them

    def batches(self, columns: list[int], chunk_rows: int) -> Iterator[_Batch]:
        names = [self.names[j] for j in columns]
        try:
            with pq.ParquetFile(self.path) as file:
                groups = None if self.row_group is None else [self.row_group]
                # Rows are numbered in the whole file, whichever row group is read.
                start = sum(file.metadata.row_group(i).num_rows for i in range(self.row_group or 0))
                for batch in file.iter_batches(batch_size=chunk_rows, columns=names, row_groups=groups):
                    # iter_batches returns columns in file order, whatever order they were asked for in.
                    yield _Batch(start, batch.num_rows, [batch.column(name) for name in names])
                    start += batch.num_rows
        except (pa.ArrowException, OSError) as error:  # Arrow's IO errors are plain OSError
            raise self.error(f"cannot be read as Parquet: {error}") from error


class _ArrowSource(_Source):
    """Rows already in memory (a Ray or Spark batch, a DataFrame), read as a file of their columns is:
    by name, each column parsed and checked alike, rows numbered from `first_row`."""

    by_name = True
    row_convention = "1-based"

    def __init__(self, batch: pa.RecordBatch, what: str, first_row: int) -> None:
        super().__init__(what)
        self._batch, self._first = batch, first_row
        duplicates = [name for name, count in Counter(batch.schema.names).items() if count > 1]
        if duplicates:
            raise self.error(f"duplicate column name(s): {_quoted(duplicates)}")
        self.names = list(batch.schema.names)

    def batches(self, columns: list[int], chunk_rows: int) -> Iterator[_Batch]:
        for offset in range(0, self._batch.num_rows, chunk_rows):
            rows = self._batch.slice(offset, chunk_rows)
            yield _Batch(self._first + offset, rows.num_rows, [rows.column(j) for j in columns])


class _NpySource(_Source):
    by_name = False
    row_convention = "1-based"

    def __init__(self, path: Path, head: bytes) -> None:
        super().__init__(path)
        if not head.startswith(b"\x93NUMPY"):
            raise self.error("is not a NumPy .npy file (bad magic string)")
        try:
            # mmap keeps memory bounded; allow_pickle=False because a pickle can run code on load.
            self._array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise self.error(f"cannot be read as a .npy array: {npy_problem(error)}") from error
        if self._array.ndim != 2:
            raise self.error(f"must hold a 2-D array (rows x columns), found shape {self._array.shape}")
        dtype = self._array.dtype
        # dtype.kind, not issubdtype: numpy counts timedelta64 ("m") among the integers
        if dtype.kind not in "iuf":
            raise self.error(f"holds {dtype} values; only integer and floating-point arrays are numeric data")
        self.names = [f"x{j}" for j in range(self._array.shape[1])]

    def batches(self, columns: list[int], chunk_rows: int) -> Iterator[_Batch]:
        for start in range(0, len(self._array), chunk_rows):
            block = self._array[start : start + chunk_rows]
            yield _Batch(start, len(block), [block[:, j] for j in columns])


class _TextSource(_Source):
    """Whitespace-separated numbers without a header, read the way numpy.loadtxt reads them."""

    by_name = False
    row_convention = "1-based"

    def __init__(self, path: Path, head: bytes) -> None:
        super().__init__(path)
        _reject_binary(path, head, "plain")
        first = next(self._lines(), None)
        if first is None:
            raise self.error("has no data rows, only blank or comment lines")
        self.names = [f"x{j}" for j in range(len(first[1]))]

    def _lines(self) -> Iterator[tuple[int, list[str]]]:
        """(line number, fields) of each data line; blank and '#' comment lines are skipped, as by loadtxt."""
        with self.path.open("rb") as file:
            for number, raw in enumerate(file, 1):
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise self.error(f"line {number} is not UTF-8 text; save the file as UTF-8") from error
                fields = text.split("#", 1)[0].split()
                if fields:
                    yield number, fields

    def batches(self, columns: list[int], chunk_rows: int) -> Iterator[_Batch]:
        width = len(self.names)
        start, lines, rows = 0, [], []
        for number, fields in self._lines():
            if len(fields) != width:
                where = self.row(start + len(rows), number)
                raise self.error(f"{where} has {len(fields)} values but the first row has {width}")
            lines.append(number)
            rows.append(fields)
            if len(rows) == chunk_rows:
                yield self._batch(start, lines, rows, columns)
                start, lines, rows = start + len(rows), [], []
        if rows:
            yield self._batch(start, lines, rows, columns)

    @staticmethod
    def _batch(start: int, lines: list[int], rows: list[list[str]], columns: list[int]) -> _Batch:
        strings = [pa.array([fields[j] for fields in rows], type=pa.string()) for j in columns]
        return _Batch(start, len(rows), strings, lines)


_FORMATS: dict[str, type[_Source]] = {
    ".csv": _CsvSource,
    ".parquet": _ParquetSource,
    ".pq": _ParquetSource,
    ".npy": _NpySource,
    ".txt": _TextSource,
    ".dat": _TextSource,
}


def read_table(
    path: str | Path,
    *,
    label_column: str | None = None,
    labels_path: str | Path | None = None,
    missing: Literal["error", "drop"] = "error",
    min_rows: int = 2,
    exclude: Sequence[str] = (),
) -> Table:
    """Read a whole data file into a checked Table.

    label_column names a column of 0/1 (or true/false) anomaly labels, which is not a feature; labels_path is
    instead a separate file of them, one per data row (text, one per line, or a one-column CSV with a header).
    missing="drop" removes rows with a missing value rather than failing, and lists them in dropped_rows;
    an infinite value or a missing label is always an error. exclude names columns that are not
    features (ids, anything to leave out); they must exist.
    """
    if missing not in ("error", "drop"):
        raise ValueError(f"missing must be 'error' or 'drop', got {missing!r}")
    if label_column is not None and labels_path is not None:
        raise ValueError("give label_column or labels_path, not both")
    source = _open(Path(path))
    features = _feature_columns(source, label_column, exclude)

    values, keep, labels = _read_rows(source, features, label_column, missing)
    if labels_path is not None:
        labels = _read_labels(Path(labels_path), len(values), source.path)
    dropped = tuple(np.flatnonzero(~keep).tolist())
    if dropped:
        values = values[keep]
        labels = None if labels is None else labels[keep]

    feature_names = [source.names[j] for j in features]
    if len(values) < min_rows:
        after = f" after dropping {len(dropped)} with missing values" if dropped else ""
        raise source.error(f"has {len(values)} data rows{after}; at least {min_rows} are needed")
    return Table(values, feature_names, labels, dropped)


def _feature_columns(source: _Source, label_column: str | None, exclude: Sequence[str]) -> list[int]:
    """Every column but the label and the excluded ones, each of which must exist."""
    features = list(range(len(source.names)))
    if label_column is not None:
        if label_column not in source.names:
            raise source.error(f"no label column {label_column!r}; the columns are {_quoted(source.names)}")
        features.remove(source.names.index(label_column))
    for name in exclude:
        if not source.by_name:
            raise source.error(f"has no column names, so no column {name!r} can be left out")
        if name not in source.names:
            raise source.error(f"no column {name!r} to leave out; the columns are {_quoted(source.names)}")
        if source.names.index(name) in features:
            features.remove(source.names.index(name))
    if not features:
        raise source.error("has no feature columns besides the label and left-out columns")
    return features


def _read_rows(
    source: _Source, features: list[int], label_column: str | None, missing: Literal["error", "drop"]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """All rows: the feature matrix, which rows are complete, and the labels when the file holds them."""
    names = [source.names[j] for j in features]
    label = [] if label_column is None else [source.names.index(label_column)]
    blocks, complete, label_blocks = [], [], []
    for batch in source.batches(features + label, _READ_CHUNK):
        values, incomplete = _matrix(source, batch, batch.columns[: len(features)], names, missing)
        blocks.append(values)
        complete.append(~incomplete)
        if label_column is not None:
            label_blocks.append(_labels(source, batch, batch.columns[-1], f"label column {label_column!r}"))
    if not blocks:
        empty = np.zeros(0, dtype=bool)
        return np.empty((0, len(features))), empty, None if label_column is None else empty
    labels = None if label_column is None else np.concatenate(label_blocks)
    return np.concatenate(blocks), np.concatenate(complete), labels


def iter_chunks(
    path: str | Path,
    feature_names: list[str],
    chunk_rows: int = 65536,
    *,
    id_columns: Sequence[str] = (),
    missing: Literal["error", "skip", "impute"] = "error",
    fill: np.ndarray | None = None,
    row_group: int | None = None,
) -> Iterator[Chunk]:
    """Stream a file in chunks of at most chunk_rows rows, in order, with their ids.

    Memory stays bounded by chunk_rows whatever the file size. CSV and Parquet columns are chosen by name in
    feature_names order (others, such as a label column, are ignored); .npy and text files have no names, so
    their width must equal len(feature_names) and they have no id columns. Values are checked as read_table
    checks them. A missing value is an error (MissingValue), a skipped row (missing="skip", its number
    absent from Chunk.rows) or replaced by `fill`'s value for its column (missing="impute", counted per
    row in Chunk.imputed). The file and its columns are checked on the call, not on the first chunk.
    row_group: a Parquet file's row group alone (a unit of distributed work), its rows numbered in
    the whole file.
    """
    source = _open(Path(path))
    if row_group is not None:
        if not isinstance(source, _ParquetSource):
            raise source.error("only a Parquet file has row groups")
        source.row_group = row_group
    return _source_chunks(source, feature_names, chunk_rows, id_columns, missing, fill)


def iter_batch_chunks(
    batch: pa.RecordBatch,
    feature_names: list[str],
    chunk_rows: int = 65536,
    *,
    id_columns: Sequence[str] = (),
    missing: Literal["error", "skip", "impute"] = "error",
    fill: np.ndarray | None = None,
    what: str = "the batch",
    first_row: int = 0,
) -> Iterator[Chunk]:
    """iter_chunks for rows already in memory: the columns chosen by name, parsed, checked and
    missing values handled exactly as a file's; messages name `what` and rows from first_row + 1."""
    source = _ArrowSource(batch, what, first_row)
    return _source_chunks(source, feature_names, chunk_rows, id_columns, missing, fill)


def id_types(data: str | Path | pa.Schema, id_columns: Sequence[str]) -> dict[str, pa.DataType]:
    """The Arrow type of each id column as iter_chunks or iter_batch_chunks give its values: a
    CSV's are strings, a Parquet file's and a batch's their own; every part of a distributed run
    writes them alike, whatever values its rows happen to hold."""
    if isinstance(data, pa.Schema):
        schema = data
    else:
        source = _open(Path(data))
        if not isinstance(source, _ParquetSource):
            return {name: pa.string() for name in id_columns}
        schema = pq.read_schema(source.path)
    absent = [name for name in id_columns if name not in schema.names]
    if absent:
        raise DataError(f"no id column {_quoted(absent)}; the columns are {_quoted(schema.names)}")
    return {name: schema.field(name).type for name in id_columns}


def _source_chunks(
    source: _Source,
    feature_names: list[str],
    chunk_rows: int,
    id_columns: Sequence[str],
    missing: Literal["error", "skip", "impute"],
    fill: np.ndarray | None,
) -> Iterator[Chunk]:
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if missing not in ("error", "skip", "impute"):
        raise ValueError(f"missing must be 'error', 'skip' or 'impute', got {missing!r}")
    if missing == "impute" and (fill is None or fill.shape != (len(feature_names),)):
        raise ValueError("missing='impute' needs one fill value per feature")
    if id_columns and not source.by_name:
        raise source.error("has no column names, so it has no id column")
    columns = source.select([*feature_names, *id_columns])
    return _chunks(source, columns, list(feature_names), chunk_rows, missing, fill)


def _chunks(
    source: _Source,
    columns: list[int],
    names: list[str],
    chunk_rows: int,
    missing: Literal["error", "skip", "impute"],
    fill: np.ndarray | None,
) -> Iterator[Chunk]:
    d = len(names)
    id_names = [source.names[j] for j in columns[d:]]
    for batch in source.batches(columns, chunk_rows):
        values, incomplete = _matrix(
            source, batch, batch.columns[:d], names, "error" if missing == "error" else "drop"
        )
        rows = np.arange(batch.start, batch.start + batch.n_rows)
        keep = ~incomplete if missing == "skip" else np.ones(batch.n_rows, dtype=bool)
        imputed = None
        if missing == "impute":
            absent = np.isnan(values)
            imputed = absent.sum(axis=1)
            values = np.where(absent, fill, values)  # type: ignore[arg-type]
        ids = {name: _as_list(column)[keep] for name, column in zip(id_names, batch.columns[d:], strict=True)}
        ids_kept = {k: v.tolist() for k, v in ids.items()}
        yield Chunk(values[keep], rows[keep], ids_kept, imputed, batch.start + batch.n_rows)


def _as_list(column: _Column) -> np.ndarray:
    return column if isinstance(column, np.ndarray) else np.asarray(column.to_pylist(), dtype=object)


def read_label_column(path: str | Path, column: str) -> np.ndarray:
    """One column of 0/1 (or true/false) anomaly labels, as bool, one per data row in file order, so
    it lines up with iter_chunks' Chunk.rows. Only CSV and Parquet name their columns; a missing or
    non-0/1 label is an error naming its row, as read_table's label column."""
    source = _open(Path(path))
    if not source.by_name:
        raise source.error(f"has no column names, so no label column {column!r}")
    if column not in source.names:
        raise source.error(f"no label column {column!r}; the columns are {_quoted(source.names)}")
    what = f"label column {column!r}"
    j = source.names.index(column)
    blocks = [_labels(source, batch, batch.columns[0], what) for batch in source.batches([j], _READ_CHUNK)]
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=bool)


def label_like_columns(table: Table) -> list[str]:
    """Feature columns whose name and 0/1 values suggest anomaly labels trained on by mistake."""
    found = []
    for j, name in enumerate(table.feature_names):
        if name.strip().lower() in LABEL_LIKE_NAMES and np.isin(table.values[:, j], (0.0, 1.0)).all():
            found.append(name)
    return found


def _open(path: Path, *, labels: bool = False) -> _Source:
    """The file, checked to exist and to be what its extension says; a labels file is CSV or else text."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as error:
        raise DataError(f"{path}: no such file") from error
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from error
    if not stat.S_ISREG(mode):
        # A FIFO blocks the open until a writer comes and cannot be read twice; a device never ends.
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device"
        raise DataError(f"{path}: is {kind}, not a regular file")
    try:
        with path.open("rb") as file:
            head = file.read(8192)
    except FileNotFoundError as error:
        raise DataError(f"{path}: no such file") from error
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from error
    if not head:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if labels:
        kind = _CsvSource if suffix == ".csv" else _TextSource
    else:
        if suffix not in _FORMATS:
            raise DataError(
                f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
                f"supported: {', '.join(_FORMATS)}"
            )
        kind = _FORMATS[suffix]
    return kind(path, head)


def _read_labels(path: Path, n_rows: int, data_path: Path) -> np.ndarray:
    source = _open(path, labels=True)
    if len(source.names) != 1:
        raise source.error(f"a labels file holds one label per row, but this has {len(source.names)} columns")
    blocks = [
        _labels(source, batch, batch.columns[0], "labels") for batch in source.batches([0], _READ_CHUNK)
    ]
    labels = np.concatenate(blocks) if blocks else np.zeros(0, dtype=bool)
    if len(labels) != n_rows:
        raise source.error(f"has {len(labels)} labels but {data_path} has {n_rows} data rows")
    return labels


def _matrix(
    source: _Source,
    batch: _Batch,
    columns: list[_Column],
    names: list[str],
    missing: Literal["error", "drop"],
) -> tuple[np.ndarray, np.ndarray]:
    """The columns as an (n, d) float64 matrix, and which rows have a missing value (allowed only to drop)."""
    values = np.empty((batch.n_rows, len(names)))
    for j, (column, name) in enumerate(zip(columns, names, strict=True)):
        values[:, j] = _numbers(source, batch, column, name)
    nonfinite = ~np.isfinite(values)
    with np.errstate(invalid="ignore"):
        too_large = np.abs(values) > MAX_ABS_VALUE  # infinities included; NaN (missing) is not
    fatal = too_large | nonfinite if missing == "error" else too_large
    if fatal.any():
        i, j = np.argwhere(fatal)[0]  # row-major, so the first bad cell in file order is reported
        message = f"{source.where(batch, i)}, column {names[j]!r} holds"
        if np.isinf(values[i, j]):
            raise source.error(f"{message} an infinite value")
        if too_large[i, j]:
            raise source.error(
                f"{message} {values[i, j]:g}, beyond the limit of {MAX_ABS_VALUE:g} on any value "
                "(rescale the column, e.g. seconds rather than nanoseconds)"
            )
        raise MissingValue(f"{source.path}: {message} a missing value")
    return values, nonfinite.any(axis=1)


def _plain(column: _Column) -> _Column:
    """The column's values in a plain Arrow type: pandas writes a `category` column as a dictionary
    (numbers or their text), and Arrow may hand text over as a string view."""
    if isinstance(column, pa.Array) and pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if isinstance(column, pa.Array) and pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())
    return column


def _numbers(source: _Source, batch: _Batch, column: _Column, name: str) -> np.ndarray:
    """One column as float64, NaN where a value is missing; a non-numeric value is an error."""
    if isinstance(column, np.ndarray):
        return column.astype(np.float64)
    column = _plain(column)
    if _is_string(column.type):
        return _parse_numbers(source, batch, column, name)
    if _is_numeric(column.type):
        return pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    first = f"{source.where(batch, 0)} is {_value(column, 0)!r}"
    raise source.error(f"column {name!r} holds {column.type} values, not numbers: {first}")


def _parse_numbers(source: _Source, batch: _Batch, strings: pa.Array, name: str) -> np.ndarray:
    trimmed = pc.utf8_trim_whitespace(strings)
    is_missing = pc.is_in(pc.utf8_lower(trimmed), value_set=_MISSING_TOKENS)
    cleaned = pc.if_else(is_missing, None, trimmed)
    try:
        return pc.cast(cleaned, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as error:
        i = _first_unparsable(cleaned)
        raise source.error(
            f"column {name!r} is not numeric: {source.where(batch, i)} holds {_value(strings, i)!r}"
        ) from error


def _first_unparsable(strings: pa.Array) -> int:
    """Index of the first string Arrow cannot parse as a float, found by bisection in O(n) total work.

    Arrow's cast reports the bad value but not where it is; only called once a cast of the whole array failed.
    """
    lo, hi = 0, len(strings)  # strings[:lo] all parse, strings[lo:hi] holds one that does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(strings.slice(lo, mid - lo), pa.float64())
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


def _labels(source: _Source, batch: _Batch, column: _Column, what: str) -> np.ndarray:
    """Anomaly labels as bool, from 0/1 or true/false; a missing label is an error, never guessed at."""
    column = _plain(column)
    if isinstance(column, np.ndarray) or _is_numeric(column.type):
        numbers = _numbers(source, batch, column, what)
        is_true = numbers == 1
        valid = is_true | (numbers == 0)
    elif _is_string(column.type):
        tokens = pc.utf8_lower(pc.utf8_trim_whitespace(column))
        is_true = pc.is_in(tokens, value_set=_TRUE_TOKENS).to_numpy(zero_copy_only=False)
        valid = is_true | pc.is_in(tokens, value_set=_FALSE_TOKENS).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~valid):  # other spellings of 0 and 1: "1.00", "0e0"
            number = _as_number(tokens[i].as_py())
            if number in (0.0, 1.0):
                is_true[i], valid[i] = number == 1.0, True
    elif pa.types.is_boolean(column.type):
        is_true = pc.fill_null(column, False).to_numpy(zero_copy_only=False)
        valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    else:
        raise source.error(f"{what} holds {column.type} values, not 0/1 or true/false")
    if not valid.all():
        i = int(np.argmin(valid))
        raise source.error(
            f"{what} must be 0/1 or true/false, but {source.where(batch, i)} holds {_value(column, i)!r}"
        )
    return is_true


def _as_number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def _value(column: _Column, i: int) -> Any:
    return column[i].as_py() if isinstance(column, pa.Array) else column[i].item()


def _reject_binary(path: Path, head: bytes, kind: str) -> None:
    """Say what a misnamed file really is, rather than failing later on a confusing parse error."""
    if head.startswith(b"PAR1"):
        found = "a Parquet file"
    elif head.startswith(b"\x93NUMPY"):
        found = "a NumPy .npy file"
    elif b"\x00" in head:
        found = "binary data (or UTF-16 text)"
    else:
        return
    raise DataError(f"{path}: is not {kind} text but {found}")


def _non_utf8_line(path: Path) -> int | None:
    # Splitting bytes on newlines is safe: no multi-byte UTF-8 sequence contains a newline byte.
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _ragged_csv_row(path: Path) -> tuple[int, int, int, int] | None:
    """(0-based data row, line, fields, header fields) of the first row unlike the header in width."""
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file)
        width, row = None, 0
        try:
            for fields in reader:
                if not fields:  # blank lines are skipped, as Arrow skips them, so rows are counted alike
                    continue
                if width is None:
                    width = len(fields)
                elif len(fields) != width:
                    return row, reader.line_num, len(fields), width
                else:
                    row += 1
        except csv.Error:  # e.g. a field over the csv module's size limit: fall back to Arrow's message
            return None
    return None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _quoted(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"
