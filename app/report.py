"""`anomaly-scores report`: one self-contained HTML page about a bundle and, given a data file, about
that file's scores, for a person to look at instead of reading the manifest's JSON.

The module sits beside app/cli.py, above the layers (docs/architecture.md): it scores with app.engine
and reads data with app.train, a pairing app.train itself may not import. Every figure is a PNG
embedded as a base64 data URI, and the page holds no script and no URL, so it opens offline and
travels as one file. matplotlib and scikit-learn (the `train` extra) are imported inside the
functions that use them, so the command line loads without them.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from app.bundle.format import Bundle, EnsembleBundle, describe_networks
from app.model.methods import METHODS, PARTS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from app.engine.scorer import Scorer

# The projection runs an iterative optimisation per row (app/model/scores.py): it is scored only when
# it is the bundle's default, never just to draw one more curve beside the closed-form methods.
SLOW_METHODS = ("projected",)
TOP_ROWS = 10
CHUNK_ROWS = 65_536
BINS = 50
# Histograms span the middle of the data (percentiles TAIL..100-TAIL): one row scored a million
# would otherwise squeeze every other row into a single bin. The rest is drawn in the edge bins.
TAIL = 1.0
COLOURS = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields have no single truth value under ==
class ScoredData:
    """A data file's rows as scored by the bundle: what the report draws, nothing more."""

    path: Path
    rows: NDArray[np.int64]  # 0-based file row of each scored row (missing="skip" leaves some out)
    ids: dict[str, list[Any]]  # id column -> value per scored row
    scores: dict[str, NDArray[np.float64]]  # method -> score per row, higher = more anomalous
    parts: dict[str, NDArray[np.float64]]  # the default method's log_prior, log_volume, log_residual
    labels: NDArray[np.bool_] | None  # per scored row, True = anomaly
    missing: str  # the --missing policy the rows were read with
    imputed: int  # rows with at least one value filled in (missing="impute")
    # per scored row: differs from a column constant in training, flagged whatever its score
    off_constant: NDArray[np.bool_] | None = None


def report_methods(bundle: Bundle, available: Sequence[str], labelled: bool) -> list[str]:
    """The default method, and with labels every other closed-form method the scorer has, so their
    ROC curves can be compared; without labels the others would only cost time."""
    default = bundle.default_method
    if not labelled:
        return [default]
    others = [m for m in METHODS if m != default and m not in SLOW_METHODS]
    return [default, *(m for m in others if m in available and m in bundle.calibration)]


def score_data(
    bundle: Bundle,
    scorer: Scorer,
    path: Path,
    *,
    label_column: str | None = None,
    id_columns: Sequence[str] = (),
    missing: Literal["error", "skip", "impute"] = "error",
    chunk_rows: int = CHUNK_ROWS,
) -> ScoredData:
    """Score every row of `path` in chunks (app.train.data.iter_chunks: its formats, checks and
    missing-value policies), keeping the scores, the default method's parts and the labels."""
    from app.train.data import iter_chunks, read_label_column

    # The labels are read first, so a wrong --label-column fails before any scoring is done.
    file_labels = None if label_column is None else read_label_column(path, label_column)
    methods = report_methods(bundle, scorer.methods, labelled=file_labels is not None)
    fill = bundle.fill_values if missing == "impute" else None
    chunks = iter_chunks(path, bundle.columns, chunk_rows, id_columns=id_columns, missing=missing, fill=fill)
    rows: list[NDArray[np.int64]] = []
    ids: dict[str, list[Any]] = {name: [] for name in id_columns}
    scores: dict[str, list[NDArray[np.float64]]] = {m: [] for m in methods}
    parts: dict[str, list[NDArray[np.float64]]] = {p: [] for p in PARTS}
    off_constant: list[NDArray[np.bool_]] = []
    imputed = 0
    for chunk in chunks:
        if not chunk.values.shape[0]:
            continue
        rows.append(chunk.rows)
        for name, values in chunk.ids.items():
            ids[name] += values
        for method in methods:
            output = scorer.score(chunk.values, method)
            scores[method].append(output.score)
            if method == bundle.default_method:
                for part in PARTS:
                    parts[part].append(getattr(output, part))
                off_constant.append(output.constant_mismatch.any(axis=1))
        if chunk.imputed is not None:
            imputed += int((chunk.imputed > 0).sum())
    if not rows:
        left_out = " (every row has a missing value)" if missing == "skip" else ""
        raise ValueError(f"{path}: no data rows to score{left_out}")
    scored = np.concatenate(rows)
    return ScoredData(
        path=path,
        rows=scored,
        ids=ids,
        scores={m: np.concatenate(v) for m, v in scores.items()},
        parts={p: np.concatenate(v) for p, v in parts.items()},
        labels=None if file_labels is None else file_labels[scored],
        missing=missing,
        imputed=imputed,
        off_constant=np.concatenate(off_constant),
    )


def render_report(bundle: Bundle, data: ScoredData | None = None) -> str:
    """The whole page as one HTML string."""
    sections = [_model_section(bundle), _loss_section(bundle), _calibration_section(bundle)]
    if data is None:
        sections.append(
            "<p class='note'>No data file was given: "
            "<code>anomaly-scores report BUNDLE DATA --out ...</code> adds a file's scores, the share of "
            "rows flagged and, with <code>--label-column</code>, ROC and precision-recall curves.</p>"
        )
    else:
        sections += [
            _scores_section(bundle, data),
            _flagged_section(bundle, data),
            _parts_section(bundle, data),
            _top_rows_section(bundle, data),
            _labels_section(data),
        ]
    title = f"Anomaly report: {bundle.name} {bundle.version}"
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.format(
        title=_e(title),
        heading=_e(title),
        subtitle=_e(f"{bundle.path} · written {created} by anomaly-scores report"),
        body="\n".join(sections),
    )


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.4; }}
h1 {{ font-size: 1.6rem; margin-bottom: 0.2rem; }}
h2 {{ font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; }}
th, td {{ border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; height: auto; display: block; margin: 0.5rem 0; }}
.sub, .note {{ color: #555; }}
</style>
</head>
<body>
<h1>{heading}</h1>
<p class="sub">{subtitle}</p>
{body}
</body>
</html>
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], numeric: Sequence[bool] = ()) -> str:
    """An HTML table of cells already escaped (cells may hold markup such as data attributes); no
    header row when header is None (a table of key-value pairs)."""
    head = (
        ""
        if header is None
        else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>"
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='num'>{c}</td>" if i < len(numeric) and numeric[i] else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _figure(ncols: int = 1, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    """A figure on the Agg canvas, without pyplot: no global figure state, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * ncols if ncols > 1 else 8.0, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    # No Software metadata: the same figure gives the same bytes whatever matplotlib drew it.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


def _model_section(bundle: Bundle) -> str:
    training, features = bundle.training, bundle.features
    networks, noise = describe_networks(bundle)
    default = bundle.threshold(bundle.default_method, bundle.default_fpr)
    shown = ", ".join(features[:20]) + (f", ... ({len(features)} in all)" if len(features) > 20 else "")
    rows = [
        ("name", bundle.name),
        ("version", bundle.version),
        ("created", bundle.created or "not recorded"),
        ("features", f"{len(features)}: {shown}"),
        *(
            [("constant columns", ", ".join(f"{k} = {v:g}" for k, v in bundle.constants.items()))]
            if bundle.constants
            else []
        ),
        ("architecture", networks),
        ("noise", noise),
        (
            "default",
            f"method {bundle.default_method}, false-positive rate {bundle.default_fpr:g}, "
            f"threshold {default.value:.6g} (a score above it is flagged)",
        ),
    ]
    if training:
        rows.append(
            ("selection", f"{training.get('selection')} among {training.get('candidates')} candidates")
        )
        rows.append(("rows", ", ".join(f"{k} {v}" for k, v in (training.get("rows") or {}).items())))
    cells = [(f"<b>{_e(key)}</b>", _e(value)) for key, value in rows]
    notes = training.get("notes") or []
    if training:
        text = "<br>".join(_e(n) for n in notes) if notes else "none"
    else:
        text = "none: the bundle records no training (it was saved directly, not by <code>train</code>)"
    cells.append(("<b>training notes</b>", text))
    return "<h2>Model</h2>\n" + _table(None, cells)


def _loss_section(bundle: Bundle) -> str:
    training = bundle.training
    # An ensemble records one curve per member; the report draws the first member's.
    curve = np.asarray(
        training.get("loss_curve") or (training.get("loss_curves") or [[]])[0], dtype=np.float64
    )
    if curve.size == 0:
        why = (
            "its training section has no <code>loss_curve</code>"
            if training
            else "it was saved directly, not trained by <code>anomaly-scores train</code>"
        )
        return (
            "<h2>Training loss</h2>\n"
            f"<p class='note'>No training loss curve is recorded in this bundle: {why}.</p>"
        )
    steps = (training.get("fit") or {}).get("steps")
    fig, (ax,) = _figure()
    # The stored curve is averaged over windows of the run (fit.curve_points values): each point is
    # placed at the end of its window when the number of steps is known.
    x = np.linspace(steps / curve.size, steps, curve.size) if steps else np.arange(1, curve.size + 1)
    ax.plot(x, curve, color="#1f77b4")
    ax.set_xlabel("optimiser step" if steps else "point of the averaged curve")
    ax.set_ylabel("training loss (window average)")
    if (curve > 0).all() and curve.max() > 20 * curve.min():
        ax.set_yscale("log")  # the first steps' loss would flatten the rest of a linear axis
    ax.set_title("Training loss of the selected candidate")
    ax.grid(alpha=0.3)
    caption = f"<p>{curve.size} points; final loss {curve[-1]:.6g}.</p>"
    return "<h2>Training loss</h2>\n" + _img(fig, "training loss curve") + caption


def _thresholds(bundle: Bundle, method: str) -> list[tuple[float, float]]:
    return [(fpr, bundle.threshold(method, fpr).value) for fpr in bundle.fprs]


def _mark_thresholds(ax: Axes, thresholds: list[tuple[float, float]]) -> None:
    """A vertical line per threshold, named in the legend and beside the line itself."""
    for i, (fpr, value) in enumerate(thresholds):
        colour = COLOURS[i % len(COLOURS)]
        ax.axvline(value, color=colour, linestyle="--", linewidth=1.2, label=f"FPR {fpr:g}: {value:.4g}")
        ax.annotate(
            f"FPR {fpr:g}",
            (value, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -4),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=8,
            color=colour,
        )


def _calibration_section(bundle: Bundle) -> str:
    method = bundle.default_method
    scores = bundle.calibration[method]
    thresholds = _thresholds(bundle, method)
    fig, (ax,) = _figure()
    ax.hist(scores, bins=BINS, color="#aec7e8", edgecolor="#1f77b4", linewidth=0.5, label="calibration rows")
    _mark_thresholds(ax, thresholds)
    meaning = "the members' mean score" if isinstance(bundle, EnsembleBundle) else "-log p(x)"
    ax.set_xlabel(f"score ({method}): {meaning}, higher = more anomalous")
    ax.set_ylabel("rows")
    ax.set_title(f"Calibration scores of '{method}' ({scores.size} held-out normal rows)")
    ax.legend(fontsize=8)
    table = _table(
        ("false-positive rate", "name", "threshold"),
        [(f"{fpr:g}", _e(bundle.threshold(method, fpr).name), f"{value:.6g}") for fpr, value in thresholds],
        (True, False, True),
    )
    return (
        "<h2>Calibration scores and thresholds</h2>\n"
        + _img(fig, f"histogram of the calibration scores of {method} with its thresholds")
        + f"<p>A row is flagged at a rate when its score is above that rate's threshold (method "
        f"<code>{_e(method)}</code>, {scores.size} calibration rows).</p>" + table
    )


def _span(
    values: Sequence[NDArray[np.float64]], whole: Sequence[NDArray[np.float64]] = ()
) -> tuple[float, float]:
    """The plotted range: the middle of `values` (percentiles TAIL..100-TAIL) and all of `whole`."""
    finite = [v[np.isfinite(v)] for v in values]
    ends = [np.percentile(v, [TAIL, 100 - TAIL]) for v in finite if v.size]
    ends += [np.array([w.min(), w.max()]) for w in whole if w.size]
    lo, hi = (min(e[0] for e in ends), max(e[1] for e in ends)) if ends else (0.0, 1.0)
    if hi <= lo:  # a constant part (e.g. log_volume of `reconstruction`, identically 0): widen to draw it
        lo, hi = lo - 0.5, hi + 0.5
    return float(lo), float(hi)


def _histograms(
    ax: Axes, groups: Sequence[tuple[str, NDArray[np.float64], str]], lo: float, hi: float
) -> int:
    """Density histograms over shared bins, values outside [lo, hi] drawn in the edge bins; returns
    how many values were moved there."""
    bins = np.linspace(lo, hi, BINS + 1)
    moved = 0
    for label, group, colour in groups:
        values = group[np.isfinite(group)]
        moved += int(((values < lo) | (values > hi)).sum())
        if values.size:
            ax.hist(
                np.clip(values, lo, hi),
                bins=bins,
                density=True,
                histtype="stepfilled",
                alpha=0.45,
                color=colour,
                edgecolor=colour,
                label=f"{label} ({values.size})",
            )
    return moved


def _by_label(
    values: NDArray[np.float64], labels: NDArray[np.bool_] | None, name: str
) -> list[tuple[str, NDArray[np.float64], str]]:
    if labels is None:
        return [(name, values, "#2ca02c")]
    return [
        (f"{name}, normal (label 0)", values[~labels], "#2ca02c"),
        (f"{name}, anomaly (label 1)", values[labels], "#d62728"),
    ]


def _scores_section(bundle: Bundle, data: ScoredData) -> str:
    method = bundle.default_method
    scores, calibration = data.scores[method], bundle.calibration[method]
    thresholds = _thresholds(bundle, method)
    marks = [np.array([v for _, v in thresholds])]
    lo, hi = _span([scores], [calibration, *marks])
    fig, (ax,) = _figure()
    groups = [("calibration", calibration, "#1f77b4"), *_by_label(scores, data.labels, data.path.name)]
    moved = _histograms(ax, groups, lo, hi)
    _mark_thresholds(ax, thresholds)
    ax.set_xlabel(f"score ({method})")
    ax.set_ylabel("density")
    ax.set_title(f"Scores of {data.path.name} against the calibration scores")
    ax.legend(fontsize=8)
    how = {
        "skip": " Rows with a missing value were left out (<code>--missing skip</code>).",
        "impute": f" {data.imputed} rows had missing values filled with the training centres.",
    }.get(data.missing, "")
    outside = f" {moved} scores beyond the plotted range are drawn in its edge bins." if moved else ""
    return (
        f"<h2>Scores of {_e(data.path.name)}</h2>\n"
        + _img(fig, f"histogram of the scores of {data.path.name} against the calibration histogram")
        + f"<p>{data.rows.size} rows scored with <code>{_e(method)}</code>.{how}{outside}</p>"
    )


def _flagged_section(bundle: Bundle, data: ScoredData) -> str:
    method = bundle.default_method
    scores, labels = data.scores[method], data.labels
    header = ["false-positive rate", "threshold", "rows flagged", "share flagged"]
    if labels is not None:
        header += ["share of label-0 rows flagged", "share of label-1 rows flagged"]
    rows = []
    for fpr, value in _thresholds(bundle, method):
        # as the scorer flags: above the threshold (p-value <= rate), or off a training constant
        flagged = scores > value if data.off_constant is None else (scores > value) | data.off_constant
        row = [f"{fpr:g}", f"{value:.6g}", str(int(flagged.sum())), f"{flagged.mean():.2%}"]
        if labels is not None:
            row += [_share(flagged[~labels]), _share(flagged[labels])]
        rows.append(row)
    off = 0 if data.off_constant is None else int(data.off_constant.sum())
    note = (
        f"<p class='note'>{off} rows differ from a column that was constant in training "
        f"({_e(', '.join(bundle.constants))}): flagged at every threshold, whatever their score.</p>"
        if off
        else ""
    )
    return "<h2>Rows flagged at each threshold</h2>\n" + _table(header, rows, [True] * len(header)) + note


def _share(flags: NDArray[np.bool_]) -> str:
    return f"{flags.mean():.2%}" if flags.size else "no rows"


def _parts_section(bundle: Bundle, data: ScoredData) -> str:
    fig, axes = _figure(ncols=len(PARTS), height=3.2)
    moved = 0
    for ax, part in zip(axes, PARTS, strict=True):
        values = data.parts[part]
        lo, hi = _span([values])
        moved += _histograms(ax, _by_label(values, data.labels, "rows"), lo, hi)
        ax.set_xlabel(part)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle(f"Parts of log p(x) = log_prior + log_volume + log_residual ({bundle.default_method})")
    outside = f" {moved} values beyond the plotted ranges are drawn in the edge bins." if moved else ""
    return (
        "<h2>Score parts</h2>\n"
        + _img(fig, "distributions of log_prior, log_volume and log_residual")
        + "<p>Which part makes a row unlikely: a low <code>log_residual</code> means far from the "
        "learned manifold, a low <code>log_prior</code> an unusual place on it, and "
        f"<code>log_volume</code> how the manifold is stretched there.{outside}</p>"
    )


def _top_rows_section(bundle: Bundle, data: ScoredData) -> str:
    method = bundle.default_method
    scores = data.scores[method]
    top = np.argsort(-scores, kind="stable")[:TOP_ROWS]
    p_values = bundle.p_values(method, scores[top])
    header = ["row", *data.ids, "score", "p-value"] + (["label"] if data.labels is not None else [])
    rows = []
    for i, p in zip(top, p_values, strict=True):
        row = [str(int(data.rows[i]) + 1), *(_e(values[i]) for values in data.ids.values())]
        row += [f"{scores[i]:.6g}", f"{p:.4g}"]
        if data.labels is not None:
            row.append(str(int(data.labels[i])))
        rows.append(row)
    numeric = [True] + [False] * len(data.ids) + [True, True, True]
    return (
        f"<h2>Highest scores</h2>\n<p>The {len(top)} most anomalous rows (rows numbered from 1, header "
        "not counted, as in the file).</p>" + _table(header, rows, numeric)
    )


def _labels_section(data: ScoredData) -> str:
    labels = data.labels
    if labels is None:
        return ""
    if labels.all() or not labels.any():
        return (
            "<h2>ROC and precision-recall</h2>\n<p class='note'>The labels hold only one class "
            f"({int(labels.sum())} of {labels.size} rows labelled 1): ROC and precision-recall curves "
            "need both.</p>"
        )
    from sklearn import metrics

    roc_fig, (roc,) = _figure()
    pr_fig, (pr,) = _figure()
    rows = []
    for i, (method, scores) in enumerate(data.scores.items()):
        colour = f"C{i}"
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
        auc = float(metrics.auc(fpr, tpr))
        precision, recall, _ = metrics.precision_recall_curve(labels, scores)
        ap = float(metrics.average_precision_score(labels, scores))
        roc.plot(fpr, tpr, color=colour, label=f"{method} (AUC {auc:.4f})")
        pr.step(recall, precision, where="post", color=colour, label=f"{method} (AP {ap:.4f})")
        # The exact values ride along in data attributes, for whoever reads the page by program.
        rows.append(
            (
                _e(method),
                f"<span class='auc' data-method='{_e(method)}' data-value='{auc!r}'>{auc:.4f}</span>",
                f"<span class='ap' data-method='{_e(method)}' data-value='{ap!r}'>{ap:.4f}</span>",
            )
        )
    roc.plot([0, 1], [0, 1], color="#999", linestyle=":", label="chance")
    roc.set_xlabel("false-positive rate")
    roc.set_ylabel("true-positive rate")
    roc.set_title("ROC curves")
    roc.legend(fontsize=8, loc="lower right")
    prevalence = float(labels.mean())
    pr.axhline(prevalence, color="#999", linestyle=":", label=f"prevalence {prevalence:.3f}")
    pr.set_xlabel("recall")
    pr.set_ylabel("precision")
    pr.set_title("Precision-recall curves")
    pr.legend(fontsize=8, loc="lower left")
    counts = f"{int(labels.sum())} rows labelled 1 of {labels.size}"
    return (
        "<h2>ROC and precision-recall</h2>\n"
        + f"<p>Against the labels ({counts}); the first method is the bundle's default.</p>"
        + _table(("method", "ROC AUC", "average precision"), rows, (False, True, True))
        + _img(roc_fig, "ROC curves")
        + _img(pr_fig, "precision-recall curves")
    )
