"""The Python API: a scikit-learn outlier detector over the same pipeline and bundle as the command line.

    >>> import numpy as np
    >>> from app.detector import ManifoldDetector
    >>> rng = np.random.default_rng(0)
    >>> t = rng.uniform(-1, 1, size=(400, 1))
    >>> X = np.hstack([t, t**2, -t]) + 0.01 * rng.standard_normal((400, 3))  # rows near a curve
    >>> detector = ManifoldDetector(hidden=16, steps=300, fpr=0.05).fit(X)  # an ensemble of 2
    >>> far = np.array([[0.0, 1.0, 0.0]])  # off the curve
    >>> bool(detector.score_samples(far)[0] < detector.score_samples(X[:1])[0])
    True
    >>> detector.predict(np.vstack([X[:1], far])).tolist()
    [1, -1]

scikit-learn's conventions (OutlierMixin, as IsolationForest and LocalOutlierFactor have them):
`score_samples` is minus the bundle's score of its method (higher = more normal): a single model's
log-likelihood, or minus an ensemble's score (the mean of its members', docs/bundle.md 11.2),
`decision_function` is it minus `offset_` (negative = flagged at the false-positive rate `fpr`),
`predict` is +1 for inliers and -1 for outliers. For PyOD's convention (higher = more anomalous,
labels 0/1), `anomaly_score` is -score_samples and `is_anomaly` the 0/1 flags; `p_value` gives
the conformal p-values; `score_frame` gives the whole table `anomaly-scores score` writes (ids,
scores, parts, flags) for a DataFrame. A fitted detector is a bundle: `save(path)` writes it (the
same directory `anomaly-scores train` writes and the service loads) and `ManifoldDetector.load(path)`
reads one.
Rows may be numpy arrays or pandas DataFrames, whose column names become the feature names and are
then required (in any order) at scoring time. A column that holds one value in every training row is
kept out of the networks (`constants_`: name -> value); a scored row that differs there is flagged
with p-value 0, its log-likelihood is -inf (density 0), and it shows in `constant_mismatch`.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from app.bundle.format import Bundle, load_bundle, move_into_place
from app.bundle.scaler import SCALINGS
from app.engine.factory import BACKENDS, create_scorer
from app.engine.scorer import ScoreOutput, Scorer
from app.model.methods import MAX_ABS_VALUE, METHODS
from app.model.spec import PRIOR_GEOMETRY
from app.train.options import GRIDS, Candidate, FitOptions, expand_grid, grid_conflicts


def _column(names: Any, j: int) -> str:
    """Column j's name in an error: the feature's name, or x{j} where the rows came without names."""
    return f"x{j}" if names is None else str(names[j])


def _within_limit(values: NDArray[np.float64], names: Any = None) -> NDArray[np.float64]:
    """values, if every magnitude is within the limit the service and the command line apply too
    (validate_data has refused NaN and infinities). The error names the column: a DataFrame's
    columns may have come in another order than the training's, which `values` has."""
    too_large = np.abs(values) > MAX_ABS_VALUE
    if too_large.any():
        i, j = (int(v) for v in np.argwhere(too_large)[0])
        limit = f"beyond the limit of {MAX_ABS_VALUE:g} on any value"
        raise ValueError(f"row {i} (0-based), column {_column(names, j)!r} is {values[i, j]:g}, {limit}")
    return values


NETWORK_PARAMETERS = (
    "latent_dim",
    "hidden",
    "depth",
    "activation",
    "prior",
    "components",
    "beta",
    "kernel_width",
)
FIT_PARAMETERS = ("steps", "batch_size", "lr", "seed")


def _record(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _recorded_parameters(bundle: Bundle) -> tuple[dict[str, Any], list[str]]:
    """The detector parameters that train `bundle`'s model again, as far as its `training` record
    holds them (docs/bundle.md 2.6, 11.1), and what they cannot say: a refit of a loaded detector
    (clone(loaded).fit) trains what the bundle holds, not the constructor's defaults."""
    # `training` is a record only (docs/bundle.md 2.6): a bundle from elsewhere may hold less, or other
    # shapes, and still score; what is not an object here is taken as not recorded.
    training = _record(bundle.manifest.get("training"))
    fit = _record(training.get("fit"))
    params: dict[str, Any] = {key: fit[key] for key in FIT_PARAMETERS if key in fit}
    caveats = []
    # Bundles from before the option was recorded were standardised by mean and deviation.
    scaling = fit.get("scaling", "standard")
    if scaling in SCALINGS:
        params["scaling"] = scaling
    else:
        caveats.append(f"its scaling {scaling!r} is none of {list(SCALINGS)}; get_params() shows the default")
    if fit.get("trim", 0.0):
        caveats.append(f"it was trained with trim={fit['trim']}, which the Python API does not set")
    if "ensemble" not in bundle.manifest:
        noise = bundle.manifest.get("noise", {})
        params["noise"] = "diagonal" if noise.get("relative_variance") is not None else "isotropic"
        recorded = _record(training.get("hyper_parameters"))
        network = {k: recorded[k] for k in NETWORK_PARAMETERS if k in recorded}
        return params | network | {"grid": None}, caveats
    entries = bundle.manifest["ensemble"]["members"]
    diagonal = {entry["noise"].get("relative_variance") is not None for entry in entries}
    params["noise"] = "diagonal" if diagonal == {True} else "isotropic"
    members = training.get("members")
    if not isinstance(members, list) or len(members) != len(entries):
        members = [entry.get("hyper_parameters") for entry in entries]
    members = [_record(m) for m in members]
    shared = {
        k: members[0][k] for k in NETWORK_PARAMETERS if all(k in m and m[k] == members[0][k] for m in members)
    }
    fields = set(Candidate.__dataclass_fields__)
    for name, grid in GRIDS.items():
        # The grid's keys at their defaults, as fit requires; every member one of the grid's candidates
        # (a member that diverged is left out of the bundle, so the members may be fewer).
        base = {k: v for k, v in shared.items() if k not in grid}
        geometry = {} if "geometry" in grid else {"geometry": PRIOR_GEOMETRY.get(base.get("prior", "vamp"))}
        try:
            candidate = Candidate(**base, **geometry)
            expansion = [c.to_dict() for c in expand_grid(grid, len(bundle.features), candidate)]
        except (TypeError, ValueError):
            continue
        if all({k: v for k, v in m.items() if k in fields} in expansion for m in members):
            return params | base | {"grid": name}, caveats
    caveats.append(
        f"its {len(members)} members are the candidates of no named grid ({sorted(GRIDS)}); "
        "get_params() shows the default grid"
    )
    return params | {k: v for k, v in shared.items() if k not in GRIDS["default"]}, caveats


class ManifoldDetector(OutlierMixin, BaseEstimator):
    """An anomaly detector trained as `anomaly-scores train` trains, scored as the service scores: the
    paper's likelihood by default (Smidl, Bim, Pevny 2019), of an ensemble of the `grid`'s candidates
    (app.train.options.GRIDS; the network parameters are the base the grid varies); grid=None trains
    one model of the parameters, select=True keeps the one candidate selected on validation rows.
    Parameters are those of app.train.options (Candidate, FitOptions); `method` picks the score, `fpr`
    the false-positive rate whose calibrated threshold `predict` applies (any rate from 1/n of the
    calibration rows)."""

    def __init__(
        self,
        *,
        latent_dim: int = 4,
        hidden: int = 32,
        depth: int = 3,
        activation: str = "swish",
        prior: str = "vamp",
        components: int = 4,
        beta: float = 1.0,
        kernel_width: float = 1.0,
        grid: str | None = "default",
        select: bool = False,
        steps: int = 2_000,
        batch_size: int = 100,
        lr: float = 1e-3,
        seed: int = 0,
        noise: str = "diagonal",
        scaling: str = "robust",
        method: str = "likelihood",
        fpr: float = 0.01,
        backend: str = "onnx",
    ) -> None:
        self.latent_dim, self.hidden, self.depth, self.activation = latent_dim, hidden, depth, activation
        self.prior, self.components, self.beta, self.kernel_width = prior, components, beta, kernel_width
        self.grid, self.select = grid, select
        self.steps, self.batch_size, self.lr, self.seed, self.noise = steps, batch_size, lr, seed, noise
        self.scaling = scaling
        self.method, self.fpr, self.backend = method, fpr, backend

    def fit(self, X: Any, y: Any = None) -> ManifoldDetector:
        """Train on the rows of X (no labels: `y` is ignored, as for every unsupervised detector)."""
        from app.train.pipeline import TrainRequest, constant_columns, train_bundle

        self._check_scoring_parameters()
        if self.prior not in PRIOR_GEOMETRY:
            raise ValueError(f"prior must be one of {list(PRIOR_GEOMETRY)}, got {self.prior!r}")
        values = self._validated(X, "drop or impute those rows before fitting", ensure_min_samples=2)
        names = [
            str(n) for n in getattr(self, "feature_names_in_", [f"x{j}" for j in range(values.shape[1])])
        ]
        candidate = Candidate(
            latent_dim=self.latent_dim,
            hidden=self.hidden,
            depth=self.depth,
            activation=self.activation,  # type: ignore[arg-type]
            prior=self.prior,  # type: ignore[arg-type]
            geometry=PRIOR_GEOMETRY[self.prior],
            components=self.components,
            beta=self.beta,
            kernel_width=self.kernel_width,
        )
        fit = FitOptions(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            noise=self.noise,  # type: ignore[arg-type]
            scaling=self.scaling,  # type: ignore[arg-type]
        )
        # The detector's rate is the bundle's calibrated default, so a saved and loaded detector flags alike.
        if self.grid is None:
            candidates = [candidate]
        else:
            if self.grid not in GRIDS:
                raise ValueError(f"grid must be one of {sorted(GRIDS)} or None, got {self.grid!r}")
            conflicts = grid_conflicts(GRIDS[self.grid], candidate)
            if conflicts:
                raise ValueError(
                    f"grid {self.grid!r} varies {'; '.join(conflicts)}: pass grid=None to train one model "
                    "with these parameters"
                )
            # The networks take the columns that are not constant in training (train_bundle drops those).
            d = len(names) - len(constant_columns(values, names))
            candidates = expand_grid(GRIDS[self.grid], d, candidate)
        request = TrainRequest(
            candidates,
            fit,
            method=self.method,
            fprs=(self.fpr,),
            default_fpr=self.fpr,
            name="detector",
            ensemble=self.grid is not None and not self.select,
        )
        import torch

        # Training seeds torch's generator: the caller's own random stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            result = train_bundle(values, names, request, self._directory() / "bundle")
        for note in result.notes:  # what the command line prints: constant columns, rates it could not keep
            warnings.warn(note, UserWarning, stacklevel=2)
        self._use(result.bundle)
        return self

    def _check_scoring_parameters(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if isinstance(self.fpr, bool) or not isinstance(self.fpr, int | float) or not 0 < self.fpr < 1:
            raise ValueError(f"fpr must be a false-positive rate between 0 and 1, got {self.fpr!r}")

    def _directory(self) -> Path:
        """A scratch directory for a bundle of the detector's own (every bundle_ lives in one), removed
        with the detector, or by _use once another bundle replaces it."""
        directory = Path(tempfile.mkdtemp(prefix="anomaly-scores-"))
        weakref.finalize(self, shutil.rmtree, directory, True)
        return directory

    def __getstate__(self) -> dict[str, Any]:
        # onnxruntime's sessions do not pickle: a fitted detector pickles as its bundle's files.
        state = {k: v for k, v in self.__dict__.items() if k not in ("bundle_", "scorer_")}
        if "bundle_" in self.__dict__:
            files = self.bundle_.path.iterdir()
            state["bundle_files_"] = {f.name: f.read_bytes() for f in files if f.is_file()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        files = state.pop("bundle_files_", None)
        self.__dict__.update(state)
        if files is not None:
            directory = self._directory() / "bundle"
            directory.mkdir()
            for name, data in files.items():
                (directory / name).write_bytes(data)
            self._use(load_bundle(directory))

    def _validated(self, X: Any, remedy: str, **checks: Any) -> NDArray[np.float64]:
        """X as float64 rows, checked as scikit-learn checks them and against the value limit; a
        missing value is named by its row and column (scikit-learn's message names neither, and
        suggests another estimator)."""
        try:
            values = validate_data(self, X, dtype=np.float64, **checks)
        except ValueError as error:
            if "NaN" not in str(error):
                raise
            try:
                rows = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
            except (TypeError, ValueError):
                raise error from None
            i, j = (int(v) for v in np.argwhere(np.isnan(rows))[0])
            names = X.columns if hasattr(X, "columns") else getattr(self, "feature_names_in_", None)
            raise ValueError(
                f"Input X contains NaN: row {i} (0-based), column {_column(names, j)!r} first; {remedy}"
            ) from None
        return _within_limit(values, getattr(self, "feature_names_in_", None))

    def _use(self, bundle: Bundle) -> None:
        previous = self.__dict__.get("bundle_")
        self.bundle_ = bundle
        self.scorer_: Scorer = create_scorer(bundle, self.backend, threads=1)
        self.n_features_in_ = len(bundle.columns)
        self.constants_ = dict(bundle.constants)
        if previous is not None and previous.path.parent != bundle.path.parent:
            # a refit in a loop keeps one directory, not one per fit until the detector goes
            shutil.rmtree(previous.path.parent, ignore_errors=True)

    # method, fpr and backend may change after fit (set_params): any rate from 1/n has a threshold
    # in the bundle, so these follow them rather than what fit saw, and predict, decision_function
    # and the thresholds always agree.
    @property
    def threshold_(self) -> float:
        """The score above which a row is flagged, for `method` at `fpr` (higher = more anomalous)."""
        check_is_fitted(self, "bundle_")
        return self.bundle_.threshold(self.method, self.fpr).value

    @property
    def offset_(self) -> float:
        """-threshold_: decision_function = score_samples - offset_ is negative for flagged rows."""
        return -self.threshold_

    def _score(self, X: Any) -> ScoreOutput:
        check_is_fitted(self, "bundle_")
        self._check_scoring_parameters()
        if self.scorer_.backend != self.backend:
            self.scorer_ = create_scorer(self.bundle_, self.backend, threads=1)
        names = getattr(self, "feature_names_in_", None)
        if names is not None and hasattr(X, "columns") and set(X.columns) == set(names):
            X = X[list(names)]  # a DataFrame's columns are matched by name, whatever their order
        values = self._validated(
            X, "score_frame(frame, missing='impute' or 'skip') scores such rows", reset=False
        )
        return self.scorer_.score(values, self.method, self.fpr)

    def score_samples(self, X: Any) -> NDArray[np.float64]:
        """Minus the bundle's score of `method` per row, higher = more normal: a single model's log
        p(x); an ensemble's mean of its members' surprisals, negated, which is bounded (rows beyond
        every member's references all score -2 log(n + 1) for likelihood, n the references: they
        tie; grid=None or select=True rank them by log p(x)). -inf for a row that differs from a
        column constant in training (density 0 there), so that decision_function < 0 exactly when
        predict flags the row."""
        out = self._score(X)
        return np.where(out.constant_mismatch.any(axis=1), -np.inf, -out.score)

    def decision_function(self, X: Any) -> NDArray[np.float64]:
        """score_samples minus offset_: negative for the rows flagged at `fpr`."""
        return self.score_samples(X) - self.offset_

    def predict(self, X: Any) -> NDArray[np.int64]:
        """+1 inlier, -1 outlier (flagged at the false-positive rate `fpr`)."""
        return np.where(self._score(X).is_anomaly, -1, 1)

    def anomaly_score(self, X: Any) -> NDArray[np.float64]:
        """-score_samples: higher = more anomalous (PyOD's decision_function convention; a single
        model's -log p(x)); +inf where score_samples is -inf."""
        return -self.score_samples(X)

    def is_anomaly(self, X: Any) -> NDArray[np.int64]:
        """1 for the rows flagged at `fpr`, else 0 (PyOD's predict convention)."""
        return self._score(X).is_anomaly.astype(np.int64)

    def p_value(self, X: Any) -> NDArray[np.float64]:
        """Conformal p-values against the held-out calibration scores."""
        return self._score(X).p_value

    def constant_mismatch(self, X: Any) -> NDArray[np.bool_]:
        """(n, len(constants_)): whether each row differs from each column that was constant in
        training (constants_, in order). Such rows are flagged by predict and have p-value 0."""
        return self._score(X).constant_mismatch

    def score_frame(
        self, frame: Any, id_columns: tuple[str, ...] = (), missing: str = "error"
    ) -> Any:  # pandas.DataFrame
        """The table `anomaly-scores score` writes, for a DataFrame: the id columns, then score,
        log_likelihood, its parts, p_value and is_anomaly (and constant_mismatch / imputed where they
        apply), through the same function as the command line and the Ray and Spark engines
        (app.batch.core). Columns by name, in any order; missing: "error", "skip" or "impute"."""
        import pyarrow as pa

        from app.batch.core import BatchOptions, output_schema, score_batch
        from app.train.data import id_types

        check_is_fitted(self, "bundle_")
        if not hasattr(frame, "columns"):
            raise TypeError(
                f"score_frame takes a pandas DataFrame with the columns {list(self.bundle_.columns)}, got "
                f"{type(frame).__name__}; score_samples, predict and p_value take arrays"
            )
        table = pa.Table.from_pandas(frame, preserve_index=False)
        options = BatchOptions(self.method, self.fpr, tuple(id_columns), missing)  # type: ignore[arg-type]
        schema = output_schema(self.bundle_, options, id_types(table.schema, options.id_columns))
        return pa.Table.from_batches(score_batch(self.scorer_, table, options, schema), schema).to_pandas()

    def save(self, path: str | Path) -> Path:
        """Write the bundle to `path`, a directory: a bundle or an empty directory there is replaced,
        anything else is refused (BundleError) and left as it is."""
        check_is_fitted(self, "bundle_")
        target = Path(path)
        if target.exists() and target.resolve() == self.bundle_.path.resolve():
            return target
        # Staged beside the target, then moved into place: a failed copy leaves the old bundle.
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        try:
            shutil.copytree(self.bundle_.path, staged, dirs_exist_ok=True)
            move_into_place(staged, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return target

    @classmethod
    def load(cls, path: str | Path, **params: Any) -> ManifoldDetector:
        """A fitted detector from a bundle (written by save, `anomaly-scores train` or the trainer),
        scoring as `method`, `fpr` and `backend` say (default: the bundle's method and rate). The
        bundle is copied: changing or removing `path` later does not change the detector, nor what
        it pickles or saves. Its parameters are those the bundle records it was trained with (a
        single model as grid=None), so that clone(loaded).fit(X) trains the same kind of model on X;
        a bundle they cannot describe (a grid of no name, a trimmed objective) is loaded with a
        UserWarning saying what a refit would do instead."""
        unknown = sorted(set(params) - {"method", "fpr", "backend"})
        if unknown:
            raise TypeError(f"load takes method, fpr and backend; the bundle fixes {unknown}")
        source = load_bundle(path)  # refused here, naming the user's path, before anything is copied
        recorded, caveats = _recorded_parameters(source)
        if caveats:
            warnings.warn(
                f"{path}: a refit of this detector trains another model than the bundle's: "
                + "; ".join(caveats),
                UserWarning,
                stacklevel=2,
            )
        detector = cls(**(recorded | {"method": source.default_method, "fpr": source.default_fpr} | params))
        bundle = load_bundle(shutil.copytree(source.path, detector._directory() / "bundle"))
        detector._check_scoring_parameters()
        detector._use(bundle)
        if bundle.columns != [f"x{j}" for j in range(len(bundle.columns))]:
            detector.feature_names_in_ = np.asarray(bundle.columns, dtype=object)
        return detector
