"""The paper's benchmark protocol on Loda-format data, with the classical detectors beside it.

For every dataset and seeded split: 80% of the normal and of the anomalous rows form the training
pool, the rest the test set; training keeps all pooled normal rows and is contaminated, unlabelled,
with pooled anomalies up to 10% of the training set (the paper's protocol), or with none (`clean`,
ADBench's semi-supervised setting): the test rows are the same in both. Standardisation is fitted
on the training rows. A stratified 20% of the training rows is held out as validation: networks are
fitted on the rest, the noise variance and the model selection use the validation rows, and the test
rows are used for nothing but the reported AUC.

Ensembles, per rule of app.train.selection.ENSEMBLES: every candidate a member, each member's test
values of each of the rule's terms put on the scale of its own validation values (a rank, or a
surprisal) and combined as app.bundle.ensemble.member_scores does; no selection at all.

Selection, per score: unsupervised by the score's own mean log-likelihood of the validation rows
(the lowest mean reconstruction error for `reconstruction`), or supervised by the AUC on the
validation rows with their labels ("a few labelled anomalies"). kNN (mean distance to the k nearest
training rows) and Isolation Forest run on the same standardised splits.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from app.bundle.ensemble import member_scores
from app.bundle.scaler import Scaler, Scaling
from app.model.methods import METHODS
from app.model.spec import PROJECTION_STEPS
from app.train import selection as rule
from app.train.data import read_table
from app.train.fit import fit_candidates
from app.train.options import Candidate, FitOptions
from app.train.selection import ENSEMBLES, CandidateReport, auc, evaluate_candidate

ANOMALY_FILE = "easy.txt"  # the protocol's anomalies: the easy difficulty level only
SELECTIONS = ("unsupervised", "supervised")
# kNN on the rows standardised as the networks were (FitOptions.scaling): a scaling that helps the
# networks may help kNN as much, and a comparison should show it.
KNN_AS_TRAINED = "knn_as_trained"
BASELINES = ("knn", "iforest", KNN_AS_TRAINED)
PROTOCOLS = {"contaminated": 0.1, "clean": 0.0}  # the share of training rows that are anomalies, at most


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    normal: NDArray[np.float64]  # (n, d)
    anomalous: NDArray[np.float64]  # (m, d)

    @property
    def rows(self) -> int:
        return self.normal.shape[0] + self.anomalous.shape[0]


def list_datasets(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory of datasets")
    names = sorted(
        p.name for p in root.iterdir() if (p / "normal.txt").is_file() and (p / ANOMALY_FILE).is_file()
    )
    if not names:
        raise ValueError(f"{root} holds no dataset folder with normal.txt and {ANOMALY_FILE}")
    return names


def load_datasets(root: str | Path, names: Sequence[str] | None = None) -> list[Dataset]:
    """Read Loda-format folders (normal.txt + easy.txt, whitespace-separated, no header)."""
    available = list_datasets(root)
    wanted = list(names) if names else available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise ValueError(f"no dataset {unknown} in {root}; available: {', '.join(available)}")
    out = []
    for name in wanted:
        folder = Path(root) / name
        normal = read_table(folder / "normal.txt", min_rows=5).values
        anomalous = read_table(folder / ANOMALY_FILE, min_rows=1).values
        if normal.shape[1] != anomalous.shape[1]:
            raise ValueError(
                f"{name}: normal.txt has {normal.shape[1]} columns but {ANOMALY_FILE} {anomalous.shape[1]}"
            )
        out.append(Dataset(name, normal, anomalous))
    return out


@dataclass(frozen=True, eq=False)
class ProtocolSplit:
    x_train: NDArray[np.float64]  # standardised with the training rows' statistics
    y_train: NDArray[np.bool_]  # labels, for supervised selection only
    x_test: NDArray[np.float64]
    y_test: NDArray[np.bool_]
    scaler: Scaler


def protocol_split(
    dataset: Dataset,
    seed: int,
    train_fraction: float = 0.8,
    contamination: float = 0.1,
    scaling: Scaling = "standard",
) -> ProtocolSplit:
    rng = np.random.default_rng(seed)
    normal = dataset.normal[rng.permutation(dataset.normal.shape[0])]
    anomalous = dataset.anomalous[rng.permutation(dataset.anomalous.shape[0])]
    n_train, a_pool = round(train_fraction * normal.shape[0]), round(train_fraction * anomalous.shape[0])
    # a / (n_train + a) <= contamination, and no more than the pool holds
    a_train = min(a_pool, math.floor(contamination * n_train / (1 - contamination)))
    x_train = np.r_[normal[:n_train], anomalous[:a_train]]
    x_test = np.r_[normal[n_train:], anomalous[a_pool:]]
    scaler = Scaler.fit(x_train, scaling)
    return ProtocolSplit(
        scaler.transform(x_train),
        np.r_[np.zeros(n_train, bool), np.ones(a_train, bool)],
        scaler.transform(x_test),
        np.r_[np.zeros(normal.shape[0] - n_train, bool), np.ones(anomalous.shape[0] - a_pool, bool)],
        scaler,
    )


def stratified_holdout(
    labels: NDArray[np.bool_], fraction: float, seed: int
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(fit rows, validation rows): `fraction` of each class held out, at least one of a present class."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for cls in (False, True):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_held = min(max(1, round(fraction * rows.size)), rows.size - 1) if rows.size > 1 else rows.size
        held.append(rows[:n_held])
        fit.append(rows[n_held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def baseline_scores(
    x_train: NDArray[np.float64], x_test: NDArray[np.float64], seed: int, knn_k: int, trees: int
) -> dict[str, NDArray[np.float64]]:
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=trees, random_state=seed).fit(x_train)
    return {"knn": knn_scores(x_train, x_test, knn_k), "iforest": -forest.score_samples(x_test)}


def protocol_baselines(
    dataset: Dataset, split: int, contamination: float, options: EvaluateOptions, trained: ProtocolSplit
) -> dict[str, NDArray[np.float64]]:
    """The classical detectors' test scores on a split: kNN and Isolation Forest on its rows
    standardised by mean and deviation, as the protocol defines them (../shared/data/loda), and kNN
    on `trained`'s rows, the same split standardised as the networks were (FitOptions.scaling)."""
    protocol = protocol_split(dataset, seed=split, contamination=contamination)
    scores = baseline_scores(protocol.x_train, protocol.x_test, split, options.knn_k, options.forest_trees)
    return scores | {KNN_AS_TRAINED: knn_scores(trained.x_train, trained.x_test, options.knn_k)}


def knn_scores(x_train: NDArray[np.float64], x_test: NDArray[np.float64], k: int) -> NDArray[np.float64]:
    """Each test row's mean distance to its k nearest training rows."""
    from sklearn.neighbors import NearestNeighbors

    distances, _ = NearestNeighbors(n_neighbors=min(k, x_train.shape[0])).fit(x_train).kneighbors(x_test)
    return distances.mean(axis=1)


@dataclass(frozen=True)
class EvaluateOptions:
    candidates: tuple[Candidate, ...]
    fit: FitOptions = field(default_factory=FitOptions)
    val_fraction: float = 0.2
    knn_k: int = 5
    forest_trees: int = 200
    contamination: float = PROTOCOLS["contaminated"]
    # Where each split's held-out scores go (evaluate --keep-scores), so that other ways of combining
    # the members can be measured without refitting them; None: nowhere.
    scores_dir: str | None = None


@dataclass
class SplitResult:
    dataset: str
    split: int
    candidates: list[dict[str, Any]]  # one row per candidate: hyper-parameters and every figure
    baselines: dict[str, float]  # test AUC per classical detector
    seconds: float
    ensembles: dict[str, float] = field(default_factory=dict)  # test AUC per rule of ENSEMBLES


def fitting(dataset: Dataset, options: EvaluateOptions) -> list[Candidate]:
    """The candidates this dataset trains: latent sizes below its number of features (the paper's "smaller
    or equal" would keep one more, as `train` does)."""
    return [c for c in options.candidates if c.latent_dim < dataset.normal.shape[1]]


def fitting_steps(dataset: Dataset, options: EvaluateOptions) -> int:
    """Optimiser steps this dataset costs per split, for the progress bar: candidate groups x steps."""
    return len({c.group() for c in fitting(dataset, options)}) * options.fit.steps


def keep_scores(
    path: Path,
    y_test: NDArray[np.bool_],
    baseline: dict[str, NDArray[np.float64]],
    reports: Sequence[CandidateReport],
) -> None:
    """One split's held-out scores in one .npz: `y_test`, `baseline/<detector>` (test rows) and, per
    candidate i and ensemble term t (app.bundle.ensemble.terms), `val/<i>/<t>` and `test/<i>/<t>`,
    higher = more anomalous."""
    arrays = {"y_test": y_test} | {f"baseline/{name}": s for name, s in baseline.items()}
    for i, report in enumerate(reports):
        arrays |= {f"val/{i}/{t}": v for t, v in report.val_scores.items()}
        arrays |= {f"test/{i}/{t}": v for t, v in report.test_scores.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def evaluate_split(
    dataset: Dataset, split: int, options: EvaluateOptions, progress: Callable[[int], None] | None = None
) -> SplitResult:
    """Fit the grid on one split, score validation and test rows with every method, run the baselines."""
    started = time.perf_counter()
    data = protocol_split(
        dataset, seed=split, contamination=options.contamination, scaling=options.fit.scaling
    )
    fit_rows, val_rows = stratified_holdout(data.y_train, options.val_fraction, seed=split)
    x_fit, x_val, y_val = data.x_train[fit_rows], data.x_train[val_rows], data.y_train[val_rows]
    candidates = fitting(dataset, options)
    if not candidates:
        d = data.x_train.shape[1]
        raise ValueError(f"{dataset.name}: no candidate of the grid has a latent size below its {d} features")
    fit = replace(options.fit, seed=split)
    rows, reports = [], []
    for index, fitted in enumerate(fit_candidates(x_fit, candidates, fit, progress)):
        report = evaluate_candidate(fitted, x_val, y_val, data.x_test, data.y_test, fit.noise)
        reports.append(report)
        row: dict[str, Any] = {"dataset": dataset.name, "split": split, "candidate": index}
        row |= fitted.candidate.to_dict()
        row |= {"sigma2": fitted.model.sigma2, "sigma2_projected": fitted.model.sigma2_projected}
        row["final_loss"] = fitted.loss_curve[-1]
        for method in METHODS:
            row[f"val_loglik_{method}"] = report.val_log_likelihood[method]
            row[f"val_auc_{method}"] = report.val_auc[method]
            row[f"test_auc_{method}"] = report.test_auc[method]
            if method == "reconstruction":
                row["val_reconstruction_error"] = report.val_reconstruction_error
        row["projected_rows"], row["projected_capped"] = report.projected_rows, report.projected_capped
        rows.append(row)
    baseline = protocol_baselines(dataset, split, options.contamination, options, data)
    if options.scores_dir is not None:
        keep_scores(Path(options.scores_dir) / f"{dataset.name}-{split}.npz", data.y_test, baseline, reports)
    ensembles = {}
    for name, (combination, terms) in ENSEMBLES.items():
        # A member whose held-out scores are not all finite (a diverged fit) has no scale to rank on.
        members = [r for r in reports if all(np.isfinite(r.val_scores[t]).all() for t in terms)]
        ensembles[name] = (
            auc(
                data.y_test,
                member_scores(
                    combination,
                    [{t: r.val_scores[t] for t in terms} for r in members],
                    [{t: r.test_scores[t] for t in terms} for r in members],
                ).mean(axis=1),
            )
            if members
            else math.nan
        )
    return SplitResult(
        dataset.name,
        split,
        rows,
        {name: auc(data.y_test, s) for name, s in baseline.items()},
        time.perf_counter() - started,
        ensembles,
    )


def select(rows: list[dict[str, Any]], method: str, selection: str) -> tuple[int, str]:
    """Index of the chosen candidate among one split's rows, and the rule that chose it
    (app.train.selection.select on the rows' validation figures)."""
    return rule.select(
        method,
        selection == "supervised",
        [r[f"val_auc_{method}"] for r in rows],
        [r[f"val_loglik_{method}"] for r in rows],
        [r["val_reconstruction_error"] for r in rows],
    )


def selections(results: list[SplitResult]) -> list[dict[str, Any]]:
    out = []
    for result in results:
        for selection in SELECTIONS:
            for method in METHODS:
                chosen, rule = select(result.candidates, method, selection)
                row = result.candidates[chosen]
                out.append(
                    {
                        "dataset": result.dataset,
                        "split": result.split,
                        "score": method,
                        "selection": selection,
                        "rule": rule,
                        "candidate": chosen,
                        "latent_dim": row["latent_dim"],
                        "beta": row["beta"],
                        "kernel_width": row["kernel_width"],
                        "test_auc": row[f"test_auc_{method}"],
                    }
                )
    return out


def _worker_init() -> None:
    torch.set_num_threads(1)  # small matrices: one thread per process beats two threads on one job


def _run(args: tuple[Dataset, int, EvaluateOptions, Any]) -> SplitResult:
    dataset, split, options, updates = args
    pending = [0]

    def progress(n: int) -> None:
        pending[0] += n
        if pending[0] >= 100:
            updates.put(pending[0])
            pending[0] = 0

    result = evaluate_split(dataset, split, options, progress if updates is not None else None)
    if updates is not None and pending[0]:
        updates.put(pending[0])
    return result


def run_protocol(
    datasets: list[Dataset],
    splits: Sequence[int],
    options: EvaluateOptions,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
    on_result: Callable[[SplitResult], None] | None = None,
) -> list[SplitResult]:
    """Every (dataset, split), in `jobs` processes of one thread each; results in a fixed order.

    Each split is seeded by its number alone, so the figures do not depend on `jobs`.
    """
    work = sorted(
        ((ds, s) for ds in datasets for s in splits), key=lambda w: -fitting_steps(w[0], options) * w[0].rows
    )
    results: list[SplitResult] = []
    if jobs <= 1:
        threads = torch.get_num_threads()
        _worker_init()
        try:
            for ds, s in work:
                result = evaluate_split(ds, s, options, progress)
                results.append(result)
                if on_result:
                    on_result(result)
        finally:  # this process is the caller's: leave its thread count as it was
            torch.set_num_threads(threads)
    else:
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            updates = manager.Queue()
            done = threading.Event()

            def forward() -> None:
                while not done.is_set():
                    try:
                        n = updates.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    if progress:
                        progress(n)

            thread = threading.Thread(target=forward, daemon=True)
            thread.start()
            try:
                with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
                    futures = [pool.submit(_run, (ds, s, options, updates)) for ds, s in work]
                    for future in as_completed(futures):
                        result = future.result()
                        results.append(result)
                        if on_result:
                            on_result(result)
            finally:
                done.set()
                thread.join()
    order = {(ds.name, s): i for i, (ds, s) in enumerate((ds, s) for ds in datasets for s in splits)}
    return sorted(results, key=lambda r: order[(r.dataset, r.split)])


def _label(column: tuple[str, str]) -> str:
    kind, name = column
    if kind == "baseline":
        return {"knn": "kNN", "iforest": "IForest", KNN_AS_TRAINED: "kNN, scaled as trained"}[name]
    return f"{ {'ensemble': 'ens', 'unsupervised': 'unsup', 'supervised': 'sup'}[kind] }: {name}"


def detector_ranks(
    mean: dict[tuple[str, str, str], float], dataset_order: Sequence[str], columns: list[tuple[str, str]]
) -> dict[str, Any]:
    """Each detector's mean rank over the datasets by mean test AUC (1 = best, ties share the mean
    rank), and a Wilcoxon signed-rank test of each against Isolation Forest over the datasets' mean
    AUCs (two-sided; None where every difference is 0), with the datasets it wins."""
    from scipy.stats import rankdata, wilcoxon

    labels = [_label(c) for c in columns]
    table = np.array([[mean[(ds, *c)] for c in columns] for ds in dataset_order])  # (datasets, detectors)
    ranks = np.array([rankdata(-np.nan_to_num(row, nan=-np.inf)) for row in table])
    forest = table[:, columns.index(("baseline", "iforest"))]
    tests: dict[str, dict[str, Any]] = {}
    for j, label in enumerate(labels):
        if columns[j] == ("baseline", "iforest"):
            continue
        differences = table[:, j] - forest
        p = None if np.allclose(differences, 0) else float(wilcoxon(table[:, j], forest).pvalue)
        tests[label] = {"p": p, "wins": f"{int((differences > 0).sum())}/{len(dataset_order)}"}
    return {
        "mean_rank": {label: float(r) for label, r in zip(labels, ranks.mean(axis=0), strict=True)},
        "wilcoxon_vs_iforest": tests,
    }


def summary_table(results: list[SplitResult], dataset_order: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Markdown of mean test AUC per dataset, score and selection, baselines beside; and the key figures."""
    chosen = selections(results)
    mean: dict[tuple[str, str, str], float] = {}
    for ds in dataset_order:
        for selection in SELECTIONS:
            for method in METHODS:
                values = [
                    c["test_auc"]
                    for c in chosen
                    if c["dataset"] == ds and c["selection"] == selection and c["score"] == method
                ]
                mean[(ds, selection, method)] = float(np.nanmean(values))
        for name in BASELINES:
            mean[(ds, "baseline", name)] = float(
                np.nanmean([r.baselines[name] for r in results if r.dataset == ds])
            )
        for name in ENSEMBLES:
            mean[(ds, "ensemble", name)] = float(
                np.nanmean([r.ensembles.get(name, math.nan) for r in results if r.dataset == ds])
            )
    splits = sorted({r.split for r in results})
    ensembles = [("ensemble", e) for e in ENSEMBLES] if any(r.ensembles for r in results) else []
    columns = [("baseline", b) for b in BASELINES] + ensembles + [(s, m) for s in SELECTIONS for m in METHODS]
    header = ["dataset"] + [_label(c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ds in dataset_order:
        cells = [ds] + [f"{mean[(ds, s, m)]:.3f}" for s, m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    overall = {f"{s}:{m}": float(np.mean([mean[(ds, s, m)] for ds in dataset_order])) for s, m in columns}
    lines.append("| **mean** | " + " | ".join(f"**{overall[f'{s}:{m}']:.3f}**" for s, m in columns) + " |")
    wins = {
        selection: sum(
            mean[(ds, selection, "likelihood")] > mean[(ds, selection, "reconstruction")]
            for ds in dataset_order
        )
        for selection in (*SELECTIONS, *(["ensemble"] if ensembles else []))
    }
    best_unsupervised = max(METHODS, key=lambda m: overall[f"unsupervised:{m}"])
    best_mean = overall[f"unsupervised:{best_unsupervised}"]
    scored = sum(c["projected_rows"] for r in results for c in r.candidates)
    capped = sum(c["projected_capped"] for r in results for c in r.candidates)
    unsupervised = [c for c in columns if c[0] != "supervised"]
    ranking = detector_ranks(mean, dataset_order, unsupervised)
    supervised = sum(c["selection"] == "supervised" for c in chosen)
    fallbacks = sum(c["selection"] == "supervised" and c["rule"] != "validation AUC" for c in chosen)
    figures = {
        "supervised_fallbacks": f"{fallbacks}/{supervised}",
        "mean_rank": ranking["mean_rank"],
        "wilcoxon_vs_iforest": ranking["wilcoxon_vs_iforest"],
        "projected_capped": {"rows": scored, "capped": capped, "fraction": capped / scored},
        "datasets": list(dataset_order),
        "splits": splits,
        "mean_test_auc": overall,
        "likelihood_beats_reconstruction": {s: f"{n}/{len(dataset_order)}" for s, n in wins.items()},
        "best_unsupervised_score": best_unsupervised,
        "default_detector": "ensemble:likelihood" if ensembles else None,
        "per_dataset": {f"{ds}|{s}|{m}": v for (ds, s, m), v in mean.items()},
    }
    default = (
        "The default detector (`anomaly-scores train` with no options: every candidate a member, the "
        "surprisals of the two factors of its `likelihood` added) scores "
        f"{overall['ensemble:likelihood']:.3f} and its `likelihood` beats its `reconstruction` on "
        f"{wins['ensemble']} of {len(dataset_order)} datasets. "
        if ensembles
        else ""
    )
    lines += [
        "",
        default + f"Test AUC, mean over splits {splits}. `likelihood` beats `reconstruction` on "
        f"{wins['unsupervised']} of {len(dataset_order)} datasets with unsupervised selection and on "
        f"{wins['supervised']} of {len(dataset_order)} with supervised selection. Best single score under "
        f"unsupervised selection: `{best_unsupervised}`, mean {best_mean:.3f} "
        f"(Isolation Forest {overall['baseline:iforest']:.3f}, kNN {overall['baseline:knn']:.3f}). "
        f"The projection's iteration stopped at its cap of {PROJECTION_STEPS} steps on {capped} of "
        f"{scored} scored rows ({100 * capped / scored:.2f}%), every candidate counted."
        + (
            f" Supervised selection had no labelled anomaly among the validation rows, and fell back to "
            f"the unsupervised rule, in {fallbacks} of {supervised} choices"
            + (" (the clean protocol trains on normal rows only)." if fallbacks == supervised else ".")
            if fallbacks
            else ""
        ),
        "",
        "Unsupervised detectors by mean rank over the datasets (1 = the best AUC on a dataset; "
        "Wilcoxon signed-rank p-value against Isolation Forest over the dataset means, and datasets won):",
        "",
        "| detector | mean rank | wins vs IForest | Wilcoxon p |",
        "|---|---|---|---|",
    ]
    for label, rank in sorted(ranking["mean_rank"].items(), key=lambda item: item[1]):
        test = ranking["wilcoxon_vs_iforest"].get(label)
        p = "n/a" if test is None or test["p"] is None else f"{test['p']:.3f}"
        wins = "n/a" if test is None else test["wins"]
        lines.append(f"| {label} | {rank:.2f} | {wins} | {p} |")
    return "\n".join(lines) + "\n", figures
