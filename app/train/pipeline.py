"""From a table to a bundle: split, standardise, fit the grid, fit the noise, select, calibrate, save.

Rows are split once, by seed, into training (network fitting), validation (noise variance and model
selection) and calibration (thresholds and p-values, seen by nothing else). Labels, when given,
choose between candidates and are reported; they enter neither fitting nor calibration, so the
calibrated rates describe the data as it comes, contamination included.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.bundle.calibration import DEFAULT_FPRS, check_fpr
from app.bundle.ensemble import FISHER_TAIL, every_term, member_scores, term_scores
from app.bundle.format import Bundle, save_bundle, save_ensemble
from app.bundle.scaler import Scaler
from app.model.methods import METHODS
from app.train.fit import fit_candidates, score_rows
from app.train.options import Candidate, FitOptions
from app.train.selection import CandidateReport, auc, evaluate_candidate, select_report

MIN_ROWS_PER_SPLIT = 10


@dataclass(frozen=True)
class Splits:
    train: NDArray[np.intp]
    validation: NDArray[np.intp]
    calibration: NDArray[np.intp]


def split_rows(n: int, val_fraction: float, cal_fraction: float, seed: int) -> Splits:
    if not (0 < val_fraction < 1 and 0 < cal_fraction < 1 and val_fraction + cal_fraction < 1):
        raise ValueError(
            f"validation ({val_fraction}) and calibration ({cal_fraction}) fractions must be in (0, 1) "
            "and leave rows for training"
        )
    n_val, n_cal = round(n * val_fraction), round(n * cal_fraction)
    n_train = n - n_val - n_cal
    if min(n_val, n_cal, n_train) < MIN_ROWS_PER_SPLIT:
        raise ValueError(
            f"{n} rows give {n_train} training, {n_val} validation and {n_cal} calibration rows; "
            f"each split needs at least {MIN_ROWS_PER_SPLIT}"
        )
    order = np.random.default_rng(seed).permutation(n)
    return Splits(
        np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_val]), np.sort(order[n_train + n_val :])
    )


@dataclass(frozen=True)
class TrainRequest:
    candidates: list[Candidate]
    fit: FitOptions = field(default_factory=FitOptions)
    method: str = "likelihood"  # the bundle's default score, and the selection criterion's
    val_fraction: float = 0.2
    cal_fraction: float = 0.2
    fprs: tuple[float, ...] | None = None  # None: the defaults that the calibration split can support
    default_fpr: float = 0.01
    name: str = "model"
    # True: every candidate that trained to finite scores is a member of an ensemble bundle, scored by
    # the mean of its members' scores (app.bundle.ensemble); False: the one candidate `select` picks.
    ensemble: bool = False


@dataclass
class TrainResult:
    bundle: Bundle
    reports: list[CandidateReport]
    selected: list[int]  # the candidates in the bundle: the one selected, or the ensemble's members
    notes: list[str]


def _choose_fprs(request: TrainRequest, n_cal: int, notes: list[str]) -> tuple[tuple[float, ...], float]:
    if request.fprs is not None:
        for fpr in request.fprs:
            check_fpr(fpr, n_cal)
        fprs = tuple(request.fprs)
    else:
        fprs = tuple(f for f in DEFAULT_FPRS if f >= 1 / n_cal)
        skipped = [f for f in DEFAULT_FPRS if f < 1 / n_cal]
        if skipped:
            # rate f needs n_cal >= 1/f (the threshold is the largest of the top f share of n_cal scores)
            needed = [math.ceil(1 / f - 1e-9) for f in skipped]
            notes.append(
                f"false-positive rates {skipped} need at least {needed} calibration rows (a share "
                f"{request.cal_fraction:g} of the table's rows), {n_cal} here; not calibrated"
            )
        if not fprs:
            raise ValueError(f"{n_cal} calibration rows cannot calibrate any of {DEFAULT_FPRS}")
    default = request.default_fpr if request.default_fpr in fprs else min(fprs, key=lambda f: abs(f - 0.01))
    if default != request.default_fpr:
        notes.append(
            f"the default false-positive rate is {default}, not the {request.default_fpr} asked for, which "
            f"{n_cal} calibration rows cannot resolve; any rate from 1/{n_cal} = {1 / n_cal:.3g} can be "
            "asked for when scoring"
        )
    return fprs, default


def _leaderboard(reports: list[CandidateReport], selected: list[int]) -> str:
    out = io.StringIO()
    rows = []
    for i, report in enumerate(reports):
        row: dict[str, Any] = {"candidate": i, "selected": int(i in selected)}
        row |= report.fitted.candidate.to_dict()
        row["final_loss"] = report.fitted.loss_curve[-1]
        row["sigma2"] = report.fitted.model.sigma2
        row["sigma2_projected"] = report.fitted.model.sigma2_projected
        row |= {f"val_loglik_{m}": v for m, v in report.val_log_likelihood.items()}
        row |= {f"val_auc_{m}": v for m, v in report.val_auc.items()}
        rows.append(row)
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def constant_columns(values: NDArray[np.float64], columns: list[str]) -> dict[str, float]:
    """The columns that hold one value in every row, and that value.

    Such a column says nothing about which rows are normal, and its zero variance has no density:
    training keeps it out of the networks and records it, so that a scored row that differs there
    is reported rather than silently ignored. A table of nothing else cannot be modelled."""
    if not values.shape[0]:
        return {}
    constant = (values == values[:1]).all(axis=0)
    if constant.all():
        raise ValueError(f"every column holds one value in every row ({', '.join(columns)}): nothing to fit")
    return {name: float(values[0, j]) for j, name in enumerate(columns) if constant[j]}


# Fewer rows than this are in some order by chance too often for a note to mean anything: 20
# distinct values of a column without order fall in increasing order with probability 1 / 20!.
MIN_ORDERED_ROWS = 20


def ordered_columns(values: NDArray[np.float64], columns: list[str]) -> list[str]:
    """The columns whose values strictly increase, or strictly decrease, from each row to the next:
    a row number or a clock, not a measurement. Rows scored later lie beyond every training value
    there, and every one of them is flagged for that column alone."""
    if values.shape[0] < MIN_ORDERED_ROWS:
        return []
    steps = np.diff(values, axis=0)
    ordered = (steps > 0).all(axis=0) | (steps < 0).all(axis=0)
    return [name for name, is_ordered in zip(columns, ordered, strict=True) if is_ordered]


def ordered_note(names: list[str]) -> str:
    shown = ", ".join(map(repr, names))
    return (
        f"column(s) {shown} change in the same direction from every row to the next, as a row number or "
        "a clock does: rows scored later lie beyond the training values there and will be flagged for "
        "it. If it is not a measurement, leave it out (--id-column keeps it in the output, "
        "--ignore-columns drops it)"
    )


# Standardised training values beyond this many scales from the centre are gross: no column of the
# paper's ten datasets reaches it under either scaling (their largest, cardiotocography's, is 380
# interquartile ranges), and the mean and deviation cannot reach it below a million rows, since no
# value lies more than sqrt(n - 1) deviations from a mean of n.
GROSS_SCALES = 1e3


def gross_note(x_train: NDArray[np.float64], features: list[str]) -> list[str]:
    """A note naming the features whose standardised training rows reach GROSS_SCALES: a fit of
    squared errors gives such rows much of its attention, at the cost of the normal rows' detail on
    every feature; in a test, values 1e17 scales out left a model that flagged nothing."""
    far = np.abs(x_train).max(axis=0, initial=0.0)
    names = [
        f"{name!r} (up to {value:.2g})"
        for name, value in zip(features, far, strict=True)
        if value > GROSS_SCALES
    ]
    if not names:
        return []
    return [
        f"column(s) {', '.join(names)} hold training values more than {GROSS_SCALES:g} scales from their "
        "centre: gross values (a wrong unit, a sentinel such as 999999?) that a squared-error fit attends "
        "to at the cost of the other rows' detail. Clean or clip them before training"
    ]


def constants_note(constants: dict[str, float]) -> str:
    shown = ", ".join(f"{name!r} (= {value:g})" for name, value in constants.items())
    return (
        f"column(s) {shown} hold the same value in every row: kept out of the model and recorded in the "
        "bundle; a scored row whose value differs there is flagged, with the column named"
    )


def _without_constants(
    values: NDArray[np.float64], columns: list[str], notes: list[str]
) -> tuple[NDArray[np.float64], list[str], dict[str, float]]:
    """The table without its constant columns, the remaining names, and the constants' values."""
    constants = constant_columns(values, columns)
    if not constants:
        return values, columns, constants
    notes.append(constants_note(constants))
    keep = [j for j, name in enumerate(columns) if name not in constants]
    return values[:, keep], [columns[j] for j in keep], constants


def train_bundle(
    values: NDArray[np.float64],
    features: list[str],
    request: TrainRequest,
    out_dir: str | Path,
    *,
    labels: NDArray[np.bool_] | None = None,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    started = time.perf_counter()
    notes: list[str] = []
    columns = list(features)
    values, features, constants = _without_constants(values, columns, notes)
    ordered = ordered_columns(values, features)
    if ordered:
        notes.append(ordered_note(ordered))
    splits = split_rows(values.shape[0], request.val_fraction, request.cal_fraction, request.fit.seed)
    scaler = Scaler.fit(values[splits.train], request.fit.scaling)
    x = scaler.transform(values)
    notes += gross_note(x[splits.train], features)
    val_labels = None if labels is None else labels[splits.validation]
    if val_labels is not None and (val_labels.all() or not val_labels.any()):
        which = "the labels hold" if labels.all() or not labels.any() else "the validation rows' labels hold"
        then = "no validation AUC" if request.ensemble else "selection falls back to the log-likelihood"
        notes.append(f"{which} only one class: {then}")
        val_labels = None
    cal_rows = splits.calibration
    cal_labels = None if labels is None else labels[cal_rows]
    fprs, default_fpr = _choose_fprs(request, cal_rows.size, notes)

    fitted = fit_candidates(x[splits.train], request.candidates, request.fit, progress)
    reports = [
        evaluate_candidate(f, x[splits.validation], val_labels, noise=request.fit.noise) for f in fitted
    ]
    common = {
        "name": request.name,
        "features": features,
        "scaler": scaler,
        "columns": columns,
        "constants": constants,
        "fprs": fprs,
        "default_method": request.method,
        "default_fpr": default_fpr,
    }
    rows = {
        "train": int(splits.train.size),
        "validation": int(splits.validation.size),
        "calibration": int(cal_rows.size),
    }
    if request.ensemble:
        return _save_ensemble(
            reports, x[cal_rows], request, out_dir, common, rows, labels, cal_labels, notes, started
        )
    selected, rule = select_report(reports, request.method, supervised=val_labels is not None)
    criterion = {
        "validation AUC": f"supervised: highest validation AUC of '{request.method}'",
        "lowest validation reconstruction error": "unsupervised: lowest mean validation reconstruction error",
    }.get(rule, f"unsupervised: highest mean validation log-likelihood of '{request.method}'")
    best = reports[selected].fitted

    calibration_scores = {m: -score_rows(best.model, x[cal_rows], m)["log_prob"] for m in METHODS}
    training = {
        "hyper_parameters": best.candidate.to_dict(),
        "fit": {k: v for k, v in vars(request.fit).items()},
        "selection": criterion,
        "candidates": len(reports),
        "rows": rows,
        "labels": _labels_summary(labels),
        "validation_log_likelihood": reports[selected].val_log_likelihood,
        "validation_auc": reports[selected].val_auc or None,
        "calibration_auc": held_out_auc(cal_labels, calibration_scores),
        "loss_curve": best.loss_curve,
        "notes": notes,
    }
    bundle = save_bundle(
        out_dir,
        model=best.model,
        calibration_scores=calibration_scores,
        **common,
        training=training,
        leaderboard_csv=_leaderboard(reports, [selected]),
        build={"training_seconds": round(time.perf_counter() - started, 1)},
    )
    return TrainResult(bundle, reports, [selected], notes)


def held_out_auc(
    labels: NDArray[np.bool_] | None, scores: dict[str, NDArray[np.float64]]
) -> dict[str, Any] | None:
    """With labels of both classes among the calibration rows, each method's AUC there: rows that
    neither fitted the networks nor were their references, nor chose among candidates, so the
    figure is what the bundle does on rows it has not seen (its threshold excepted, which these
    rows set). None without labels, or with one class."""
    if labels is None or labels.all() or not labels.any():
        return None
    return {
        "rows": int(labels.size),
        "anomalies": int(labels.sum()),
        "auc": {method: auc(labels, scores[method]) for method in METHODS},
    }


def _labels_summary(labels: NDArray[np.bool_] | None) -> dict[str, int] | None:
    return None if labels is None else {"anomalies": int(labels.sum()), "rows": int(labels.size)}


def _save_ensemble(
    reports: list[CandidateReport],
    x_cal: NDArray[np.float64],
    request: TrainRequest,
    out_dir: str | Path,
    common: dict[str, Any],
    rows: dict[str, int],
    labels: NDArray[np.bool_] | None,
    cal_labels: NDArray[np.bool_] | None,
    notes: list[str],
    started: float,
) -> TrainResult:
    """Every candidate whose validation scores are finite becomes a member; its validation rows'
    values of the terms FISHER_TAIL ranks are its references, and the ensemble's scores of the
    calibration rows its calibration."""
    keys = every_term(FISHER_TAIL)
    members = [i for i, r in enumerate(reports) if all(np.isfinite(r.val_scores[k]).all() for k in keys)]
    left_out = [i for i in range(len(reports)) if i not in members]
    if not members:
        raise ValueError(
            f"none of the {len(reports)} candidates trained to finite scores: nothing to combine"
        )
    if left_out:
        notes.append(f"candidates {left_out} scored validation rows as non-finite (diverged): not members")
    models = [reports[i].fitted.model for i in members]
    references = [{k: reports[i].val_scores[k] for k in keys} for i in members]
    calibration_scores = {
        method: member_scores(
            FISHER_TAIL,
            references,
            [term_scores(FISHER_TAIL, method, score_rows(model, x_cal, method)) for model in models],
        ).mean(axis=1)
        for method in METHODS
    }
    training = {
        "members": [reports[i].fitted.candidate.to_dict() for i in members],
        "fit": dict(vars(request.fit)),
        "selection": f"ensemble of {len(members)} candidates, each scoring a row by the surprisals of its "
        "density's factors (on the manifold, off it) among its validation rows', continued beyond the "
        "largest; their scores averaged",
        "candidates": len(reports),
        "rows": rows,
        "labels": _labels_summary(labels),
        "calibration_auc": held_out_auc(cal_labels, calibration_scores),
        "validation_log_likelihood": {
            m: float(np.mean([reports[i].val_log_likelihood[m] for i in members])) for m in METHODS
        },
        "loss_curves": [reports[i].fitted.loss_curve for i in members],
        "notes": notes,
    }
    bundle = save_ensemble(
        out_dir,
        models=models,
        references=references,
        combination=FISHER_TAIL,
        hyper_parameters=[reports[i].fitted.candidate.to_dict() for i in members],
        calibration_scores=calibration_scores,
        **common,
        training=training,
        leaderboard_csv=_leaderboard(reports, members),
        build={"training_seconds": round(time.perf_counter() - started, 1)},
    )
    return TrainResult(bundle, reports, members, notes)
