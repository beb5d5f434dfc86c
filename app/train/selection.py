"""Judging fitted candidates: one evaluation loop and one selection rule for the trainer and the
paper's evaluation alike.

evaluate_candidate fits the noise on the validation rows and scores them (and test rows, when
there are any) with every method; select picks a candidate by validation AUC where labels of both
classes exist (supervised), else by the validation log-likelihood (unsupervised).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import roc_auc_score

from app.bundle.ensemble import COMBINATIONS, FACTOR_FISHER, FISHER_TAIL, RANK_MEAN, term_scores, terms
from app.model.methods import METHODS
from app.train.fit import Fitted, fit_noise, score_rows
from app.train.options import NoiseModel


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, higher score = more anomalous, ties counting one half (scikit-learn);
    NaN where one class is missing; a non-finite score ranks as the most anomalous."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        return math.nan
    finite = np.isfinite(s)
    if not finite.all():
        top = s[finite].max() if finite.any() else 0.0
        s = np.where(finite, s, top + 1.0)
    return float(roc_auc_score(y, s))


@dataclass
class CandidateReport:
    fitted: Fitted
    val_log_likelihood: dict[str, float]  # mean over the validation rows, per method
    val_reconstruction_error: float  # mean |x - f(g(x))|^2 over the validation rows
    val_auc: dict[str, float] = field(default_factory=dict)  # per method; empty without labels
    test_auc: dict[str, float] = field(default_factory=dict)  # per method; empty without test rows
    projected_rows: int = 0  # rows the projection scored (validation and test)
    projected_capped: int = 0  # of which its iteration stopped at the cap, unconverged
    # Every term an ensemble can rank (app.bundle.ensemble.terms of each combination and method):
    # the rows' values, higher = more anomalous
    val_scores: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    test_scores: dict[str, NDArray[np.float64]] = field(default_factory=dict)


# The rules evaluate compares: how each member's values of the terms are put on a scale, and which
# terms. "likelihood" is what an ensemble bundle's `likelihood` is, the product's default
# (FISHER_TAIL: the density on the manifold, -(log_prior + log_volume), and the residual's, their
# surprisals added, each continued beyond its largest reference); "likelihood, untailed" stops each
# surprisal at log(n + 1) (FACTOR_FISHER, sessions 11 to 17); "likelihood summed" ranks -log p(x)
# whole (RANK_MEAN, the first ensembles');
# "likelihood, factor ranks" adds the factors' ranks instead. The others add each member's ranks
# of the rule's terms, and average the members':
# "manifold" is the first factor alone, blind to how far a row lies off the manifold;
# "latent&reconstruction" ranks the prior term and the residual apart, without the volume.
ENSEMBLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "likelihood": (FISHER_TAIL, terms(FISHER_TAIL, "likelihood")),
    "likelihood, untailed": (FACTOR_FISHER, terms(FACTOR_FISHER, "likelihood")),
    "likelihood summed": (RANK_MEAN, terms(RANK_MEAN, "likelihood")),
    "likelihood, factor ranks": (RANK_MEAN, terms(FACTOR_FISHER, "likelihood")),
    "manifold": (RANK_MEAN, ("likelihood.manifold",)),
    "latent": (RANK_MEAN, ("latent",)),
    "reconstruction": (RANK_MEAN, ("reconstruction",)),
    "latent&reconstruction": (RANK_MEAN, ("latent", "reconstruction")),
}


def _ensemble_scores(method: str, parts: dict[str, NDArray[np.float64]]) -> dict[str, NDArray[np.float64]]:
    return {term: values for c in COMBINATIONS for term, values in term_scores(c, method, parts).items()}


def evaluate_candidate(
    fitted: Fitted,
    x_val: NDArray[np.float64],
    y_val: NDArray[np.bool_] | None = None,
    x_test: NDArray[np.float64] | None = None,
    y_test: NDArray[np.bool_] | None = None,
    noise: NoiseModel = "diagonal",
) -> CandidateReport:
    """Fit the noise on the validation rows, then score them with every method: the mean
    log-likelihood, and the AUC where labels are given; the same for test rows if any."""
    val_projected = fit_noise(fitted.model, x_val, noise)
    report = CandidateReport(fitted, {}, 0.0)
    for method in METHODS:
        val = val_projected if method == "projected" else score_rows(fitted.model, x_val, method)
        report.val_log_likelihood[method] = float(np.mean(val["log_prob"]))
        report.val_scores |= _ensemble_scores(method, val)
        if y_val is not None:
            report.val_auc[method] = auc(y_val, -val["log_prob"])
        if method == "reconstruction":
            report.val_reconstruction_error = float(np.mean(val["reconstruction_error"]))
        test = None if x_test is None else score_rows(fitted.model, x_test, method)
        if test is not None:
            report.test_scores |= _ensemble_scores(method, test)
        if test is not None and y_test is not None:
            report.test_auc[method] = auc(y_test, -test["log_prob"])
        if method == "projected":
            for part in (val, test):
                if part is not None:
                    report.projected_rows += int(part["converged"].size)
                    report.projected_capped += int((~part["converged"]).sum())
    return report


def select(
    method: str,
    supervised: bool,
    val_auc: Sequence[float],
    val_log_likelihood: Sequence[float],
    val_reconstruction_error: Sequence[float],
) -> tuple[int, str]:
    """The index of the chosen candidate and the rule that chose it.

    Supervised: the highest validation AUC of `method`, unless no candidate has one (validation
    rows of one class), when the unsupervised rule applies. Unsupervised: the highest mean
    validation log-likelihood of `method`; for `reconstruction` the lowest mean reconstruction
    error, which ranks the same way (its sigma^2 is fitted to that error) without the floor.
    """
    if supervised:
        aucs = np.asarray(val_auc, dtype=float)
        if aucs.size and not np.isnan(aucs).all():
            return int(np.nanargmax(aucs)), "validation AUC"
    if method == "reconstruction":
        errors = np.asarray(val_reconstruction_error, dtype=float)
        return int(np.nanargmin(errors)), "lowest validation reconstruction error"
    loglik = np.asarray(val_log_likelihood, dtype=float)
    return int(np.nanargmax(loglik)), f"highest validation log-likelihood of {method}"


def select_report(reports: Sequence[CandidateReport], method: str, supervised: bool) -> tuple[int, str]:
    return select(
        method,
        supervised,
        [r.val_auc.get(method, math.nan) for r in reports],
        [r.val_log_likelihood[method] for r in reports],
        [r.val_reconstruction_error for r in reports],
    )
