"""The `anomaly-scores` command line: train, score, info, report, serve, evaluate, keygen, sign, verify."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

import numpy as np

from app.bundle.format import MANIFEST, Bundle, BundleError, describe_networks, load_bundle
from app.bundle.scaler import SCALINGS
from app.engine.errors import ServiceError
from app.model.methods import METHODS
from app.model.spec import PRIOR_GEOMETRY, Network
from app.train.options import GRIDS, Candidate, FitOptions, NoiseModel, grid_conflicts

if TYPE_CHECKING:
    from app.api.settings import Settings

OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")


def _grid_sizes() -> str:
    """The named grids with their candidates on a table wide enough for all of them."""
    return ", ".join(f"{name!r} ({math.prod(map(len, grid.values()))})" for name, grid in GRIDS.items())


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a table and write a bundle")
    p.add_argument("data", type=Path, help="CSV with header, Parquet, .npy, or whitespace-separated .txt")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace a bundle already at --out")
    p.add_argument("--name", help="model name stored in the bundle (default: the data file's stem)")
    _options_from(
        p.add_argument_group("model (one candidate, or the base of every grid candidate)"), Candidate
    )
    fit = p.add_argument_group("fitting")
    _options_from(fit, FitOptions)
    fit.add_argument("--val-fraction", type=float, default=0.2)
    fit.add_argument("--cal-fraction", type=float, default=0.2)
    fit.add_argument(
        "--grid",
        default="default",
        help=f"the candidates: {_grid_sizes()}, a JSON file of lists, or 'none' for one model of the "
        "options above; latent sizes that do not fit the table's width are left out",
    )
    fit.add_argument(
        "--select",
        action="store_true",
        help="keep the one candidate selected on the validation rows, not an ensemble of all of them",
    )
    fit.add_argument("--method", default="likelihood", choices=METHODS, help="default score and selection")
    fit.add_argument("--fpr", type=float, action="append", help="calibrated false-positive rate (repeat)")
    fit.add_argument("--default-fpr", type=float, default=0.01, help="the rate flagged by default (0.01)")
    labels = p.add_argument_group("labels (model selection and report only, never fitting)")
    exclusive = labels.add_mutually_exclusive_group()
    exclusive.add_argument("--label-column", help="column holding 0/1 anomaly labels")
    exclusive.add_argument("--labels", type=Path, help="file with one 0/1 label per row")
    data = p.add_argument_group("data")
    data.add_argument(
        "--missing", choices=["error", "drop"], default="error", help="rows with missing values"
    )
    _add_column_options(data)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class _Given(argparse.Action):
    """Stores the value and the option's name in `given`: an option given with its default value is
    still given (`--latent 4` beside a grid that varies the latent size is a contradiction)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, _: Any = None
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.__dict__.setdefault("given", set()).add(self.dest)


def _options_from(group: argparse._ArgumentGroup, cls: type) -> None:
    """One option per field of the dataclass `cls`: its type, choices (a Literal's values), default
    and the `help` of its metadata, or of the Network field it redeclares with another default."""
    hints = get_type_hints(cls)
    declared = {f.name: f.metadata for f in fields(Network)}
    for f in fields(cls):
        meta = f.metadata or declared.get(f.name, {})
        kind = hints[f.name]
        choices = get_args(kind) if get_origin(kind) is Literal else None
        # The geometry follows the prior unless asked for (a Gaussian is no density on the sphere).
        default = None if f.name == "geometry" else f.default
        group.add_argument(
            meta.get("flag", "--" + f.name.replace("_", "-")),
            dest=f.name,
            type=type(choices[0]) if choices else kind,
            choices=choices,
            default=default,
            action=_Given,
            help=meta["help"] + ("" if default is None else f" (default {default})"),
        )


def _add_column_options(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    group.add_argument(
        "--id-column",
        action="append",
        default=[],
        help="a column identifying rows (repeat): never a feature; `score` writes it beside the scores",
    )
    group.add_argument(
        "--ignore-columns", default="", help="comma-separated columns to leave out of the features"
    )


def _columns_left_out(args: argparse.Namespace) -> list[str]:
    return [*args.id_column, *(c.strip() for c in args.ignore_columns.split(",") if c.strip())]


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a file's rows with a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output .csv or .parquet, rows in input order; with --engine, a new directory of Parquet parts",
    )
    p.add_argument("--method", choices=METHODS, help="default: the bundle's")
    p.add_argument("--fpr", type=float, help="threshold's false-positive rate (default: the bundle's)")
    p.add_argument("--backend", default="onnx", choices=["onnx", "torch"], help="default onnx (CPU)")
    p.add_argument("--device", default="cpu", help="torch backend: cpu, cuda, or auto")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="float64: every method in float64 (torch backend), for reference computations",
    )
    p.add_argument("--chunk-rows", type=int, default=65_536, help="rows held in memory at once")
    p.add_argument(
        "--missing",
        choices=["error", "skip", "impute"],
        default="error",
        help="rows with missing values: stop (default), leave out (the output's `row` column shows "
        "which rows are there), or fill with the scaler's centres, the training medians by default (the "
        "`imputed` column counts the cells)",
    )
    p.add_argument(
        "--id-column", action="append", default=[], help="a column identifying rows (repeat), written first"
    )
    engine = p.add_argument_group("distributed (docs/scale-out.md)")
    engine.add_argument(
        "--engine",
        choices=["local", "ray", "spark"],
        default="local",
        help="ray or spark: DATA may be a directory of Parquet or CSV files, scored a row group (or CSV "
        "file) per task, onnx backend; needs the ray or spark extra",
    )
    engine.add_argument(
        "--address",
        help="ray: the cluster's address (default: a local instance); BUNDLE, DATA and --out must then "
        "be on storage every node sees",
    )
    engine.add_argument("--master", help="spark: the master URL (default: local[WORKERS])")
    engine.add_argument("--workers", type=int, help="local instance: cores to use (default: all)")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a bundle's metadata")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="the whole manifest as JSON")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML page: a bundle's training and calibration, a data file's scores",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "data", type=Path, nargs="?", help="optional table to score (CSV, Parquet, .npy or text, as `score`)"
    )
    p.add_argument("--out", type=Path, required=True, help="HTML file to write (.html), figures inside")
    p.add_argument(
        "--label-column", help="column of DATA holding 0/1 anomaly labels: adds ROC and precision-recall"
    )
    p.add_argument(
        "--id-column",
        action="append",
        default=[],
        help="a column of DATA identifying rows (repeat), shown beside the highest scores",
    )
    p.add_argument(
        "--missing",
        choices=["error", "skip", "impute"],
        default="error",
        help="rows of DATA with missing values: stop (default), leave out, or fill with the scaler's centres",
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP (settings: ANOMALY_* environment variables)")
    p.add_argument(
        "--model", type=Path, help="bundle directory (default: $ANOMALY_MODEL_PATH or models/default)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")


QUICK_GRID: dict[str, list[Any]] = {"latent_dim": [2], "beta": [1.0], "kernel_width": [1.0, 0.1]}
# The steps `train` fits with by default: the evaluation measures the detector a user gets.
EVALUATE_STEPS = FitOptions().steps


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="the paper's protocol on Loda-format datasets, with kNN and Isolation Forest beside",
        description="Five seeded 80/20 splits per dataset, training contaminated with up to 10% unlabelled "
        "anomalies (the paper's protocol) or clean (normal rows only), the same test rows in both; every "
        "grid candidate scored with every method, selected supervised and unsupervised, and all of them "
        "combined as ensembles; mean ranks and Wilcoxon tests against Isolation Forest.",
    )
    p.add_argument(
        "--protocol",
        choices=["contaminated", "clean", "both"],
        default="both",
        help="training with up to 10%% unlabelled anomalies, or normal rows only; each into OUT/<protocol>",
    )
    p.add_argument(
        "data_dir", type=Path, help="folder of datasets, each a folder with normal.txt and easy.txt"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder for each protocol's CSVs, table.md and summary.json"
    )
    p.add_argument("--datasets", nargs="+", help="dataset folder names (default: all)")
    p.add_argument("--splits", type=int, help="seeded splits 0..N-1 (default 5)")
    p.add_argument("--grid", help="'default' (the default), 'paper', or a JSON file of lists")
    p.add_argument("--steps", type=int, help=f"optimiser steps per candidate (default {EVALUATE_STEPS})")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--trim", type=float, default=0.0, help="train with the trimmed objective (train --trim); default 0"
    )
    p.add_argument(
        "--noise",
        choices=get_args(NoiseModel),
        default=FitOptions().noise,
        help=f"the residual's noise (train --noise); default {FitOptions().noise}",
    )
    p.add_argument(
        "--scaling",
        choices=SCALINGS,
        default=FitOptions().scaling,
        help=f"how the networks' rows are standardised (train --scaling); default {FitOptions().scaling}",
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default 2)")
    p.add_argument(
        "--keep-scores",
        action="store_true",
        help="also write every member's held-out scores per split to OUT/<protocol>/scores/ (.npz), "
        "to try other combinations without refitting",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a pipeline check: the two smallest datasets, one split, two candidates, 300 steps",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="write a new Ed25519 key pair for signing bundles (PEM files)")
    p.add_argument("--private", type=Path, required=True, help="private key file to create (mode 0600)")
    p.add_argument("--public", type=Path, required=True, help="public key file to create, for verify")


def _add_sign(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sign", help="verify a bundle loads, then sign it: writes bundle.sig into it")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="private key file (PEM, from keygen)")


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a bundle's signature against trusted keys, and load it")
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        required=True,
        help="public key file (PEM) whose signatures are accepted (repeat for several)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly-scores", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_score(sub)
    _add_info(sub)
    _add_report(sub)
    _add_serve(sub)
    _add_evaluate(sub)
    _add_keygen(sub)
    _add_sign(sub)
    _add_verify(sub)
    return parser


def _grid_spec(value: str) -> dict[str, list[Any]]:
    if value in GRIDS:
        return GRIDS[value]
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--grid {value!r} is neither {sorted(GRIDS)} nor a file")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"grid file {path} is not valid JSON: {e}") from e
    if not isinstance(spec, dict) or not all(isinstance(v, list) and v for v in spec.values()):
        raise ValueError(
            f'grid file {path} must be a JSON object of non-empty lists, e.g. {{"beta": [0.1, 1]}}'
        )
    return spec


@contextmanager
def _needs(extra: str) -> Iterator[None]:
    """Imports of an optional extra: a missing package is an `error:` naming the install, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as e:
        raise ValueError(
            f"this command needs the package {e.name!r}: pip install 'anomaly-scores[{extra}]'"
        ) from e


def _train(args: argparse.Namespace) -> int:
    with _needs("train"):
        from tqdm import tqdm

        from app.model.device import resolve_device
        from app.train.data import MissingValue, label_like_columns, read_table
        from app.train.options import expand_grid
        from app.train.pipeline import (
            TrainRequest,
            constant_columns,
            constants_note,
            ordered_columns,
            ordered_note,
            train_bundle,
        )

    # Every option is checked before the data is read or anything is written.
    network = {f.name: getattr(args, f.name) for f in fields(Candidate)}
    network["geometry"] = args.geometry or PRIOR_GEOMETRY[args.prior]
    base = Candidate(**network)
    grid = _grid_spec(args.grid) if args.grid != "none" else None
    conflicts = grid_conflicts(grid, base, getattr(args, "given", set())) if grid is not None else []
    if conflicts:
        raise ValueError(
            f"--grid {args.grid} varies {'; '.join(conflicts)}: pass --grid none to train one model with "
            "these options, or leave them out"
        )
    fit = FitOptions(**{f.name: getattr(args, f.name) for f in fields(FitOptions)})
    fit = replace(fit, device=resolve_device(fit.device))
    _check_out(args.out, [p for p in (args.data, args.labels) if p is not None], what="directory")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        # --force replaces a bundle, nothing else: not a file, not a directory of other things
        if not (args.out / MANIFEST).is_file():
            raise ValueError(f"--out {args.out} exists and is not a bundle (no {MANIFEST}); name another")
        if not args.force:
            raise ValueError(f"--out {args.out} holds a bundle; pass --force to replace it")
    try:
        table = read_table(
            args.data,
            label_column=args.label_column,
            labels_path=args.labels,
            missing=args.missing,
            exclude=_columns_left_out(args),
        )
    except MissingValue as e:
        raise ValueError(f"{e} (--missing drop leaves rows with missing values out)") from e
    if table.dropped_rows:
        shown = ", ".join(str(r + 1) for r in table.dropped_rows[:10])
        more = "" if len(table.dropped_rows) <= 10 else f" and {len(table.dropped_rows) - 10} more"
        print(
            f"dropped {len(table.dropped_rows)} rows with missing values (rows {shown}{more})",
            file=sys.stderr,
        )
    for name in label_like_columns(table):
        print(
            f"warning: column {name!r} holds only 0 and 1 and is named like a label; it is trained on as a "
            f"feature. If it marks anomalies, pass --label-column {name} (or --ignore-columns {name})",
            file=sys.stderr,
        )
    constants = constant_columns(table.values, table.feature_names)
    ordered = ordered_columns(table.values, table.feature_names)
    # What the table itself shows is said before the training, not only in the notes after it.
    warned = [constants_note(constants)] if constants else []
    warned += [ordered_note(ordered)] if ordered else []
    for warning in warned:
        print(f"warning: {warning}", file=sys.stderr)
    d = table.values.shape[1] - len(constants)
    candidates = expand_grid(grid, d, base) if grid is not None else [base]
    if grid is None:
        base.architecture(d)  # refuse an impossible single model before any work
    request = TrainRequest(
        candidates=candidates,
        fit=fit,
        method=args.method,
        val_fraction=args.val_fraction,
        cal_fraction=args.cal_fraction,
        fprs=tuple(args.fpr) if args.fpr else None,
        default_fpr=args.default_fpr,
        name=args.name or args.data.stem,
        ensemble=grid is not None and not args.select,
    )
    groups = len({c.group() for c in candidates})
    with tqdm(
        total=groups * fit.steps, disable=args.quiet, unit="step", desc=f"{len(candidates)} candidates"
    ) as bar:
        result = train_bundle(
            table.values, table.feature_names, request, args.out, labels=table.labels, progress=bar.update
        )
    for note in result.notes:
        if note not in warned:
            print(f"note: {note}", file=sys.stderr)
    if not args.quiet:
        _print_info(result.bundle)
    return 0


def _check_out(out: Path, inputs: list[Path], what: str = "file") -> None:
    """Refuse, before any work, an --out that could not be written or would destroy an input: the
    input itself, a directory holding an input, a read-only file, a path under a file."""
    target = out.resolve()
    for given in inputs:
        source = given.resolve()
        if source == target or source.is_relative_to(target):
            raise ValueError(f"--out {out} would replace the input {given}; write somewhere else")
    if out.exists():
        if what == "file" and not out.is_file():
            raise ValueError(f"--out {out} exists and is not a file")
        if not os.access(out, os.W_OK):
            raise ValueError(f"--out {out} exists and is read-only")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {parent} (permission denied)")


@contextmanager
def _writer(path: Path, schema: Any) -> Iterator[Any]:
    """Append-only writer of record batches of `schema` as CSV or Parquet, chosen by the suffix. Rows
    go to a partial file renamed to `path` only when every chunk was written: a run that fails
    halfway leaves no output that could pass for a whole one. No rows give a file of the columns."""
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out must end in one of {OUTPUT_SUFFIXES}, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with _format_writer(partial, suffix, schema) as write:
            yield write
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def _format_writer(path: Path, suffix: str, schema: Any) -> Iterator[Any]:
    import pyarrow as pa

    if suffix == ".csv":
        with path.open("w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(schema.names)  # pandas' quoting, for 0 rows too

            def write(batch: pa.RecordBatch) -> None:
                batch.to_pandas().to_csv(f, header=False, index=False, float_format="%.9g")

            yield write
    else:
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, schema) as writer:
            yield writer.write_batch


def _score(args: argparse.Namespace) -> int:
    from app.engine.factory import create_scorer

    with _needs("train"):
        from app.batch.core import BatchOptions, output_schema, score_file
        from app.train.data import MissingValue, id_types

    bundle = load_bundle(args.bundle)
    options = BatchOptions(
        method=args.method,
        fpr=args.fpr,
        id_columns=tuple(args.id_column),
        missing=args.missing,
        chunk_rows=args.chunk_rows,
    )
    if args.engine != "local":
        return _score_distributed(args, options)
    _check_out(args.out, [args.data])
    scorer = create_scorer(bundle, args.backend, args.device, dtype=args.dtype)
    schema = output_schema(bundle, options, id_types(args.data, options.id_columns))
    read = 0

    def seen(chunk: Any) -> None:
        nonlocal read
        read = chunk.end

    batches = score_file(scorer, args.data, options, schema, on_chunk=seen)
    rows = imputed = 0
    with _writer(args.out, schema) as write:
        try:
            for batch in batches:
                write(batch)
                rows += batch.num_rows
                if options.missing == "impute":
                    imputed += int(np.count_nonzero(batch.column("imputed").to_numpy()))
        except MissingValue as e:
            raise ValueError(f"{e} (--missing skip leaves such rows out, --missing impute fills them)") from e
    skipped = f", {read - rows} rows with missing values left out" if args.missing == "skip" else ""
    filled = f", {imputed} rows with training centres filled in" if args.missing == "impute" else ""
    print(
        f"scored {rows} rows{skipped}{filled} with {bundle.name} {bundle.version} -> {args.out}",
        file=sys.stderr,
    )
    return 0


def _constants_text(constants: dict[str, float]) -> str:
    return (
        ", ".join(f"{name} = {value:g}" for name, value in constants.items())
        + " (constant in training, kept out of the model: a row that differs there is flagged)"
    )


def _score_distributed(args: argparse.Namespace, options: Any) -> int:
    """`score --engine ray|spark`: the same rows as a local run, in Parquet parts under --out."""
    from app.train.data import MissingValue

    if args.backend != "onnx" or args.dtype != "float32":
        raise ValueError("--engine scores with the onnx backend in float32; leave out --backend and --dtype")
    if (args.address and args.engine != "ray") or (args.master and args.engine != "spark"):
        raise ValueError("--address is ray's option and --master spark's")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.out.exists():
        raise ValueError(f"--out {args.out} exists; with --engine it must name a new directory")
    started = time.perf_counter()
    try:
        if args.engine == "ray":
            with _needs("ray"):
                from app.batch import on_ray

            result = on_ray.score_files(
                args.bundle, args.data, args.out, options, address=args.address, workers=args.workers
            )
        else:
            with _needs("spark"):
                from app.batch import on_spark

            result = on_spark.score_files(
                args.bundle, args.data, args.out, options, master=args.master, workers=args.workers
            )
    except MissingValue as e:
        raise ValueError(f"{e} (--missing skip leaves such rows out, --missing impute fills them)") from e
    print(
        f"scored {result['parts']} parts of {args.data} on {args.engine} in "
        f"{time.perf_counter() - started:.1f} s -> {args.out}",
        file=sys.stderr,
    )
    return 0


SCALING_TEXT = {
    "robust": "robust: each feature centred at its training median, divided by its IQR / 1.349 (by its "
    "deviation where the IQR is 0)",
    "standard": "standard: each feature centred at its training mean, divided by its deviation",
}


def _print_info(bundle: Bundle) -> None:
    training, features = bundle.training, bundle.features
    networks, noise = describe_networks(bundle)
    lines = [
        f"name         {bundle.name}",
        f"version      {bundle.version}  (schema {bundle.manifest['schema_version']})",
        f"created      {bundle.created}",
        f"features     {len(features)}: {', '.join(features[:8])}" + (" ..." if len(features) > 8 else ""),
        f"model        {networks}",
        f"noise        {noise}",
        f"default      method {bundle.default_method}, false-positive rate {bundle.default_fpr}",
    ]
    if bundle.constants:
        lines.append(f"constants    {_constants_text(bundle.constants)}")
    if training:
        lines.append(
            f"selection    {training.get('selection')} among {training.get('candidates')} candidates"
        )
        lines.append(f"rows         {training.get('rows', {})}")
        held_out = training.get("calibration_auc")
        if isinstance(held_out, dict) and isinstance(held_out.get("auc"), dict):
            figures = ", ".join(f"{m} {v:.3f}" for m, v in held_out["auc"].items() if isinstance(v, float))
            lines.append(
                f"held-out AUC {figures} ({held_out.get('anomalies')} labelled anomalies among "
                f"{held_out.get('rows')} calibration rows)"
            )
        fit = training.get("fit") if isinstance(training.get("fit"), dict) else {}
        scaling = fit.get("scaling", "standard")  # bundles from before the record: mean and deviation
        lines.append(f"scaling      {SCALING_TEXT.get(scaling, scaling)}")
        if "hyper_parameters" in training:
            hp = training["hyper_parameters"]
            lines.append(f"chosen       beta {hp.get('beta')}, kernel width {hp.get('kernel_width')}")
        # What training had to decide for the user (a default rate that the calibration rows could
        # not resolve, a single-class validation split) is said here too, not only when it ran.
        lines += [f"note         {note}" for note in training.get("notes", [])]
    lines.append("thresholds   (score above which a row is flagged)")
    for method in (m for m in METHODS if m in bundle.calibration):
        marks = "  ".join(
            f"{bundle.threshold(method, fpr).name}={bundle.threshold(method, fpr).value:.4g}"
            for fpr in bundle.fprs
        )
        lines.append(f"  {method:<14} {marks}")
    print("\n".join(lines))


def _info(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    if args.json:
        print(json.dumps(bundle.manifest, indent=2))
    else:
        _print_info(bundle)
    return 0


def _report(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out must end in .html, got {args.out.name!r}")
    if args.data is None and (args.label_column or args.id_column or args.missing != "error"):
        raise ValueError("--label-column, --id-column and --missing describe DATA: give a data file too")
    with _needs("train"):
        # Imported now, not after the data was scored: a missing extra costs no wait.
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401

        from app.report import render_report, score_data
        from app.train.data import MissingValue

    bundle = load_bundle(args.bundle)
    data = None
    if args.data is not None:
        from app.engine.factory import create_scorer

        with _needs("serve"):  # the onnx backend runs on onnxruntime, which the serve extra installs
            scorer = create_scorer(bundle, "onnx")
        try:
            data = score_data(
                bundle,
                scorer,
                args.data,
                label_column=args.label_column,
                id_columns=args.id_column,
                missing=args.missing,
            )
        except MissingValue as e:
            raise ValueError(f"{e} (--missing skip leaves such rows out, --missing impute fills them)") from e
    page = render_report(bundle, data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    scored = "" if data is None else f" and {data.rows.size} rows of {args.data}"
    print(f"report of {bundle.name} {bundle.version}{scored} -> {args.out}", file=sys.stderr)
    return 0


def _check_bundle_within(settings: Settings) -> None:
    """Refuse a bad, unsigned or untrusted bundle, or one whose graphs fail their checks, before
    binding the port, within the load time limit (a load stuck on a hung file system ends with the
    process: it runs in a daemon thread)."""
    from app.engine.host import in_daemon_thread, load_trusted

    def check() -> None:
        bundle = load_trusted(settings.model_path, tuple(settings.trusted_keys))
        if settings.backend == "onnx":
            from app.bundle.graphs import merged_graphs

            merged_graphs(bundle)

    try:
        in_daemon_thread("bundle-check", check).result(settings.load_timeout_s)
    except TimeoutError:
        raise BundleError(
            f"loading {settings.model_path} did not finish within {settings.load_timeout_s:g} s "
            "(ANOMALY_LOAD_TIMEOUT_S)"
        ) from None


def _serve(args: argparse.Namespace) -> int:
    import functools
    import os
    import signal

    import uvicorn

    from app.api.protocol import BoundedHttpToolsProtocol
    from app.api.settings import Settings

    if args.model is not None:
        # Through the environment, so every worker process builds the same settings.
        os.environ["ANOMALY_MODEL_PATH"] = str(args.model)
    settings = Settings()
    _check_bundle_within(settings)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the handler it found;
    # a no-op handler here turns that into a normal exit with status 0, which orchestrators expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    options = {
        "host": args.host,
        "port": args.port,
        "log_level": settings.log_level,
        "access_log": False,  # the service writes its own JSON line per request
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "http": functools.partial(BoundedHttpToolsProtocol, head_timeout_s=settings.head_timeout_s),
    }
    if args.workers == 1:
        from app.api.main import create_app
        from app.api.server import DrainingServer

        app = create_app(settings)
        DrainingServer(uvicorn.Config(app, **options), app.state.service, settings.drain_s).run()
    else:  # uvicorn's supervisor owns the signals: no readiness drain (docs/operations.md)
        uvicorn.run("app.api.main:create_app", factory=True, workers=args.workers, **options)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from app.train.evaluate import PROTOCOLS, EvaluateOptions, load_datasets
    from app.train.options import expand_grid

    datasets = load_datasets(args.data_dir, args.datasets)
    if args.quick and not args.datasets:
        datasets = sorted(datasets, key=lambda ds: ds.normal.shape[0])[:2]
    splits = range(args.splits if args.splits is not None else 1 if args.quick else 5)
    if len(splits) < 1:
        raise ValueError("--splits must be at least 1")
    grid = _grid_spec(args.grid) if args.grid else QUICK_GRID if args.quick else _grid_spec("default")
    steps = args.steps if args.steps is not None else 300 if args.quick else EVALUATE_STEPS
    largest = max(ds.normal.shape[1] for ds in datasets)
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    for protocol in protocols:
        options = EvaluateOptions(
            candidates=tuple(expand_grid(grid, largest, Candidate())),
            fit=FitOptions(
                steps=steps,
                batch_size=args.batch_size,
                lr=args.lr,
                trim=args.trim,
                noise=args.noise,
                scaling=args.scaling,
            ),
            contamination=PROTOCOLS[protocol],
            scores_dir=str(args.out / protocol / "scores") if args.keep_scores else None,
        )
        _evaluate_protocol(args, protocol, datasets, list(splits), options, grid)
    return 0


def _evaluate_protocol(
    args: argparse.Namespace,
    protocol: str,
    datasets: list[Any],
    splits: list[int],
    options: Any,
    grid: dict[str, list[Any]],
) -> None:
    import time

    import pandas as pd
    from tqdm import tqdm

    from app.train.evaluate import fitting_steps, run_protocol, selections, summary_table

    started = time.perf_counter()
    out = args.out / protocol
    total = sum(fitting_steps(ds, options) for ds in datasets) * len(splits)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=total, disable=args.quiet, unit="step", desc=f"{protocol}, {len(datasets)} datasets"
    ) as bar:
        results = run_protocol(
            datasets,
            splits,
            options,
            jobs=args.jobs,
            progress=bar.update,
            on_result=lambda r: (
                bar.write(f"{r.dataset} split {r.split}: {r.seconds:.0f} s") if not args.quiet else None
            ),
        )
    order = [ds.name for ds in datasets]
    table, figures = summary_table(results, order)
    pd.DataFrame([row for r in results for row in r.candidates]).to_csv(out / "candidates.csv", index=False)
    pd.DataFrame(selections(results)).to_csv(out / "selections.csv", index=False)
    pd.DataFrame([{"dataset": r.dataset, "split": r.split, **r.baselines} for r in results]).to_csv(
        out / "baselines.csv", index=False
    )
    pd.DataFrame([{"dataset": r.dataset, "split": r.split, **r.ensembles} for r in results]).to_csv(
        out / "ensembles.csv", index=False
    )
    (out / "table.md").write_text(table)
    seconds = time.perf_counter() - started
    summary = {
        "protocol": protocol,
        "contamination": options.contamination,
        "datasets_dir": str(args.data_dir),
        "seconds": round(seconds, 1),
        "jobs": args.jobs,
        "grid": grid,
        "candidates": len(options.candidates),
        "steps": options.fit.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "trim": options.fit.trim,
        "noise": options.fit.noise,
        "scaling": options.fit.scaling,
        "split_seconds": {f"{r.dataset}|{r.split}": round(r.seconds, 1) for r in results},
    } | figures
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.quiet:
        print(f"## {protocol}\n\n{table}")
        print(f"{len(results)} splits in {seconds / 60:.1f} min -> {out}", file=sys.stderr)


def _keygen(args: argparse.Namespace) -> int:
    from app.bundle.signing import generate_keypair

    key_id = generate_keypair(args.private, args.public)
    print(f"key {key_id}: private {args.private} (keep it secret), public {args.public}", file=sys.stderr)
    return 0


def _sign(args: argparse.Namespace) -> int:
    from app.bundle.signing import sign_bundle

    info = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle} with key {info.key_id} -> {info.path}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from app.bundle.signing import load_verified_bundle

    bundle, info = load_verified_bundle(args.bundle, args.trusted_key)
    print(f"verified {bundle.name} {bundle.version}: signed by trusted key {info.key_id}, {info.algorithm}")
    return 0


COMMANDS = {
    "train": _train,
    "score": _score,
    "info": _info,
    "report": _report,
    "serve": _serve,
    "evaluate": _evaluate,
    "keygen": _keygen,
    "sign": _sign,
    "verify": _verify,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, ServiceError) as e:  # DataError, BundleError, ScoringFailed: user-facing messages
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
