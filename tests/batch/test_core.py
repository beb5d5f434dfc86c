"""app.batch.core: the one function below `score`, the Python API and the engines. A batch in
memory and the same rows read from a file give the same output; parts cover a table exactly."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from app.batch.core import (
    BatchOptions,
    Part,
    distributed_schema,
    plan_parts,
    score_batch,
    score_file,
    score_part,
)
from app.bundle.format import load_bundle
from app.engine.onnx_backend import OnnxScorer
from app.train.data import MissingValue

from .conftest import FILES, MISSING


def test_parts_are_the_row_groups_of_every_data_file_in_name_order(lake):
    parts = plan_parts(lake)
    expected = [("a.parquet", i) for i in range(4)] + [("nested/b.parquet", i) for i in range(3)]
    assert [(p.file, p.row_group) for p in parts] == expected
    assert plan_parts(lake / "a.parquet")[0] == Part(str(lake / "a.parquet"), "a.parquet", 0)
    with pytest.raises(ValueError, match="no such file or directory"):
        plan_parts(lake / "absent")


def test_the_parts_of_a_file_give_its_rows_exactly_once(tiny_bundle, lake_missing):
    scorer = OnnxScorer(load_bundle(tiny_bundle))
    options = BatchOptions(id_columns=("key",), missing="skip", row_numbers=True, chunk_rows=64)
    parts = plan_parts(lake_missing)
    schema = distributed_schema(scorer.bundle, options, parts)
    scored = pa.Table.from_batches([b for part in parts for b in score_part(scorer, part, options, schema)])
    skipped = {(file, row + 1) for file, row, _ in MISSING}
    expected = [(f, r) for f, (n, _) in FILES.items() for r in range(1, n + 1) if (f, r) not in skipped]
    assert list(zip(scored["file"].to_pylist(), scored["row"].to_pylist(), strict=True)) == expected
    # keys follow the rows: row r of a file holds key offset + r - 1
    offsets = {"a.parquet": 0, "nested/b.parquet": 600}
    assert scored["key"].to_pylist() == [offsets[f] + r - 1 for f, r in expected]


@pytest.mark.parametrize("missing", ["error", "impute"])
def test_a_batch_in_memory_scores_as_the_same_rows_read_from_a_file(tiny_bundle, lake_missing, missing):
    bundle = load_bundle(tiny_bundle)
    scorer = OnnxScorer(bundle)
    options = BatchOptions(id_columns=("key",), missing=missing)
    path = lake_missing / "a.parquet"
    schema = distributed_schema(bundle, options, plan_parts(path)).remove(0)
    frame = pd.read_parquet(path).sample(frac=1.0, random_state=0)[["key", *bundle.columns[::-1]]]
    if missing == "error":
        with pytest.raises(
            MissingValue, match=r"the batch: row \d+ \(1-based\), column 'f\d' holds a missing"
        ):
            list(score_batch(scorer, pa.Table.from_pandas(frame, preserve_index=False), options, schema))
        frame = frame.dropna()
    in_memory = pa.Table.from_batches(
        score_batch(scorer, pa.Table.from_pandas(frame, preserve_index=False), options, schema)
    )
    # The file read with the rows that hold a missing value left out: the rows the batch kept.
    kept = BatchOptions(id_columns=("key",), missing="skip" if missing == "error" else missing)
    kept_schema = distributed_schema(bundle, kept, plan_parts(path)).remove(0)
    from_file = (
        pa.Table.from_batches(score_file(scorer, path, kept, kept_schema)).to_pandas().set_index("key")
    )
    got = in_memory.to_pandas().set_index("key")
    expected = from_file.loc[got.index]
    assert list(got.columns) == [c for c in expected.columns if c != "row"]
    np.testing.assert_array_equal(got["is_anomaly"], expected["is_anomaly"])
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-6)
    if missing == "impute":
        assert got["imputed"].sum() == 2


def test_engine_options_are_checked_before_any_engine_starts(tiny_bundle, lake, tmp_path, capsys):
    from app.cli import main

    base = ["score", str(tiny_bundle), str(lake), "--engine", "ray"]
    cases = [
        (["--out", str(tmp_path / "a"), "--backend", "torch"], "scores with the onnx backend in float32"),
        (
            ["--out", str(tmp_path / "a"), "--master", "local[2]"],
            "--address is ray's option and --master spark's",
        ),
        (["--out", str(tmp_path / "a"), "--workers", "0"], "--workers must be at least 1"),
        (["--out", str(lake)], "exists; with --engine it must name a new directory"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
