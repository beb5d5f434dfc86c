"""Shared fixtures: a small synthetic table with a known manifold, a tiny trained bundle (and one
trained with constant columns), a helper that writes a bundle straight from a model (trained or not)
with save_bundle, and one that replaces a bundle's file as whoever can write the bundle can."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from app.bundle.format import MANIFEST, Bundle, EnsembleBundle, content_version, save_bundle, save_ensemble
from app.bundle.scaler import Scaler
from app.model.manifold import ManifoldModel
from app.model.methods import METHODS
from app.train.fit import score_rows
from app.train.options import Candidate, FitOptions
from app.train.pipeline import TrainRequest, TrainResult, train_bundle

FEATURES = [f"f{i}" for i in range(6)]


def manifold_rows(n: int, seed: int) -> np.ndarray:
    """Rows near a curved 2-D manifold in R^6, in raw (unstandardised) units."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2))
    x = np.c_[z[:, 0], z[:, 1], z[:, 0] * z[:, 1], np.sin(z[:, 0]), z[:, 1] ** 2, z[:, 0] - z[:, 1]]
    return 10 + 3 * x + 0.05 * rng.standard_normal((n, 6))


def off_manifold_rows(n: int, seed: int) -> np.ndarray:
    """Points among the normal rows' range, pushed off the manifold in a random direction."""
    rng = np.random.default_rng(seed)
    base = manifold_rows(n, seed + 1)
    direction = rng.standard_normal((n, 6))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return base + 3.0 * direction


# The paper's datasets, beside the repository as CI places them (../shared), wherever it is cloned.
LODA = Path(__file__).resolve().parents[2] / "shared" / "data" / "loda"


@pytest.fixture(scope="session")
def loda() -> Path:
    if not LODA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI runs with ../shared beside the repository, but {LODA} is missing")
        pytest.skip(f"the paper's datasets are not at {LODA}")
    return LODA


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    request = TrainRequest(
        candidates=[Candidate(latent_dim=2, hidden=16, components=2, beta=b) for b in (0.1, 1.0)],
        fit=FitOptions(steps=300, batch_size=64),
        name="tiny",
    )
    train_bundle(manifold_rows(600, seed=0), FEATURES, request, out)
    return out


@pytest.fixture(scope="session")
def ensemble_result(tmp_path_factory):
    """An ensemble of three small members, one with a different latent size, trained as `train` trains
    its default: every candidate a member (two rows off a constant column exercise both together)."""
    out = tmp_path_factory.mktemp("ensemble") / "bundle"
    request = TrainRequest(
        candidates=[
            Candidate(latent_dim=latent, hidden=16, components=2, beta=beta)
            for latent, beta in ((2, 0.1), (2, 1.0), (3, 1.0))
        ],
        fit=FitOptions(steps=150, batch_size=64),
        fprs=(0.1, 0.01),
        default_fpr=0.1,
        name="ensemble",
        ensemble=True,
    )
    return train_bundle(with_constants(manifold_rows(600, seed=4)), CONSTANT_COLUMNS, request, out)


# "site" sits between features and is not exactly representable in float32; "zero" is the edge case
# of the relative tolerance: any value but 0 differs from it.
SITE, ZERO = 0.1, 0.0
CONSTANT_COLUMNS = [FEATURES[0], "site", *FEATURES[1:], "zero"]


def with_constants(features: np.ndarray, site: float = SITE, zero: float = ZERO) -> np.ndarray:
    """Rows of CONSTANT_COLUMNS from rows of FEATURES."""
    n = features.shape[0]
    return np.c_[features[:, :1], np.full(n, site), features[:, 1:], np.full(n, zero)]


@pytest.fixture(scope="session")
def constant_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("constants") / "bundle"
    request = TrainRequest(
        candidates=[Candidate(latent_dim=2, hidden=16, components=2)],
        fit=FitOptions(steps=150, batch_size=64),
        fprs=(0.1,),
        default_fpr=0.1,
        name="constants",
    )
    result = train_bundle(with_constants(manifold_rows(400, seed=3)), CONSTANT_COLUMNS, request, out)
    return result


def bundle_from(model: ManifoldModel, out: Path, x: np.ndarray, **options) -> Bundle:
    """A bundle of `model` as save_bundle writes it, calibrated on the raw rows x: the format does
    not care how the weights were found, so format tests need no training."""
    scaler = Scaler.fit(x)
    calibration = {m: -score_rows(model, scaler.transform(x), m)["log_prob"] for m in METHODS}
    features = [f"f{i}" for i in range(x.shape[1])]
    defaults = {"name": out.name, "fprs": (0.1,), "default_fpr": 0.1}
    return save_bundle(
        out,
        model=model,
        features=features,
        scaler=scaler,
        calibration_scores=calibration,
        **defaults | options,
    )


def first_combination(
    result: TrainResult,
    out: Path,
    calibration: dict[str, np.ndarray],
    combination: str = "rank_mean",
    **options,
) -> EnsembleBundle:
    """A trained ensemble's members as earlier bundles combined them (the first ones "rank_mean",
    those of sessions 11 to 17 "factor_fisher"), with `calibration` (its scores of calibration rows
    per method)."""
    bundle, reports = result.bundle, result.reports
    return save_ensemble(
        out,
        models=[r.fitted.model for r in reports],
        references=[r.val_scores for r in reports],
        hyper_parameters=[r.fitted.candidate.to_dict() for r in reports],
        name="first",
        combination=combination,
        features=bundle.features,
        scaler=bundle.scaler,
        calibration_scores=calibration,
        columns=bundle.columns,
        constants=bundle.constants,
        **options,
    )


def rewrite_manifest(root: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit a bundle's manifest in place and make its version vouch for the edit, as whoever can
    write the bundle can: the loader's other checks must catch what is wrong."""
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    manifest["version"] = content_version(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def replace_bundle_file(root: Path, name: str, data: bytes) -> None:
    """Replace a bundle's file and make its manifest vouch for it: hash, size and version recomputed."""
    (root / name).write_bytes(data)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["version"] = content_version(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))
