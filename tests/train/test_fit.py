"""Training: the MMD estimator, the grid, noise fitting, selection, determinism, and detection."""

import csv
import io

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import multivariate_normal

from app.bundle.format import WEIGHTS, load_bundle
from app.engine.torch_backend import TorchScorer
from app.train.fit import RELATIVE_VARIANCE_FLOOR, fit_candidates, fit_noise, imq_mmd, score_rows
from app.train.options import GRIDS, Candidate, FitOptions, expand_grid
from app.train.pipeline import TrainRequest, split_rows, train_bundle
from app.train.selection import auc

from ..conftest import FEATURES, manifold_rows, off_manifold_rows
from ..tolerances import FLOAT64_PROJECTION_RTOL


def test_imq_mmd_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((3, 40, 2)), rng.standard_normal((3, 40, 2)) + 0.5
    widths = np.array([0.1, 1.0, 4.0])
    expected = []
    for zc, yc, c in zip(z, y, widths, strict=True):

        def k(a, b, c=c):
            return c / (c + ((a[:, None] - b[None]) ** 2).sum(-1))

        n = len(zc)
        kzz, kyy = k(zc, zc), k(yc, yc)
        expected.append(
            (kzz.sum() - np.trace(kzz)) / (n * (n - 1))
            + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * k(zc, yc).mean()
        )
    got = imq_mmd(torch.tensor(z), torch.tensor(y), torch.tensor(widths)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_paper_grid_has_the_288_combinations_and_drops_latents_that_do_not_fit():
    assert len(expand_grid(GRIDS["paper"], input_dim=30)) == 288
    # the sphere S^8 (latent 9) is 8-dimensional: it fits 8 features but not 7
    assert len(expand_grid(GRIDS["paper"], input_dim=8)) == 288
    assert len(expand_grid(GRIDS["paper"], input_dim=7)) == 192
    with pytest.raises(ValueError, match="unknown grid keys"):
        expand_grid({"latnet": [2]}, input_dim=5)


def _residuals(model, x):
    with torch.no_grad():
        xt = torch.tensor(x, dtype=torch.float32)
        return (xt - model.decoder(model.encoder(xt))).double().numpy()


def test_fitted_noise_variance_is_the_mean_squared_residual_per_direction():
    x = (manifold_rows(400, seed=1) - 10) / 3
    [fitted] = fit_candidates(x, [Candidate(latent_dim=2, hidden=16, components=2)], FitOptions(steps=200))
    model = fitted.model
    fit_noise(model, x, "isotropic")
    residual = _residuals(model, x)
    assert model.relative_variance is None
    assert model.sigma2 == pytest.approx((residual**2).sum(1).mean() / 6, rel=1e-5)


def test_an_unknown_noise_model_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"noise must be one of \['diagonal', 'isotropic'\], got 'full'"):
        FitOptions(noise="full")  # type: ignore[arg-type]


def test_diagonal_noise_is_each_features_mean_squared_residual_floored_at_a_share_of_their_mean():
    # The maximum-likelihood variances of a zero-mean Gaussian with diagonal covariance are the
    # per-feature mean squares. Feature 0 is constant, so the networks reconstruct it almost exactly:
    # its variance must be raised to RELATIVE_VARIANCE_FLOOR times the mean, not left near zero.
    x = (manifold_rows(400, seed=1) - 10) / 3
    x[:, 0] = 0.0
    [fitted] = fit_candidates(x, [Candidate(latent_dim=2, hidden=16, components=2)], FitOptions(steps=200))
    model = fitted.model
    fit_noise(model, x, "diagonal")
    mean_squares = (_residuals(model, x) ** 2).mean(0)
    floor = RELATIVE_VARIANCE_FLOOR * mean_squares.mean()
    assert mean_squares[0] < floor  # the case exercises the floor
    expected = np.maximum(mean_squares, floor)
    np.testing.assert_allclose(model.sigma2 * np.asarray(model.relative_variance), expected, rtol=1e-5)
    assert np.log(model.relative_variance).sum() == pytest.approx(0.0, abs=1e-9)  # sigma2: geometric mean


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_noise_returns_exactly_the_projected_scores_under_the_fitted_noise(dtype):
    # Callers reuse these instead of projecting the rows a second time: they must be what a fresh
    # score_rows gives, to the last bit, or a selection could change.
    x = (manifold_rows(300, seed=2) - 10) / 3
    [fitted] = fit_candidates(x, [Candidate(latent_dim=2, hidden=16, components=2)], FitOptions(steps=100))
    model = fitted.model.to(dtype)
    model.sigma2_projected = 5.0  # a stale value: the returned parts must not have been scored with it
    returned = fit_noise(model, x)
    assert model.sigma2_projected != 5.0
    fresh = score_rows(model, x, "projected")
    assert returned.keys() == fresh.keys()
    for name in fresh:
        np.testing.assert_array_equal(returned[name], fresh[name], err_msg=name)
    # In bounded-memory chunks, as score_rows: other matrix shapes round differently, and each MAP
    # point is fixed only to the iteration's stopping tolerance, hence FLOAT64_PROJECTION_RTOL;
    # the parts returned are still exactly what score_rows gives in the same chunks.
    fitted_whole = model.sigma2_projected
    chunked = fit_noise(model, x, chunk_rows=64)
    assert model.sigma2_projected == pytest.approx(fitted_whole, rel=FLOAT64_PROJECTION_RTOL)
    fresh = score_rows(model, x, "projected", chunk_rows=64)
    np.testing.assert_array_equal(chunked["log_prob"], fresh["log_prob"])


@pytest.mark.parametrize("noise", ["isotropic", "diagonal"])
def test_projected_noise_variance_maximises_the_exact_marginal_likelihood_of_a_linear_model(noise):
    # A linear decoder (depth 0) with the standard normal prior: the projected density is then the
    # exact marginal N(b, A A^T + sigma2 diag(w)), and the evidence fixed point must be its maximum
    # likelihood noise scale, found here by scipy's bounded scalar search on the exact density
    # (w fixed at the fitted relative variances; 1 for isotropic noise).
    x = (manifold_rows(400, seed=3) - 10) / 3
    candidate = Candidate(latent_dim=2, hidden=8, depth=0, activation="linear", prior="normal")
    [fitted] = fit_candidates(x, [candidate], FitOptions(steps=300))
    model = fitted.model.double()
    fit_noise(model, x, noise)
    A = model.decoder.net.layers[0].weight.detach().numpy()
    b = model.decoder.net.layers[0].bias.detach().numpy()
    w = np.ones(6) if model.relative_variance is None else np.asarray(model.relative_variance)
    assert (noise == "isotropic") == np.all(w == 1.0)

    def negative_log_likelihood(log_sigma2):
        covariance = A @ A.T + np.exp(log_sigma2) * np.diag(w)
        return -multivariate_normal(b, covariance).logpdf(x).sum()

    best = minimize_scalar(
        negative_log_likelihood, bounds=(-12, 3), method="bounded", options={"xatol": 1e-9}
    )
    assert model.sigma2_projected == pytest.approx(np.exp(best.x), rel=1e-3)
    assert model.sigma2_projected != pytest.approx(model.sigma2, rel=1e-2)  # the case tells them apart


def test_same_data_options_and_seed_give_byte_identical_weights(tmp_path):
    request = TrainRequest([Candidate(latent_dim=2, hidden=8, components=2)], FitOptions(steps=60), name="d")
    data = manifold_rows(300, seed=2)
    train_bundle(data, FEATURES, request, tmp_path / "a")
    train_bundle(data, FEATURES, request, tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS).read_bytes() == (tmp_path / "b" / WEIGHTS).read_bytes()
    assert load_bundle(tmp_path / "a").version == load_bundle(tmp_path / "b").version
    other = TrainRequest(request.candidates, FitOptions(steps=60, seed=1), name="d")
    train_bundle(data, FEATURES, other, tmp_path / "c")
    assert (tmp_path / "a" / WEIGHTS).read_bytes() != (tmp_path / "c" / WEIGHTS).read_bytes()


def _leaderboard(bundle_dir):
    return list(csv.DictReader(io.StringIO((bundle_dir / "leaderboard.csv").read_text())))


def test_unsupervised_selection_takes_the_highest_validation_log_likelihood(tiny_bundle):
    rows = _leaderboard(tiny_bundle)
    assert len(rows) == 2
    chosen = max(rows, key=lambda r: float(r["val_loglik_likelihood"]))
    assert [r["selected"] for r in rows].count("1") == 1 and chosen["selected"] == "1"
    manifest = load_bundle(tiny_bundle).manifest
    assert manifest["training"]["selection"].startswith("unsupervised")
    assert float(chosen["beta"]) == manifest["training"]["hyper_parameters"]["beta"]


def test_supervised_selection_takes_the_highest_validation_auc(tmp_path):
    normal, anomalous = manifold_rows(500, seed=3), off_manifold_rows(40, seed=4)
    values = np.r_[normal, anomalous]
    labels = np.r_[np.zeros(500, bool), np.ones(40, bool)]
    request = TrainRequest(
        [Candidate(latent_dim=k, hidden=16, components=2) for k in (1, 2, 4)], FitOptions(steps=200), name="s"
    )
    train_bundle(values, FEATURES, request, tmp_path / "s", labels=labels)
    rows = _leaderboard(tmp_path / "s")
    chosen = max(rows, key=lambda r: float(r["val_auc_likelihood"]))
    assert chosen["selected"] == "1"
    assert load_bundle(tmp_path / "s").manifest["training"]["selection"].startswith("supervised")


def test_split_is_disjoint_covering_and_refuses_too_few_rows():
    s = split_rows(1000, 0.2, 0.2, seed=0)
    together = np.concatenate([s.train, s.validation, s.calibration])
    assert sorted(together.tolist()) == list(range(1000))
    assert (s.train.size, s.validation.size, s.calibration.size) == (600, 200, 200)
    with pytest.raises(ValueError, match="each split needs at least 10"):
        split_rows(30, 0.2, 0.2, seed=0)


def test_trained_model_ranks_off_manifold_points_above_on_manifold_points(tmp_path):
    # The likelihood's ranking, with the rows standardised by mean and deviation: on this smooth table
    # the robust default's fits of seeds 0, 1, 2 score 0.84, 0.96, 1.00 (the mean and deviation's 0.94,
    # 1.00, 1.00): two of its features are a square and a product of normal variables, whose tails
    # the interquartile range stretches (docs/evaluation.md, "Robust standardisation").
    request = TrainRequest(
        [Candidate(latent_dim=2, hidden=32, components=4, beta=1.0)],
        FitOptions(steps=1500, scaling="standard"),
        name="m",
    )
    result = train_bundle(manifold_rows(1500, seed=5), FEATURES, request, tmp_path / "m")
    scorer = TorchScorer(result.bundle)
    on, off = manifold_rows(300, seed=6), off_manifold_rows(300, seed=7)
    labels = np.r_[np.zeros(300), np.ones(300)]
    for method in ("likelihood", "projected", "encoder"):
        scores = scorer.score(np.r_[on, off], method).score
        assert auc(labels, scores) > 0.9, method


def test_trimming_keeps_each_candidates_best_reconstructed_rows():
    from app.train.fit import trimmed

    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(3, 10, generator=generator, dtype=torch.float64)
    z = torch.randn(3, 10, 2, generator=generator, dtype=torch.float64)
    kept_errors, kept_z = trimmed(errors, z, 7)
    for c in range(3):  # the reference: numpy's sort, per candidate
        order = np.argsort(errors[c].numpy())[:7]
        np.testing.assert_array_equal(np.sort(kept_errors[c].numpy()), np.sort(errors[c].numpy()[order]))
        np.testing.assert_array_equal(
            kept_z[c].numpy()[np.argsort(kept_errors[c].numpy())],
            z[c].numpy()[order][np.argsort(errors[c].numpy()[order])],
        )
    same_errors, same_z = trimmed(errors, z, 10)
    assert same_errors is errors and same_z is z
    with pytest.raises(ValueError, match=r"trim must be in \[0, 1\)"):
        FitOptions(trim=1.0)


def test_a_trim_that_would_leave_one_row_keeps_two_and_trains():
    """The MMD term compares pairs: one row left would divide by zero and turn every weight NaN."""
    x = manifold_rows(100, seed=5)
    x = (x - x.mean(0)) / x.std(0)
    fitted = fit_candidates(
        x, [Candidate(latent_dim=2, hidden=8, components=2)], FitOptions(steps=20, batch_size=10, trim=0.99)
    )
    assert all(torch.isfinite(v).all() for v in fitted[0].model.state_dict().values())
    assert all(np.isfinite(fitted[0].loss_curve))


def test_trim_0_is_the_untrimmed_objective_and_any_other_trim_changes_the_fit():
    """trim=0 leaves training exactly as it was: the same weights, bit for bit."""
    x = manifold_rows(200, seed=4)
    x = (x - x.mean(0)) / x.std(0)
    candidate = Candidate(latent_dim=2, hidden=8, components=2)
    plain = fit_candidates(x, [candidate], FitOptions(steps=30, batch_size=32))[0].model.state_dict()
    zero = fit_candidates(x, [candidate], FitOptions(steps=30, batch_size=32, trim=0.0))[0].model.state_dict()
    trim = fit_candidates(x, [candidate], FitOptions(steps=30, batch_size=32, trim=0.25))[
        0
    ].model.state_dict()
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not all(torch.equal(plain[k], trim[k]) for k in plain)


def test_fitting_runs_on_one_thread_and_gives_the_callers_setting_back():
    """Audit finding: with torch's default intra-op threads, fitting slowed 3.5x (66 s against 19 s)
    when another process held one of two cores, and an audit saw 33x; one thread is as fast on a
    quiet machine (the step's matrices are 100 rows by tens of units)."""
    x = manifold_rows(100, seed=6)
    x = (x - x.mean(0)) / x.std(0)
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit_candidates(
            x,
            [Candidate(latent_dim=2, hidden=8, components=2)],
            FitOptions(steps=10, batch_size=10),
            progress=lambda _: seen.append(torch.get_num_threads()),
        )
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_training_notes_say_what_the_labels_and_the_calibration_rows_allow(tmp_path):
    """Audit finding: an ensemble trained with all-zero labels was told that 'selection falls back',
    though an ensemble selects nothing, and an uncalibrated rate did not say how many rows it needs."""
    x = manifold_rows(200, seed=7)
    candidates = [
        Candidate(latent_dim=2, hidden=8, components=2),
        Candidate(latent_dim=3, hidden=8, components=2),
    ]
    notes = {}
    for ensemble in (True, False):
        request = TrainRequest(candidates, FitOptions(steps=10), ensemble=ensemble)
        result = train_bundle(x, FEATURES, request, tmp_path / str(ensemble), labels=np.zeros(200, bool))
        notes[ensemble] = result.notes
    assert "the labels hold only one class: no validation AUC" in notes[True]
    assert "the labels hold only one class: selection falls back to the log-likelihood" in notes[False]
    # 40 calibration rows (a fifth of 200): 0.01 needs 100 of them, 0.001 needs 1 000
    skipped = [note for note in notes[True] if note.startswith("false-positive rates")]
    assert skipped == [
        "false-positive rates [0.01, 0.001] need at least [100, 1000] calibration rows "
        "(a share 0.2 of the table's rows), 40 here; not calibrated"
    ], notes[True]
