"""The model bundle: the one place that knows how a trained model is stored. See docs/bundle.md.

A bundle is a directory:
  bundle.json              manifest: schema, identity, features, scaler, architecture, noise,
                           thresholds, calibration and training summaries, file hashes
  weights.safetensors      network and prior tensors, named as in `app.model.spec.weight_shapes`, plus
                           derived prior tensors under `derived.` for re-implementers
  calibration.safetensors  sorted calibration scores, one float64 vector per score method
  leaderboard.csv          every hyper-parameter candidate tried (optional)

No pickle anywhere. `version` is a hash of the manifest, which holds every file's SHA-256, so it
names the content exactly. Loading verifies schema, hashes and shapes and refuses anything else.
Reading a bundle needs numpy and safetensors only; torch is imported only to build or save networks.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from app.bundle import calibration as cal
from app.bundle.ensemble import FISHER_TAIL, every_term
from app.bundle.scaler import Scaler
from app.model.methods import METHODS
from app.model.spec import Architecture, weight_shapes

if TYPE_CHECKING:
    from app.model.manifold import ManifoldModel
    from app.model.onnx_export import ExportedGraph

# 2: encoder's volume restricted to the manifold, projected as MAP + Laplace with sigma2_projected,
# graphs take float64 rows, derived prior tensors in float64.
# 3: input columns held constant in training ("columns", "constants") are kept out of the networks.
# A bundle is written with the lowest version that describes it (3 only when it has constant
# columns), so a reader of version 2 refuses exactly the bundles it would score wrongly.
# 4: an ensemble (docs/bundle.md 11): members' networks and reference values in one bundle, scored
# by the mean of the members' scores against them; written only for ensembles, so older readers
# refuse what they cannot score rather than read one member as the model.
# 5: a network's noise may be one variance per feature, sigma2 * noise.relative_variance; written
# only for such bundles (single model or ensemble, the "ensemble" key tells which), so a reader of
# versions 2 to 4 refuses the bundles whose residual it would score as sigma2 I.
SCHEMA_VERSION = 3
ENSEMBLE_SCHEMA = 4
NOISE_SCHEMA = 5
READABLE_VERSIONS = (2, 3, 4, 5)
# A scored value equals a column's training constant when |x - c| <= CONSTANT_RTOL * |c|: float32
# transport of c (relative rounding 6e-8) passes, any other value, and any value off a constant 0, not.
CONSTANT_RTOL = 1e-6
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"
CALIBRATION = "calibration.safetensors"
LEADERBOARD = "leaderboard.csv"
ONNX_FILE = "scoring-{method}.onnx"
# An ensemble's: member i's tensors under MEMBER_PREFIX.format(i) in WEIGHTS, its sorted reference
# values of each term its combination ranks (app.bundle.ensemble.terms) under "<term>.<i>" in
# REFERENCES, its graphs in MEMBER_ONNX_FILE. Training writes FISHER_TAIL; bundles of sessions 11 to 17
# name FACTOR_FISHER, the first ensemble bundles RANK_MEAN, and both still load. An older build
# refuses a combination it does not know.
REFERENCES = "references.safetensors"
MEMBER_PREFIX = "members.{index}."
MEMBER_ONNX_FILE = "scoring-{method}-m{index}.onnx"


class BundleError(ValueError):
    """A bundle cannot be loaded: missing, corrupt, truncated, mismatched or from another schema."""


@dataclass(frozen=True)
class Threshold:
    name: str
    method: str
    fpr: float
    value: float


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]
    weights: dict[str, NDArray[np.floating]] = field(repr=False)
    calibration: dict[str, NDArray[np.float64]] = field(repr=False)  # method -> sorted scores

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def features(self) -> list[str]:
        """The columns the networks take, in order: `columns` without the constant ones."""
        return list(self.manifest["features"])

    # Read once: every scoring call and request consults them. Callers read, never change, them.
    @cached_property
    def columns(self) -> list[str]:
        """The columns a scored row holds, in order: the features and the constant columns."""
        return list(self.manifest.get("columns", self.manifest["features"]))

    @cached_property
    def constants(self) -> dict[str, float]:
        """Columns that held one value in every training row, and that value (docs/bundle.md 2.2)."""
        return {name: float(value) for name, value in self.manifest.get("constants", {}).items()}

    @cached_property
    def _column_split(self) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float64]]:
        columns, constants = self.columns, self.constants
        model = np.asarray([j for j, name in enumerate(columns) if name not in constants], dtype=np.intp)
        fixed = np.asarray([columns.index(name) for name in constants], dtype=np.intp)
        return model, fixed, np.asarray(list(constants.values()), dtype=np.float64)

    def split_columns(self, x_raw: NDArray[np.floating]) -> tuple[NDArray[np.floating], NDArray[np.bool_]]:
        """Rows of `columns` (n, len(columns)) -> the networks' input (n, d) and, per row and constant
        column in `constants` order, whether the row's value differs from the training constant
        (n, len(constants)). Without constant columns the rows pass through uncopied."""
        x = np.asarray(x_raw)
        if x.ndim != 2 or x.shape[1] != len(self.columns):
            raise ValueError(
                f"rows of shape {x.shape}: the model takes (rows, {len(self.columns)}), the columns "
                f"{', '.join(self.columns)}"
            )
        if not self.constants:
            return x, np.zeros((x.shape[0], 0), dtype=bool)
        model, fixed, values = self._column_split
        return x[:, model], np.abs(x[:, fixed] - values) > CONSTANT_RTOL * np.abs(values)

    def sample_rows(self, n: int, seed: int = 0) -> NDArray[np.float64]:
        """n rows of `columns` with the training rows' mean and spread, features independent normal,
        constant columns at their value: warm-up and benchmark rows that every model accepts."""
        scaler = self.scaler
        features = (
            scaler.mean + np.random.default_rng(seed).standard_normal((n, scaler.mean.size)) * scaler.scale
        )
        rows = np.empty((n, len(self.columns)))
        model, fixed, values = self._column_split
        rows[:, model], rows[:, fixed] = features, values
        return rows

    @property
    def fill_values(self) -> NDArray[np.float64]:
        """Per column, the value that stands in for a missing one: the scaler's centre or the constant."""
        means = dict(zip(self.features, self.scaler.mean.tolist(), strict=True)) | self.constants
        return np.asarray([means[name] for name in self.columns], dtype=np.float64)

    @property
    def architecture(self) -> Architecture:
        return Architecture.from_dict(self.manifest["architecture"])

    @property
    def scaler(self) -> Scaler:
        s = self.manifest["scaler"]
        return Scaler(np.asarray(s["mean"], dtype=np.float64), np.asarray(s["scale"], dtype=np.float64))

    @property
    def sigma2(self) -> float:
        return float(self.manifest["noise"]["sigma2"])

    @property
    def sigma2_projected(self) -> float:
        return float(self.manifest["noise"]["sigma2_projected"])

    @property
    def relative_variance(self) -> tuple[float, ...] | None:
        """Each feature's noise variance over sigma2 (docs/bundle.md 2.4); None: sigma2 I."""
        w = self.manifest["noise"].get("relative_variance")
        return None if w is None else tuple(float(v) for v in w)

    @property
    def default_method(self) -> str:
        return str(self.manifest["default_method"])

    @property
    def default_fpr(self) -> float:
        return float(self.manifest["default_fpr"])

    @property
    def fprs(self) -> list[float]:
        return [float(f) for f in self.manifest["calibration"]["fprs"]]

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))

    @property
    def noise(self) -> dict[str, Any]:
        """The keyword arguments of app.model.onnx_export.export_graph that describe the noise."""
        return {
            "sigma2": self.sigma2,
            "sigma2_projected": self.sigma2_projected,
            "relative_variance": self.relative_variance,
        }

    def build_graph(self, method: str) -> bytes:
        """The ONNX graph of `method` as save_bundle writes it, from this bundle's contents."""
        return self.export_graph(method).model.SerializeToString()

    def export_graph(self, method: str) -> ExportedGraph:
        """The graph of `method` before serialisation, with the names of its computed constants."""
        from app.model.onnx_export import export_graph

        noise, scaler = self.noise, self.scaler
        return export_graph(
            self.architecture, self.weights, method, mean=scaler.mean, scale=scaler.scale, **noise
        )

    @property
    def graphs(self) -> dict[str, Path]:
        """The ONNX graph file of each method that has one, hash-checked; what it holds is checked
        by app.bundle.graphs."""
        return {method: self.path / file for method, file in self.manifest.get("onnx", {}).items()}

    @property
    def stored_thresholds(self) -> dict[str, dict[str, dict[str, float]]]:
        """{method: {"fpr_<rate>": {"fpr", "value"}}} as written at training; threshold() recomputes."""
        return dict(self.manifest.get("thresholds", {}))

    @property
    def calibration_summary(self) -> dict[str, Any]:
        """Rows per method, the calibrated rates and score quantiles (docs/bundle.md section 2.5)."""
        return dict(self.manifest["calibration"])

    @property
    def training(self) -> dict[str, Any]:
        """How the model was fitted (docs/bundle.md section 2.6); empty for a bundle saved directly."""
        return dict(self.manifest.get("training") or {})

    def threshold(self, method: str, fpr: float) -> Threshold:
        """The threshold of a calibrated rate under its stored name; of any other rate under a name
        that gives the same rate back when a client sends it (%g's six digits may not: the name of
        1/n rounded down would be refused as below 1/n)."""
        scores = self.calibration[method]
        name = cal.threshold_name(fpr) if fpr in self.fprs else f"fpr_{fpr!r}"
        return Threshold(name, method, fpr, cal.threshold(scores, fpr))

    def p_values(self, method: str, scores: NDArray[np.float64]) -> NDArray[np.float64]:
        return cal.p_values(self.calibration[method], scores)

    def build_model(self, device: str = "cpu") -> ManifoldModel:
        """Rebuild the networks from the stored architecture and load the weights (needs torch)."""
        import torch

        from app.model.manifold import ManifoldModel

        model = ManifoldModel(self.architecture)
        state = {
            k: torch.from_numpy(v.copy()) for k, v in self.weights.items() if not k.startswith("derived.")
        }
        model.load_state_dict(state, strict=True)
        model.sigma2, model.sigma2_projected = self.sigma2, self.sigma2_projected
        model.relative_variance = self.relative_variance
        return model.to(device).eval()


@dataclass(frozen=True)
class EnsembleBundle(Bundle):
    """A bundle of several members (docs/bundle.md 11). Each member is a Bundle of its own network,
    noise and graphs, whose `calibration` holds its reference values (of the validation rows) of each
    term its `combination` ranks; the ensemble's score of a row is the mean over members of the
    member's score of the row against those values (app.bundle.ensemble), and the ensemble's own
    `calibration` holds that score of the calibration rows, from which thresholds and p-values
    follow as for one model."""

    members: tuple[Bundle, ...] = field(default=(), repr=False)

    @property
    def combination(self) -> str:
        """How the members' scores are ranked and combined: app.bundle.ensemble.COMBINATIONS."""
        return str(self.manifest["ensemble"]["combination"])

    @property
    def architecture(self) -> Architecture:
        raise BundleError(f"{self.path}: an ensemble has one architecture per member (bundle.members)")

    @property
    def noise(self) -> dict[str, Any]:
        raise BundleError(f"{self.path}: an ensemble has one noise per member (bundle.members)")

    @property
    def graphs(self) -> dict[str, Path]:
        return {}

    def export_graph(self, method: str) -> ExportedGraph:
        raise BundleError(f"{self.path}: an ensemble's graphs are its members' (bundle.members)")

    def build_model(self, device: str = "cpu") -> ManifoldModel:
        raise BundleError(f"{self.path}: an ensemble's networks are its members' (bundle.members)")

    @property
    def member_summaries(self) -> list[dict[str, Any]]:
        """Per member: architecture, noise and hyper-parameters, as the manifest records them."""
        return [
            {k: entry[k] for k in ("architecture", "noise", "hyper_parameters") if k in entry}
            for entry in self.manifest["ensemble"]["members"]
        ]


def describe_networks(bundle: Bundle) -> tuple[str, str]:
    """One line on the bundle's networks and one on its noise, for people (info, report)."""
    members = members_of(bundle)
    archs = [m.architecture for m in members]
    sigma2 = [m.sigma2 for m in members]

    def values(of: list[Any]) -> str:
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(set(of)))

    text = (
        f"latent {values([x.latent_dim for x in archs])} ({values([x.geometry for x in archs])}), "
        f"{values([x.depth for x in archs])} x {values([x.hidden for x in archs])} "
        f"{values([x.activation for x in archs])}, prior {values([x.prior for x in archs])} with "
        f"{values([x.components for x in archs])} component(s)"
    )
    relative = [w for m in members if (w := m.relative_variance) is not None]
    per_feature = (
        f", one variance per feature: sigma2 times {min(map(min, relative)):.3g} to "
        f"{max(map(max, relative)):.3g}"
        if relative
        else ""
    )
    if not isinstance(bundle, EnsembleBundle):
        return text, f"sigma2 {sigma2[0]:.4g}, projected {bundle.sigma2_projected:.4g}{per_feature}"
    hp = [m.training.get("hyper_parameters", {}) for m in members]
    text = (
        f"ensemble of {len(members)} members, scored by {bundle.combination}: {text}; beta "
        f"{values([h.get('beta') for h in hp])}, kernel width {values([h.get('kernel_width') for h in hp])}"
    )
    return text, f"sigma2 from {min(sigma2):.4g} to {max(sigma2):.4g} over the members{per_feature}"


def members_of(bundle: Bundle) -> tuple[Bundle, ...]:
    """The bundles whose scores a bundle combines: an ensemble's members, or the bundle itself."""
    return bundle.members if isinstance(bundle, EnsembleBundle) else (bundle,)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Facts about the run rather than the model: equal data, options and seed must give an equal version.
UNHASHED = ("version", "created", "build")


def content_version(manifest: dict[str, Any]) -> str:
    """Hash of the whole manifest but UNHASHED: equal content, equal version."""
    content = {k: v for k, v in manifest.items() if k not in UNHASHED}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("anomaly-scores", "torch", "numpy", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _derived_prior_tensors(model: ManifoldModel) -> dict[str, NDArray[np.float64]]:
    """The prior in closed form, so scoring can be re-implemented without running the encoder on
    pseudo-inputs: component locations (K, k) and scales (K, k) or concentrations (K,). Computed
    in float64 from the float32 parameters, as the float64 scoring path computes them."""
    import torch

    from app.model.distributions import GaussianMixture, VonMisesFisherMixture

    with torch.no_grad():
        prior = model.with_dtype(torch.float64).prior_distribution()
    if isinstance(prior, GaussianMixture):
        tensors = {"derived.prior.locations": prior.means, "derived.prior.scales": prior.scales}
    elif isinstance(prior, VonMisesFisherMixture):
        tensors = {"derived.prior.locations": prior.directions, "derived.prior.kappa": prior.kappa}
    else:
        tensors = {}
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def _noise(model: ManifoldModel) -> dict[str, Any]:
    sigma2 = float(model.sigma2)
    noise: dict[str, Any] = {"sigma2": sigma2, "sigma2_projected": float(model.sigma2_projected or sigma2)}
    if model.relative_variance is not None:
        noise["relative_variance"] = [float(w) for w in model.relative_variance]
    return noise


def _noise_schema(models: Iterable[ManifoldModel], otherwise: int) -> int:
    """NOISE_SCHEMA where a network's noise has relative variances, the version `otherwise`."""
    return NOISE_SCHEMA if any(m.relative_variance is not None for m in models) else otherwise


def _write_onnx(
    out: Path,
    model: ManifoldModel,
    scaler: Scaler,
    derived: dict[str, NDArray[np.float64]],
    index: int | None = None,
) -> dict[str, str]:
    """One fused scoring graph per exportable method (app.model.onnx_export), built from the weights;
    `index`: of ensemble member `index`."""
    from app.model.onnx_export import export_graph

    weights = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()} | derived
    noise = _noise(model)
    files = {}
    for method in METHODS:
        name = (
            ONNX_FILE.format(method=method)
            if index is None
            else MEMBER_ONNX_FILE.format(method=method, index=index)
        )
        exported = export_graph(model.arch, weights, method, mean=scaler.mean, scale=scaler.scale, **noise)
        (out / name).write_bytes(exported.model.SerializeToString())
        files[method] = name
    return files


def save_bundle(
    out_dir: str | Path,
    *,
    model: ManifoldModel,
    name: str,
    features: list[str],
    scaler: Scaler,
    calibration_scores: dict[str, NDArray[np.float64]],
    columns: list[str] | None = None,
    constants: dict[str, float] | None = None,
    fprs: tuple[float, ...] = cal.DEFAULT_FPRS,
    default_method: str = "likelihood",
    default_fpr: float = 0.01,
    training: dict[str, Any] | None = None,
    leaderboard_csv: str | None = None,
    build: dict[str, Any] | None = None,
) -> Bundle:
    """Write a bundle directory and return it as loaded back from disk.

    columns: the scored rows' columns in order (default: the features); constants: those of them
    kept out of the networks, with their training value."""
    if model.arch.input_dim != len(features):
        raise BundleError(f"{len(features)} feature names for d = {model.arch.input_dim}")
    columns, constants = _checked_common(
        features, scaler, columns, constants, calibration_scores, default_method, default_fpr, fprs
    )

    def write(out: Path) -> None:
        state, derived = _model_tensors(model)
        onnx_files = _write_onnx(out, model, scaler, derived)
        _write_manifest_and_files(
            out,
            schema=_noise_schema([model], SCHEMA_VERSION if constants else 2),
            networks={"architecture": model.arch.to_dict(), "noise": _noise(model), "onnx": onnx_files},
            tensor_files={WEIGHTS: state | derived},
            graph_files=list(onnx_files.values()),
            name=name,
            features=features,
            scaler=scaler,
            calibration_scores=calibration_scores,
            columns=columns,
            constants=constants,
            fprs=fprs,
            default_method=default_method,
            default_fpr=default_fpr,
            training=training,
            leaderboard_csv=leaderboard_csv,
            build=build,
        )

    return _staged(out_dir, write)


def _checked_common(
    features: list[str],
    scaler: Scaler,
    columns: list[str] | None,
    constants: dict[str, float] | None,
    calibration_scores: dict[str, NDArray[np.float64]],
    default_method: str,
    default_fpr: float,
    fprs: tuple[float, ...],
) -> tuple[list[str], dict[str, float]]:
    """What every bundle's manifest holds beside its networks, checked before anything is written;
    the columns (default: the features) and the constants."""
    columns, constants = list(columns or features), dict(constants or {})
    problem = _column_problem(columns, features, constants)
    if problem:
        raise BundleError(problem)
    if scaler.mean.shape != (len(features),):
        raise BundleError(f"a scaler of {scaler.mean.shape} for {len(features)} features")
    if default_method not in calibration_scores:
        raise BundleError(f"no calibration scores for the default method {default_method!r}")
    if default_fpr not in fprs:
        raise BundleError(f"default false-positive rate {default_fpr} is not among the calibrated {fprs}")
    return columns, constants


def _model_tensors(
    model: ManifoldModel,
) -> tuple[dict[str, NDArray[np.float32]], dict[str, NDArray[np.float64]]]:
    """A network's float32 tensors as weight_shapes names them, and its derived prior tensors."""
    state = {k: v.detach().cpu().float().contiguous().numpy() for k, v in model.state_dict().items()}
    return state, _derived_prior_tensors(model)


def _staged(out_dir: str | Path, write: Callable[[Path], None]) -> Bundle:
    """Run `write` on a fresh directory beside `out_dir`, load it back, and move it into place.

    An interrupted or failed save never leaves a half-written bundle where one is expected (a
    rename within one directory is atomic), and what is moved into place has been read back and
    verified."""
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    try:
        write(out)
        load_bundle(out)
        move_into_place(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return load_bundle(final)


def save_ensemble(
    out_dir: str | Path,
    *,
    models: Sequence[ManifoldModel],
    references: Sequence[dict[str, NDArray[np.float64]]],
    hyper_parameters: Sequence[dict[str, Any]],
    name: str,
    combination: str = FISHER_TAIL,
    features: list[str],
    scaler: Scaler,
    calibration_scores: dict[str, NDArray[np.float64]],
    columns: list[str] | None = None,
    constants: dict[str, float] | None = None,
    fprs: tuple[float, ...] = cal.DEFAULT_FPRS,
    default_method: str = "likelihood",
    default_fpr: float = 0.01,
    training: dict[str, Any] | None = None,
    leaderboard_csv: str | None = None,
    build: dict[str, Any] | None = None,
) -> EnsembleBundle:
    """Write an ensemble bundle (docs/bundle.md 11) and return it as loaded back from disk.

    models[i] is member i, references[i] its values (higher = more anomalous) of held-out rows of
    every term `combination` ranks (app.bundle.ensemble.terms of each method), the scale its new
    scores are ranked on; calibration_scores are the ensemble's scores (its members' mean) of other
    held-out rows, from which thresholds and p-values follow."""
    if not models or not (len(models) == len(references) == len(hyper_parameters)):
        raise BundleError(
            f"{len(models)} members, {len(references)} reference sets and {len(hyper_parameters)} "
            "hyper-parameter sets: an ensemble needs one of each per member, and a member"
        )
    columns, constants = _checked_common(
        features, scaler, columns, constants, calibration_scores, default_method, default_fpr, fprs
    )
    try:
        keys = every_term(combination)
    except ValueError as e:
        raise BundleError(str(e)) from e
    for i, (model, member) in enumerate(zip(models, references, strict=True)):
        if model.arch.input_dim != len(features):
            raise BundleError(
                f"member {i} takes {model.arch.input_dim} features, not the ensemble's {len(features)}"
            )
        missing = [key for key in keys if key not in member]
        if missing:
            raise BundleError(f"member {i} has no reference values of {missing}")

    def write(out: Path) -> None:
        tensors: dict[str, NDArray[np.floating]] = {}
        graph_files: list[str] = []
        entries = []
        for i, model in enumerate(models):
            state, derived = _model_tensors(model)
            tensors |= {MEMBER_PREFIX.format(index=i) + k: v for k, v in (state | derived).items()}
            own = _write_onnx(out, model, scaler, derived, index=i)
            graph_files += own.values()
            entries.append(
                {
                    "architecture": model.arch.to_dict(),
                    "noise": _noise(model),
                    "hyper_parameters": dict(hyper_parameters[i]),
                    "onnx": own,
                }
            )
        refs = {
            f"{key}.{i}": np.sort(np.asarray(member[key], dtype=np.float64))
            for i, member in enumerate(references)
            for key in keys
        }
        for key, scores in refs.items():
            if scores.size == 0 or not np.isfinite(scores).all():
                raise BundleError(f"reference scores {key} are empty or not all finite")
        _write_manifest_and_files(
            out,
            schema=_noise_schema(models, ENSEMBLE_SCHEMA),
            networks={"ensemble": {"combination": combination, "members": entries}},
            tensor_files={WEIGHTS: tensors, REFERENCES: refs},
            graph_files=graph_files,
            name=name,
            features=features,
            scaler=scaler,
            calibration_scores=calibration_scores,
            columns=columns,
            constants=constants,
            fprs=fprs,
            default_method=default_method,
            default_fpr=default_fpr,
            training=training,
            leaderboard_csv=leaderboard_csv,
            build=build,
        )

    bundle = _staged(out_dir, write)
    assert isinstance(bundle, EnsembleBundle)
    return bundle


def move_into_place(staged: Path, final: Path) -> None:
    """`staged` becomes `final`; a bundle already there is replaced (the caller decided it may be),
    an empty directory too, but nothing else: a user's directory of other files is never deleted."""
    if final.exists() and not (final.is_dir() and ((final / MANIFEST).is_file() or not any(final.iterdir()))):
        raise BundleError(f"{final} exists and is not a bundle; it is left as it is")
    if final.exists():
        old = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)


def _write_manifest_and_files(
    out: Path,
    *,
    schema: int,
    networks: dict[str, Any],
    tensor_files: dict[str, dict[str, NDArray[np.floating]]],
    graph_files: list[str],
    name: str,
    features: list[str],
    scaler: Scaler,
    calibration_scores: dict[str, NDArray[np.float64]],
    columns: list[str],
    constants: dict[str, float],
    fprs: tuple[float, ...],
    default_method: str,
    default_fpr: float,
    training: dict[str, Any] | None,
    leaderboard_csv: str | None,
    build: dict[str, Any] | None,
) -> None:
    """Every bundle's files and manifest, around its networks: `networks` are the manifest's entries
    that describe them (architecture, noise and graphs, or an ensemble's members), `tensor_files`
    their safetensors files, `graph_files` their graphs, already written."""
    sorted_scores = _sorted_calibration(calibration_scores, fprs)
    for file, tensors in (tensor_files | {CALIBRATION: sorted_scores}).items():
        save_file(tensors, out / file)
        (out / file).chmod(0o644)  # safetensors writes 0600; a service user must read them
    files = [*tensor_files, CALIBRATION, *graph_files]
    if leaderboard_csv is not None:
        (out / LEADERBOARD).write_text(leaderboard_csv)
        files.append(LEADERBOARD)
    manifest: dict[str, Any] = {
        "schema_version": schema,
        "name": name,
        "version": "",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "features": list(features),
        **({"columns": columns, "constants": constants} if constants else {}),
        "scaler": scaler.to_dict(),
        **networks,
        "default_method": default_method,
        "default_fpr": default_fpr,
        **_calibration_entries(sorted_scores, fprs),
        "training": training or {},
        "build": (build or {}) | {"libraries": library_versions()},
        "files": _file_entries(out, files),
    }
    manifest["version"] = content_version(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")


def _sorted_calibration(
    calibration_scores: dict[str, NDArray[np.float64]], fprs: tuple[float, ...]
) -> dict[str, NDArray[np.float64]]:
    sorted_scores = {m: np.sort(np.asarray(s, dtype=np.float64)) for m, s in calibration_scores.items()}
    for method, scores in sorted_scores.items():
        if not np.isfinite(scores).all():
            raise BundleError(f"calibration scores of {method!r} are not all finite")
        for fpr in fprs:
            cal.check_fpr(fpr, scores.size)
    return sorted_scores


def _calibration_entries(
    sorted_scores: dict[str, NDArray[np.float64]], fprs: tuple[float, ...]
) -> dict[str, Any]:
    """The manifest's thresholds and calibration summary (docs/bundle.md 2.4, 2.5)."""
    return {
        "thresholds": {
            method: {cal.threshold_name(f): {"fpr": f, "value": cal.threshold(scores, f)} for f in fprs}
            for method, scores in sorted_scores.items()
        },
        "calibration": {
            "rows": {m: int(s.size) for m, s in sorted_scores.items()},
            "fprs": list(fprs),
            "quantiles": {
                m: {str(q): float(np.quantile(s, q)) for q in (0.5, 0.9, 0.99, 0.999)}
                for m, s in sorted_scores.items()
            },
        },
    }


def _file_entries(out: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    return {f: {"sha256": _sha256(out / f), "bytes": (out / f).stat().st_size} for f in files}


_REQUIRED = (
    "schema_version",
    "name",
    "version",
    "features",
    "scaler",
    "architecture",
    "noise",
    "default_method",
    "default_fpr",
    "calibration",
    "files",
)


def _read_manifest(root: Path) -> dict[str, Any]:
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: no such directory" if not root.exists() else f"{root} is not a directory")
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    if manifest.get("schema_version") not in READABLE_VERSIONS:
        why = (
            ": its encoder and projected calibration scores were computed by the schema-1 formulas, "
            "which this build no longer scores with (docs/bundle.md); retrain it with this build"
            if manifest.get("schema_version") == 1
            else ""
        )
        raise BundleError(
            f"{root}: bundle schema version {manifest.get('schema_version')!r}, "
            f"this build reads versions {', '.join(map(str, READABLE_VERSIONS))}{why}"
        )
    schema = manifest["schema_version"]
    required = (
        (*(k for k in _REQUIRED if k not in ("architecture", "noise")), "ensemble")
        if is_ensemble(manifest)
        else _REQUIRED + (("columns", "constants") if schema == 3 or _has_columns(manifest, schema) else ())
    )
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks {', '.join(missing)}")
    if manifest["schema_version"] == 2 and ("columns" in manifest or "constants" in manifest):
        raise BundleError(f"{manifest_path}: columns and constants need schema version 3")
    if content_version(manifest) != manifest["version"]:
        raise BundleError(f"{root}: the manifest was edited after the bundle was written (version mismatch)")
    return manifest


def _has_columns(manifest: dict[str, Any], schema: int) -> bool:
    """Version 5 may have constant columns; where it names either part, it must name both."""
    return schema == NOISE_SCHEMA and ("columns" in manifest or "constants" in manifest)


def _column_problem(columns: Any, features: Any, constants: Any) -> str | None:
    """What is wrong with a bundle's columns, features and constants, if anything: the columns are
    distinct names, the constants name some of them with finite numbers, the features are the rest
    in order, and at least one column is left for the networks."""
    if not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        return "columns must be a list of names"
    if not isinstance(constants, dict):
        return "constants must map column names to their values"
    not_numbers = [
        name
        for name, value in constants.items()
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value)
    ]
    checks = (
        (len(set(columns)) != len(columns), f"columns {columns} name a column twice"),
        (not set(constants) <= set(columns), f"constants {sorted(constants)} must be among the columns"),
        (bool(not_numbers), f"constant column(s) {not_numbers} must have finite numbers as values"),
        (
            features != [c for c in columns if c not in constants],
            f"features {features} must be the columns without the constant ones, in order",
        ),
        (not features, "every column is constant: nothing is left to model"),
    )
    return next((message for failed, message in checks if failed), None)


def _verify_files(root: Path, files: dict[str, dict[str, Any]], required: tuple[str, ...]) -> None:
    for required_file in required:
        if required_file not in files:
            raise BundleError(f"{root / MANIFEST}: files lacks {required_file}")
    for name, expected in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{root / MANIFEST}: file name {name!r} must name a file inside the bundle")
        file = root / name
        if not file.is_file():
            raise BundleError(f"{root}: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise BundleError(
                f"{root}: {name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)"
            )
        if _sha256(file) != expected["sha256"]:
            raise BundleError(
                f"{root}: {name} does not match its SHA-256 in the manifest (corrupt or replaced)"
            )


def _verify_weights(root: Path, arch: Architecture, weights: dict[str, NDArray[np.float32]]) -> None:
    expected_shapes = weight_shapes(arch)
    for tensor, shape in expected_shapes.items():
        if tensor not in weights:
            raise BundleError(f"{root}: {WEIGHTS} lacks tensor {tensor}")
        if weights[tensor].shape != shape:
            raise BundleError(
                f"{root}: tensor {tensor} has shape {weights[tensor].shape}, the architecture needs {shape}"
            )
    extra = [t for t in weights if t not in expected_shapes and not t.startswith("derived.")]
    if extra:
        raise BundleError(f"{root}: {WEIGHTS} holds tensors the architecture does not use: {extra}")


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle directory; any inconsistency is a BundleError saying what and where."""
    root = Path(path)
    try:
        return _load(root)
    except BundleError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        # A manifest of the right schema but malformed inside (an entry missing or of the wrong type,
        # a NaN that JSON cannot hash, nesting deeper than the parser's recursion).
        raise BundleError(f"{root}: malformed {MANIFEST}: {type(e).__name__}: {e}") from e


def _read_tensors(root: Path, name: str) -> dict[str, NDArray[np.floating]]:
    try:
        return load_file(root / name)
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{root}: cannot read tensors: {e}") from e


def _verify_scores(
    root: Path, scores_of: dict[str, NDArray[np.float64]], file: str, kind: str, keys: Sequence[str] = METHODS
) -> None:
    """The `kind` scores of every method (or of `keys`) present, finite and ascending."""
    for key in keys:
        scores = scores_of.get(key)
        if scores is None or scores.ndim != 1 or scores.size == 0:
            raise BundleError(f"{root}: {file} lacks the {kind} scores of {key!r}")
        if not (np.isfinite(scores).all() and np.all(np.diff(scores) >= 0)):
            raise BundleError(f"{root}: {kind} scores of {key!r} must be finite and ascending")


def _positive(value: Any) -> bool:
    """A JSON number (not a boolean) that is positive and finite."""
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 < value < float("inf")


def _verify_network(root: Path, entry: dict[str, Any], files: dict[str, Any], schema: int) -> Architecture:
    """A network's architecture, noise and graph files, as a manifest (or an ensemble member's entry)
    of version `schema` records them; `files` are the bundle's verified files."""
    for method, file in entry.get("onnx", {}).items():
        if method not in METHODS or file not in files:
            raise BundleError(f"{root}: the ONNX graph of {method!r} ({file}) is not a verified bundle file")
    try:
        arch = Architecture.from_dict(entry["architecture"])
    except (TypeError, ValueError) as e:
        raise BundleError(f"{root}: invalid architecture: {e}") from e
    noise = entry["noise"]
    for key in ("sigma2", "sigma2_projected"):
        if not _positive(noise[key]):
            raise BundleError(f"{root}: noise.{key} must be a positive number, got {noise[key]!r}")
    if "relative_variance" in noise:
        w, d = noise["relative_variance"], arch.input_dim
        if schema != NOISE_SCHEMA:
            raise BundleError(f"{root}: noise.relative_variance needs schema version {NOISE_SCHEMA}")
        if not (isinstance(w, list) and len(w) == d and all(_positive(v) for v in w)):
            raise BundleError(
                f"{root}: noise.relative_variance must list {d} positive numbers, one per feature"
            )
    return arch


def is_ensemble(manifest: dict[str, Any]) -> bool:
    """Whether a manifest of a readable version is an ensemble's (docs/bundle.md 11)."""
    schema = manifest["schema_version"]
    return schema == ENSEMBLE_SCHEMA or (schema == NOISE_SCHEMA and "ensemble" in manifest)


def _load(root: Path) -> Bundle:
    manifest = _read_manifest(root)
    ensemble = is_ensemble(manifest)
    _verify_files(
        root, manifest["files"], (WEIGHTS, REFERENCES, CALIBRATION) if ensemble else (WEIGHTS, CALIBRATION)
    )
    weights = _read_tensors(root, WEIGHTS)
    calibration = _read_tensors(root, CALIBRATION)
    _verify_scores(root, calibration, CALIBRATION, "calibration")
    if ensemble:
        members = _load_members(root, manifest, weights)
        d = members[0].architecture.input_dim
    else:
        arch = _verify_network(root, manifest, manifest["files"], manifest["schema_version"])
        _verify_weights(root, arch, weights)
        d = arch.input_dim
    scaler = manifest["scaler"]
    if len(manifest["features"]) != d or len(scaler["mean"]) != d or len(scaler["scale"]) != d:
        raise BundleError(f"{root}: features and scaler must have {d} entries, the architecture's input size")
    problem = _column_problem(
        manifest.get("columns", manifest["features"]), manifest["features"], manifest.get("constants", {})
    )
    if problem:
        raise BundleError(f"{root}: {problem}")
    if manifest["default_method"] not in calibration:
        raise BundleError(
            f"{root}: no calibration scores for the default method {manifest['default_method']!r}"
        )
    if ensemble:
        return EnsembleBundle(root, manifest, weights, calibration, members)
    return Bundle(root, manifest, weights, calibration)


# What a member's own manifest shares with the ensemble's: everything but its network.
MEMBER_SHARED = ("schema_version", "name", "version", "created", "features", "columns", "constants", "scaler")


def _load_members(
    root: Path, manifest: dict[str, Any], weights: dict[str, NDArray[np.floating]]
) -> tuple[Bundle, ...]:
    """The members of an ensemble: each a Bundle of its network (its tensors, prefix stripped), its
    noise and graphs, with its reference values as its calibration."""
    entries = manifest["ensemble"]["members"]
    combination = manifest["ensemble"]["combination"]
    try:
        keys = every_term(combination)
    except ValueError as e:
        raise BundleError(f"{root}: {e}") from e
    if not isinstance(entries, list) or not entries:
        raise BundleError(f"{root}: an ensemble needs a non-empty list of members")
    if len({tuple(sorted(entry.get("onnx", {}))) for entry in entries}) > 1:
        raise BundleError(f"{root}: the members must have graphs of the same methods")
    references = _read_tensors(root, REFERENCES)
    prefixes = [MEMBER_PREFIX.format(index=i) for i in range(len(entries))]
    stray = [k for k in weights if not any(k.startswith(p) for p in prefixes)]
    if stray:
        raise BundleError(f"{root}: {WEIGHTS} holds tensors of no member: {stray[:5]}")
    expected_refs = {f"{key}.{i}" for i in range(len(entries)) for key in keys}
    if set(references) != expected_refs:
        extra, missing = sorted(set(references) - expected_refs), sorted(expected_refs - set(references))
        raise BundleError(
            f"{root}: {REFERENCES} must hold {len(expected_refs)} score sets (every term {combination!r} "
            f"ranks of every method of every member); missing {missing[:5]}, extra {extra[:5]}"
        )
    members = []
    for i, entry in enumerate(entries):
        arch = _verify_network(root, entry, manifest["files"], manifest["schema_version"])
        own_files = {m: MEMBER_ONNX_FILE.format(method=m, index=i) for m in entry.get("onnx", {})}
        if entry.get("onnx", {}) != own_files or not isinstance(entry.get("hyper_parameters", {}), dict):
            raise BundleError(
                f"{root}: member {i}'s graphs must be its own files {sorted(own_files.values())} and its "
                "hyper_parameters an object"
            )
        own = {k[len(prefixes[i]) :]: v for k, v in weights.items() if k.startswith(prefixes[i])}
        _verify_weights(root, arch, own)
        refs = {key: references[f"{key}.{i}"] for key in keys}
        _verify_scores(root, refs, REFERENCES, f"member {i}'s reference", keys)
        member_manifest = {k: manifest[k] for k in MEMBER_SHARED if k in manifest} | {
            "architecture": entry["architecture"],
            "noise": entry["noise"],
            "onnx": entry.get("onnx", {}),
            "default_method": manifest["default_method"],
            "default_fpr": manifest["default_fpr"],
            "calibration": {"fprs": manifest["calibration"]["fprs"]},
            "training": {"hyper_parameters": entry.get("hyper_parameters", {})},
            "member": i,
        }
        members.append(Bundle(root, member_manifest, own, refs))
    if len({m.architecture.input_dim for m in members}) != 1:
        raise BundleError(f"{root}: the members take different numbers of features")
    return tuple(members)
