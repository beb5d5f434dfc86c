"""Ray Data (local instance, two CPUs) and Spark (local[2]): a directory of Parquet files scored in
seven parts by two workers gives the rows `anomaly-scores score` gives file by file, ids and row
numbers kept, scores to float32 precision; missing values are handled (or refused, naming the file
and row) as the single-process command handles them; and the documented Python entry points for a
Dataset or DataFrame a user already holds give the same scores."""

import shutil

import numpy as np
import pandas as pd
import pytest

from app.batch.core import BatchOptions
from app.bundle.format import load_bundle
from app.cli import main

from ..tolerances import float32_rtol
from .conftest import same_rows, single_process

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark", reason="the spark extra is not installed")
    if shutil.which("java") is None:
        pytest.skip(
            "Spark needs Java 17 (Debian: openjdk-17-jre-headless, installed by scripts/system-deps.sh)"
        )
    from app.batch.on_spark import session

    s = session(workers=2)
    yield s
    s.stop()


@pytest.fixture(params=["ray", "spark"])
def engine(request) -> str:  # type: ignore[no-untyped-def]
    request.getfixturevalue("ray_local" if request.param == "ray" else "spark")
    return request.param


def one_file(scored, tiny_bundle, lake, tmp_path, name: str) -> None:  # type: ignore[no-untyped-def]
    """A Dataset's or DataFrame's scores of one file are the command line's, matched by key."""
    got = scored.sort_values("key", ignore_index=True)
    reference = single_process(tiny_bundle, lake, tmp_path)
    reference = reference[reference["file"] == name].drop(columns=["file", "row"]).reset_index(drop=True)
    assert list(got.columns) == list(reference.columns) and got["key"].tolist() == reference["key"].tolist()
    rtol = float32_rtol(load_bundle(tiny_bundle).architecture)
    np.testing.assert_allclose(got["score"], reference["score"], rtol=rtol)


def test_a_missing_value_stops_a_run_naming_file_and_row(engine, tiny_bundle, lake_missing, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["score", str(tiny_bundle), str(lake_missing), "--out", str(out), "--engine", engine]) == 2
    err = capsys.readouterr().err
    assert "a.parquet: row" in err and "holds a missing value (--missing skip leaves" in err
    assert not out.exists() and not list(tmp_path.glob(".scores*"))  # nothing half-written


@pytest.mark.parametrize("missing", ["impute", "skip"])
def test_ray_scores_a_lake_as_the_command_line_scores_its_files(
    ray_local, tiny_bundle, lake_missing, tmp_path, missing
):
    out = tmp_path / "scores"
    args = [
        "score",
        str(tiny_bundle),
        str(lake_missing),
        "--out",
        str(out),
        "--engine",
        "ray",
        "--workers",
        "2",
    ]
    assert main([*args, "--id-column", "key", "--missing", missing]) == 0
    reference = single_process(tiny_bundle, lake_missing, tmp_path, "--missing", missing)
    same_rows(pd.read_parquet(out), reference, float32_rtol(load_bundle(tiny_bundle).architecture))


def test_ray_scores_a_directory_of_csv_files_a_file_per_task(ray_local, tiny_bundle, lake, tmp_path):
    """CSV has no row groups: each file is one part, its ids read as strings, as `score` reads them."""
    csv = tmp_path / "csv"
    for name in ("a.parquet", "nested/b.parquet"):
        target = csv / name.replace(".parquet", ".csv")
        target.parent.mkdir(parents=True, exist_ok=True)
        pd.read_parquet(lake / name).to_csv(target, index=False)
    out = tmp_path / "scores"
    args = ["score", str(tiny_bundle), str(csv), "--out", str(out), "--engine", "ray", "--id-column", "key"]
    assert main(args) == 0
    got = pd.read_parquet(out).sort_values(["file", "row"], ignore_index=True)
    assert got["file"].unique().tolist() == ["a.csv", "nested/b.csv"] and len(got) == 900
    assert got["key"].tolist() == [str(k) for k in range(900)]  # CSV cells are strings
    reference = single_process(tiny_bundle, lake, tmp_path)
    rtol = float32_rtol(load_bundle(tiny_bundle).architecture)
    np.testing.assert_allclose(got["score"], reference["score"], rtol=rtol)


def test_a_ray_dataset_of_pandas_blocks_with_string_ids(ray_local, tiny_bundle, lake, tmp_path):
    import ray.data

    from app.batch.on_ray import score_dataset

    frame = pd.read_parquet(lake / "a.parquet")
    frame["key"] = frame["key"].astype(str)
    scored = score_dataset(ray.data.from_pandas(frame), tiny_bundle, BatchOptions(id_columns=("key",)))
    got = scored.to_pandas()
    got["key"] = got["key"].astype(int)
    one_file(got, tiny_bundle, lake, tmp_path, "a.parquet")
    with pytest.raises(ValueError, match="no rows and no schema"):
        score_dataset(ray.data.from_items([]), tiny_bundle)


def test_a_users_ray_dataset_is_scored_lazily(ray_local, tiny_bundle, lake, tmp_path):
    import ray.data

    from app.batch.on_ray import score_dataset

    dataset = ray.data.read_parquet(str(lake / "a.parquet"))
    scored = score_dataset(dataset, tiny_bundle, BatchOptions(id_columns=("key",)), batch_size=100)
    one_file(scored.to_pandas(), tiny_bundle, lake, tmp_path, "a.parquet")


def test_spark_scores_a_lake_as_the_command_line_scores_its_files(spark, tiny_bundle, lake_missing, tmp_path):
    from app.batch.on_spark import score_files

    out = tmp_path / "scores"
    options = BatchOptions(id_columns=("key",), missing="impute")
    assert score_files(tiny_bundle, lake_missing, out, options)["parts"] == 7
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:06d}.parquet" for i in range(7)]
    reference = single_process(tiny_bundle, lake_missing, tmp_path, "--missing", "impute")
    same_rows(pd.read_parquet(out), reference, float32_rtol(load_bundle(tiny_bundle).architecture))


def test_a_users_spark_dataframe_is_scored_lazily(spark, tiny_bundle, lake, tmp_path):
    from app.batch.on_spark import score_dataframe

    frame = spark.read.parquet(str(lake / "nested"))
    scored = score_dataframe(frame, tiny_bundle, BatchOptions(id_columns=("key",))).toPandas()
    one_file(scored, tiny_bundle, lake, tmp_path, "nested/b.parquet")


def test_a_spark_workers_copy_of_the_bundle_is_removed_once_its_scorer_is_built(
    tiny_bundle, tmp_path, monkeypatch
):
    """A Python worker lives across tasks and jobs: it writes the bundle's files to build its scorer and
    must not leave them behind, while the scorer it keeps scores as one built from the bundle itself."""
    import tempfile

    from app.batch import on_spark
    from app.engine.factory import create_scorer

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(on_spark, "_SCORERS", {})
    scorer = on_spark._scorer(on_spark.bundle_files(tiny_bundle))
    assert list(scratch.iterdir()) == []
    bundle = load_bundle(tiny_bundle)
    x = np.random.default_rng(0).normal(size=(64, len(bundle.columns)))
    reference = create_scorer(bundle, "onnx", threads=1)
    for method in reference.methods:
        np.testing.assert_array_equal(scorer.score(x, method).score, reference.score(x, method).score)
