"""The benchmark protocol: splits, hold-out, baselines, selection rules and the summary table."""

import math

import numpy as np
import pytest

from app.model.methods import METHODS
from app.train.evaluate import (
    Dataset,
    SplitResult,
    baseline_scores,
    load_datasets,
    protocol_split,
    select,
    selections,
    stratified_holdout,
    summary_table,
)
from app.train.selection import auc


def numbered(n_normal: int, n_anomalous: int, d: int = 3) -> Dataset:
    """Row i of the normal file holds i + 1 in every column, row j of the anomalies -(j + 1)."""
    normal = np.repeat(np.arange(1, n_normal + 1, dtype=float)[:, None], d, axis=1)
    anomalous = -np.repeat(np.arange(1, n_anomalous + 1, dtype=float)[:, None], d, axis=1)
    return Dataset("numbered", normal, anomalous)


def raw(split, x):  # undo the standardisation to read the row identities back
    return np.rint(split.scaler.mean + x * split.scaler.scale)[:, 0]


@pytest.mark.parametrize(("n_normal", "n_anomalous"), [(357, 188), (225, 4), (100, 3), (50, 50)])
def test_protocol_split_follows_the_papers_rules(n_normal, n_anomalous):
    ds = numbered(n_normal, n_anomalous)
    split = protocol_split(ds, seed=3)
    train, test = raw(split, split.x_train), raw(split, split.x_test)
    n_train, pool = round(0.8 * n_normal), round(0.8 * n_anomalous)
    # every pooled normal row trains; contamination is the largest a with a / (n_train + a) <= 10%
    assert (train > 0).sum() == n_train
    a = (train < 0).sum()
    assert a / (n_train + a) <= 0.1 + 1e-12
    assert a == pool or (a + 1) / (n_train + a + 1) > 0.1
    # test: the other 20% of each class, disjoint from training; labels follow the rows
    assert (test > 0).sum() == n_normal - n_train and (test < 0).sum() == n_anomalous - pool
    assert not set(train) & set(test)
    assert np.array_equal(split.y_train, train < 0) and np.array_equal(split.y_test, test < 0)
    # standardised with the training rows only: zero mean, unit deviation there
    np.testing.assert_allclose(split.x_train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(split.x_train.std(0), 1, atol=1e-12)


def test_protocol_split_is_seeded():
    ds = numbered(200, 40)
    a, b, c = protocol_split(ds, 0), protocol_split(ds, 0), protocol_split(ds, 1)
    assert np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(raw(a, a.x_test), raw(c, c.x_test))


@pytest.mark.parametrize(("n_normal", "n_anomalous"), [(300, 30), (180, 3), (40, 1), (40, 0)])
def test_stratified_holdout_keeps_each_class_in_proportion(n_normal, n_anomalous):
    labels = np.r_[np.zeros(n_normal, bool), np.ones(n_anomalous, bool)]
    fit, held = stratified_holdout(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.r_[fit, held]), np.arange(labels.size))
    assert (~labels[held]).sum() == round(0.2 * n_normal)
    if n_anomalous > 1:
        assert labels[held].sum() == max(1, round(0.2 * n_anomalous))
        assert labels[fit].sum() >= 1
    elif n_anomalous == 1:
        assert labels[held].sum() == 1


def test_knn_baseline_is_the_mean_distance_to_the_nearest_training_rows():
    rng = np.random.default_rng(0)
    x_train, x_test = rng.standard_normal((200, 4)), rng.standard_normal((30, 4)) * 2
    scores = baseline_scores(x_train, x_test, seed=0, knn_k=5, trees=50)
    distances = np.linalg.norm(x_test[:, None, :] - x_train[None, :, :], axis=-1)
    np.testing.assert_allclose(scores["knn"], np.sort(distances, axis=1)[:, :5].mean(1), rtol=1e-12)


def test_isolation_forest_baseline_ranks_far_rows_first():
    rng = np.random.default_rng(1)
    x_train = rng.standard_normal((300, 3))
    x_test = np.r_[rng.standard_normal((50, 3)), rng.standard_normal((10, 3)) + 6]
    scores = baseline_scores(x_train, x_test, seed=0, knn_k=5, trees=100)
    assert auc(np.r_[np.zeros(50), np.ones(10)], scores["iforest"]) > 0.99


def candidate_rows(val_auc, val_loglik, val_error):
    rows = []
    for i, (area, loglik, error) in enumerate(zip(val_auc, val_loglik, val_error, strict=True)):
        row = {"candidate": i, "latent_dim": 2, "beta": 1.0, "kernel_width": 1.0}
        row |= {"val_reconstruction_error": error, "projected_rows": 10, "projected_capped": i % 2}
        for m in METHODS:
            row |= {f"val_auc_{m}": area, f"val_loglik_{m}": loglik, f"test_auc_{m}": 0.5 + 0.1 * i}
        rows.append(row)
    return rows


def test_selection_rules():
    rows = candidate_rows([0.6, 0.9, 0.7], [-5.0, -9.0, -3.0], [0.2, 0.1, 0.3])
    assert select(rows, "likelihood", "supervised")[0] == 1  # highest validation AUC
    assert select(rows, "likelihood", "unsupervised")[0] == 2  # highest validation log-likelihood
    assert select(rows, "projected", "unsupervised")[0] == 2
    assert select(rows, "reconstruction", "unsupervised")[0] == 1  # lowest reconstruction error
    assert select(rows, "reconstruction", "supervised")[0] == 1
    # validation rows of one class: no AUC, so supervised falls back to the unsupervised rule
    one_class = candidate_rows([math.nan] * 3, [-5.0, -9.0, -3.0], [0.2, 0.1, 0.3])
    index, rule = select(one_class, "likelihood", "supervised")
    assert index == 2 and "log-likelihood" in rule


def test_summary_table_means_and_counts_against_a_direct_computation():
    rng = np.random.default_rng(0)
    results = []
    for ds in ("a", "b", "c"):
        for split in range(3):
            rows = candidate_rows(rng.uniform(size=4), rng.normal(size=4), rng.uniform(size=4))
            for row in rows:
                row |= {f"test_auc_{m}": rng.uniform() for m in METHODS}
            baselines = {"knn": rng.uniform(), "iforest": rng.uniform(), "knn_as_trained": rng.uniform()}
            results.append(SplitResult(ds, split, rows, baselines, 1.0))
    table, figures = summary_table(results, ["a", "b", "c"])
    chosen = selections(results)
    for ds in "abc":
        for selection in ("supervised", "unsupervised"):
            for m in METHODS:
                direct = np.mean(
                    [
                        r.candidates[select(r.candidates, m, selection)[0]][f"test_auc_{m}"]
                        for r in results
                        if r.dataset == ds
                    ]
                )
                assert figures["per_dataset"][f"{ds}|{selection}|{m}"] == pytest.approx(direct)
                assert direct == pytest.approx(
                    np.mean(
                        [
                            c["test_auc"]
                            for c in chosen
                            if c["dataset"] == ds and c["selection"] == selection and c["score"] == m
                        ]
                    )
                )
        knn = np.mean([r.baselines["knn"] for r in results if r.dataset == ds])
        assert f"| {ds} | {knn:.3f} |" in table
    for selection in ("supervised", "unsupervised"):
        wins = sum(
            figures["per_dataset"][f"{ds}|{selection}|likelihood"]
            > figures["per_dataset"][f"{ds}|{selection}|reconstruction"]
            for ds in "abc"
        )
        assert figures["likelihood_beats_reconstruction"][selection] == f"{wins}/3"
    # candidates 1 and 3 of the 4 in each of 9 splits stopped one row of 10 at the cap
    assert figures["projected_capped"] == {"rows": 360, "capped": 18, "fraction": 0.05}
    assert "on 18 of 360 scored rows (5.00%)" in table


def test_loda_reader_refuses_mismatched_files_and_unknown_names(tmp_path):
    (tmp_path / "x").mkdir()
    np.savetxt(tmp_path / "x" / "normal.txt", np.arange(30.0).reshape(10, 3))
    np.savetxt(tmp_path / "x" / "easy.txt", np.arange(4.0).reshape(2, 2))
    with pytest.raises(ValueError, match=r"normal\.txt has 3 columns but easy\.txt 2"):
        load_datasets(tmp_path)
    with pytest.raises(ValueError, match=r"no dataset \['y'\].*available: x"):
        load_datasets(tmp_path, ["y"])
    with pytest.raises(ValueError, match="no dataset folder"):
        load_datasets(tmp_path / "x")


def test_an_ensembles_auc_is_its_members_scores_recomputed(tmp_path):
    """evaluate_split's ensembles against a direct computation: the same split and fits, each
    member's test values counted against its validation values by brute force: as the share at or
    below (a rank), or as the surprisal of the share at or above (the default, Fisher's). The
    scores it keeps (--keep-scores) are those same values, and the baselines' those of a refit."""
    from dataclasses import replace

    from app.train.evaluate import EvaluateOptions, evaluate_split, fitting
    from app.train.fit import fit_candidates, fit_noise, score_rows
    from app.train.options import Candidate, FitOptions

    from ..conftest import manifold_rows, off_manifold_rows

    dataset = Dataset("manifold", manifold_rows(300, seed=61), off_manifold_rows(60, seed=62))
    candidates = (Candidate(latent_dim=2, hidden=8, components=2, beta=b) for b in (0.1, 1.0))
    options = EvaluateOptions(
        candidates=tuple(candidates), fit=FitOptions(steps=60, batch_size=50), scores_dir=str(tmp_path)
    )
    result = evaluate_split(dataset, 1, options)
    kept = np.load(tmp_path / "manifold-1.npz")

    data = protocol_split(dataset, seed=1, scaling="robust")  # the networks' rows, as train scales them
    fit_rows, val_rows = stratified_holdout(data.y_train, 0.2, seed=1)
    x_val = data.x_train[val_rows]
    fitted = fit_candidates(data.x_train[fit_rows], fitting(dataset, options), replace(options.fit, seed=1))

    def surprisal(reference, values):
        # log(n + 1) - log(1 + k), the product's expression: rows whose counts tie stay tied.
        at_or_above = (reference[None, :] >= values[:, None]).sum(axis=1)
        return np.log(reference.size + 1) - np.log1p(at_or_above)

    members = []
    for f in fitted:
        fit_noise(f.model, x_val)
        val, test = score_rows(f.model, x_val, "likelihood"), score_rows(f.model, data.x_test, "likelihood")
        manifold_val = -(val["log_prior"] + val["log_volume"])
        manifold_test = -(test["log_prior"] + test["log_volume"])
        residual_val, residual_test = -val["log_residual"], -test["log_residual"]
        i = len(members)
        # The same float32 networks on the same rows in one process: the same values, bit for bit.
        np.testing.assert_array_equal(kept[f"val/{i}/likelihood.manifold"], manifold_val)
        np.testing.assert_array_equal(kept[f"test/{i}/likelihood.residual"], residual_test)
        np.testing.assert_array_equal(kept[f"test/{i}/likelihood"], -test["log_prob"])
        # Ranks as exact fractions, so rows tied at the top stay tied, as AUC counts them.
        members.append(
            {
                "likelihood summed": (-val["log_prob"][None, :] <= -test["log_prob"][:, None]).mean(axis=1),
                "manifold": (manifold_val[None, :] <= manifold_test[:, None]).mean(axis=1),
                "residual": (residual_val[None, :] <= residual_test[:, None]).mean(axis=1),
                "likelihood": surprisal(manifold_val, manifold_test) + surprisal(residual_val, residual_test),
            }
        )
    for name in ("likelihood", "likelihood summed", "manifold"):
        combined = np.mean([m[name] for m in members], axis=0)
        assert result.ensembles[name] == pytest.approx(auc(data.y_test, combined), abs=1e-12), name
    # The two factors' ranks added per member, the members' sums averaged.
    combined = np.mean([m["manifold"] + m["residual"] for m in members], axis=0)
    assert result.ensembles["likelihood, factor ranks"] == pytest.approx(
        auc(data.y_test, combined), abs=1e-12
    )
    np.testing.assert_array_equal(kept["y_test"], data.y_test)
    assert f"val/{len(members)}/likelihood" not in kept.files
    # The protocol's baselines on its own standardisation (mean and deviation), kNN on the networks' too.
    protocol = protocol_split(dataset, seed=1, scaling="standard")
    baseline = baseline_scores(protocol.x_train, protocol.x_test, 1, options.knn_k, options.forest_trees)
    baseline["knn_as_trained"] = baseline_scores(data.x_train, data.x_test, 1, options.knn_k, 1)["knn"]
    for name, values in baseline.items():
        np.testing.assert_allclose(kept[f"baseline/{name}"], values, rtol=1e-12, err_msg=name)
    assert not np.allclose(kept["baseline/knn"], kept["baseline/knn_as_trained"])
