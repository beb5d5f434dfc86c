"""A table as a data lake holds it: a directory of Parquet files of several row groups each (more
parts than the two workers), an id column, a few missing cells; and its single-process scores."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.cli import main

from ..conftest import FEATURES, manifold_rows, off_manifold_rows

# file -> (rows, row group size): 4 + 3 row groups
FILES = {"a.parquet": (600, 150), "nested/b.parquet": (300, 100)}
MISSING = {
    ("a.parquet", 7, FEATURES[1]),
    ("a.parquet", 451, FEATURES[4]),
    ("nested/b.parquet", 0, FEATURES[0]),
}


def write_lake(root: Path, missing: bool) -> Path:
    lake = root / ("lake-missing" if missing else "lake")
    start = 0
    for name, (rows, group) in FILES.items():
        values = np.r_[manifold_rows(rows - 20, seed=start), off_manifold_rows(20, seed=start + 1)]
        frame = pd.DataFrame(values, columns=FEATURES)
        frame.insert(0, "key", np.arange(start, start + rows, dtype=np.int64))
        if missing:
            for file, row, column in MISSING:
                if file == name:
                    frame.loc[row, column] = np.nan
        (lake / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), lake / name, row_group_size=group)
        start += rows
    (lake / "_SUCCESS").write_text("")  # as Spark leaves it: not data
    # A failed job's leftovers and a notebook's checkpoint: not the table's rows either.
    for leftover in ("_temporary/0/part-00000.parquet", ".ipynb_checkpoints/a.parquet"):
        (lake / leftover).parent.mkdir(parents=True)
        shutil.copy(lake / "a.parquet", lake / leftover)
    return lake


@pytest.fixture(scope="session")
def lake(tmp_path_factory) -> Path:
    return write_lake(tmp_path_factory.mktemp("lake"), missing=False)


@pytest.fixture(scope="session")
def lake_missing(tmp_path_factory) -> Path:
    return write_lake(tmp_path_factory.mktemp("lake"), missing=True)


def single_process(bundle: Path, lake: Path, tmp: Path, *options: str) -> pd.DataFrame:
    """`anomaly-scores score` on each file, as one table with `file` and 1-based `row` added."""
    frames = []
    for name in FILES:
        out = tmp / (name.replace("/", "_") + ".scores.parquet")
        assert (
            main(["score", str(bundle), str(lake / name), "--out", str(out), "--id-column", "key", *options])
            == 0
        )
        frame = pd.read_parquet(out)
        if "row" not in frame:
            frame.insert(1, "row", np.arange(1, len(frame) + 1))
        frame.insert(0, "file", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def same_rows(distributed: pd.DataFrame, reference: pd.DataFrame, rtol: float) -> None:
    """Equal row for row: the same files, rows, ids, flags and columns; scores to float32 precision
    (a row's float32 arithmetic may round differently in another batch)."""
    ordered = distributed.sort_values(["file", "row"], ignore_index=True)
    assert list(ordered.columns) == list(reference.columns)
    for column in ordered.columns:
        if ordered[column].dtype.kind == "f":
            np.testing.assert_allclose(ordered[column], reference[column], rtol=rtol, atol=0, err_msg=column)
        else:
            assert ordered[column].tolist() == reference[column].tolist(), column
