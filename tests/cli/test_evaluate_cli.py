"""`anomaly-scores evaluate --quick` on the paper's data: the pipeline's outputs, not AUC levels."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from app.cli import main
from app.model.methods import METHODS
from app.train.evaluate import select
from app.train.selection import auc


@pytest.fixture(scope="module")
def both(loda, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "quick"
    assert main(["evaluate", str(loda), "--quick", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def quick(both) -> Path:
    return both / "contaminated"


def test_quick_run_writes_every_candidate_of_the_two_smallest_datasets(quick):
    candidates = pd.read_csv(quick / "candidates.csv")
    assert sorted(candidates["dataset"].unique()) == ["breast-cancer-wisconsin", "haberman"]
    assert len(candidates) == 2 * 2  # two datasets x two candidates, one split
    for method in METHODS:
        auc = candidates[f"test_auc_{method}"]
        assert auc.between(0, 1).all(), method
    assert (candidates["sigma2"] > 0).all()


def test_selections_follow_the_stated_rules(quick):
    candidates = pd.read_csv(quick / "candidates.csv")
    chosen = pd.read_csv(quick / "selections.csv")
    assert len(chosen) == 2 * len(METHODS) * 2  # datasets x scores x selections
    for row in chosen.itertuples():
        rows = candidates[(candidates["dataset"] == row.dataset) & (candidates["split"] == row.split)]
        records = rows.sort_values("candidate").to_dict("records")
        index, _ = select(records, row.score, row.selection)
        assert row.candidate == index
        assert row.test_auc == pytest.approx(records[index][f"test_auc_{row.score}"])


def knn_auc_by_hand(loda: Path, name: str, contaminated: bool, robust: bool = False) -> float:
    """Split 0 rebuilt from the text files with numpy alone (contaminated: up to 10% of the training
    rows from the anomaly pool; clean: none), standardised by mean and deviation or (`robust`) by
    median and scipy's normal-consistent interquartile range, the deviation where that is 0; kNN by
    brute force, its test AUC."""
    normal = np.loadtxt(loda / name / "normal.txt", ndmin=2)
    anomalous = np.loadtxt(loda / name / "easy.txt", ndmin=2)
    rng = np.random.default_rng(0)
    normal, anomalous = normal[rng.permutation(len(normal))], anomalous[rng.permutation(len(anomalous))]
    n, pool = round(0.8 * len(normal)), round(0.8 * len(anomalous))
    a = min(pool, int(0.1 * n / 0.9)) if contaminated else 0
    train = np.r_[normal[:n], anomalous[:a]]
    test = np.r_[normal[n:], anomalous[pool:]]
    labels = np.r_[np.zeros(len(normal) - n), np.ones(len(anomalous) - pool)]
    mean, std = train.mean(0), train.std(0)
    if robust:
        iqr = stats.iqr(train, axis=0, scale="normal")
        mean, std = np.median(train, axis=0), np.where(iqr > 0, iqr, std)
    train, test = (train - mean) / std, (test - mean) / std
    distances = np.sort(np.linalg.norm(test[:, None] - train[None], axis=-1), axis=1)[:, :5].mean(1)
    return auc(labels, distances)


def haberman_only(loda: Path, root: Path) -> Path:
    """A data folder holding the smallest dataset alone, for runs of their own."""
    (root / "haberman").mkdir(parents=True)
    for f in ("normal.txt", "easy.txt"):
        shutil.copy(loda / "haberman" / f, root / "haberman" / f)
    return root


def test_knn_baseline_matches_a_direct_computation_on_the_raw_files(quick, loda):
    baselines = pd.read_csv(quick / "baselines.csv").set_index("dataset")
    for name in ("haberman", "breast-cancer-wisconsin"):
        assert baselines.loc[name, "knn"] == pytest.approx(knn_auc_by_hand(loda, name, True), abs=1e-12)
        # the default scaling, the networks', is the median and interquartile range
        by_hand = knn_auc_by_hand(loda, name, True, robust=True)
        assert baselines.loc[name, "knn_as_trained"] == pytest.approx(by_hand, abs=1e-12)


def test_table_and_summary_report_the_run(quick):
    table = (quick / "table.md").read_text()
    assert table.startswith("| dataset | kNN | IForest |")
    for name in ("haberman", "breast-cancer-wisconsin"):
        assert f"| {name} |" in table
    summary = json.loads((quick / "summary.json").read_text())
    assert summary["splits"] == [0] and summary["candidates"] == 2 and summary["steps"] == 300
    assert set(summary["likelihood_beats_reconstruction"]) == {"supervised", "unsupervised", "ensemble"}
    assert summary["best_unsupervised_score"] in METHODS
    assert summary["seconds"] > 0 and summary["protocol"] == "contaminated"
    # Ranks of the unsupervised detectors over two datasets: they sum to 1 + 2 + ... + n per dataset.
    ranks = summary["mean_rank"]
    assert "ens: likelihood" in ranks and "sup: likelihood" not in ranks
    assert sum(ranks.values()) == pytest.approx(len(ranks) * (len(ranks) + 1) / 2)
    assert set(summary["wilcoxon_vs_iforest"]) == set(ranks) - {"IForest"}
    assert "| detector | mean rank | wins vs IForest | Wilcoxon p |" in table
    for block in table.split("\n\n"):  # every markdown table: one cell count in all its rows
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in rows}) <= 1, block


def test_the_ensembles_are_written_per_split_and_tabled(quick):
    """Their values are checked against a direct computation in tests/train/test_evaluate.py."""
    ensembles = pd.read_csv(quick / "ensembles.csv")
    assert len(ensembles) == 2 and set(ensembles.columns) >= {
        "likelihood",
        "manifold",
        "latent",
        "reconstruction",
    }
    assert ensembles[["likelihood", "manifold", "latent", "reconstruction"]].stack().between(0, 1).all()
    table = (quick / "table.md").read_text()
    for ds in ensembles.itertuples():
        assert f"| {ds.dataset} | " in table and f" {ds.manifold:.3f} |" in table


def test_the_clean_protocol_trains_on_normal_rows_and_tests_on_the_same_rows(both, loda):
    clean = json.loads((both / "clean" / "summary.json").read_text())
    assert clean["protocol"] == "clean" and clean["contamination"] == 0.0
    cleaned = pd.read_csv(both / "clean" / "baselines.csv").set_index("dataset")
    # kNN, from the clean training rows, on the same test rows: recomputed directly for haberman.
    assert cleaned.loc["haberman", "knn"] == pytest.approx(
        knn_auc_by_hand(loda, "haberman", False), abs=1e-12
    )


def test_figures_do_not_depend_on_the_number_of_worker_processes(quick, loda, tmp_path):
    one = haberman_only(loda, tmp_path / "one")
    out = tmp_path / "out"
    args = ["evaluate", str(one), "--quick", "--jobs", "1", "--out", str(out), "--quiet"]
    assert main([*args, "--protocol", "contaminated"]) == 0
    assert not (out / "clean").exists()
    serial = pd.read_csv(out / "contaminated" / "candidates.csv")
    parallel = pd.read_csv(quick / "candidates.csv")
    parallel = parallel[parallel["dataset"] == "haberman"].reset_index(drop=True)
    pd.testing.assert_frame_equal(serial, parallel)


def test_unknown_dataset_is_refused(loda, tmp_path, capsys):
    assert main(["evaluate", str(loda), "--datasets", "nope", "--out", str(tmp_path)]) == 2
    assert "no dataset ['nope']" in capsys.readouterr().err


def test_a_trimmed_evaluation_trains_otherwise_and_says_so(quick, loda, tmp_path):
    one = haberman_only(loda, tmp_path / "one")
    out = tmp_path / "out"
    args = ["evaluate", str(one), "--quick", "--jobs", "1", "--out", str(out), "--quiet", "--trim", "0.2"]
    assert main([*args, "--protocol", "contaminated"]) == 0
    assert json.loads((out / "contaminated" / "summary.json").read_text())["trim"] == 0.2
    trimmed = pd.read_csv(out / "contaminated" / "candidates.csv")
    plain = pd.read_csv(quick / "candidates.csv")
    plain = plain[plain["dataset"] == "haberman"].reset_index(drop=True)
    assert (trimmed["final_loss"] != plain["final_loss"]).all()
    assert main(["evaluate", str(one), "--quick", "--out", str(out), "--trim", "1"]) == 2
