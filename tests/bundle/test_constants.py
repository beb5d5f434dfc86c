"""Columns constant in training (issue 17): kept out of the networks, recorded in the bundle, and a
scored row that differs there flagged with the column named, by every backend."""

import json
import shutil

import numpy as np
import pytest

from app.bundle.format import CONSTANT_RTOL, MANIFEST, NOISE_SCHEMA, BundleError, load_bundle
from app.engine.onnx_backend import OnnxScorer
from app.engine.torch_backend import TorchScorer
from app.model.methods import METHODS
from app.train.fit import score_rows
from app.train.options import Candidate, FitOptions
from app.train.pipeline import TrainRequest, train_bundle

from ..conftest import CONSTANT_COLUMNS, FEATURES, SITE, ZERO, manifold_rows, rewrite_manifest, with_constants
from ..tolerances import float32_rtol


def test_training_keeps_constant_columns_out_of_the_networks_and_records_them(constant_bundle):
    bundle = constant_bundle.bundle
    assert bundle.columns == CONSTANT_COLUMNS and bundle.features == FEATURES
    assert bundle.constants == {"site": SITE, "zero": ZERO}
    assert bundle.architecture.input_dim == len(FEATURES) and bundle.scaler.mean.shape == (len(FEATURES),)
    assert bundle.manifest["schema_version"] == NOISE_SCHEMA  # constants, and one variance per feature
    assert any("'site' (= 0.1), 'zero' (= 0)" in note for note in constant_bundle.notes)
    assert bundle.training["notes"] == constant_bundle.notes
    # Missing values are filled with the scaler's centre of a feature and the value of a constant.
    fill = dict(zip(CONSTANT_COLUMNS, bundle.fill_values, strict=True))
    assert fill["site"] == SITE and fill["zero"] == ZERO
    np.testing.assert_array_equal([fill[f] for f in FEATURES], bundle.scaler.mean)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_rows_at_the_constants_score_as_their_features_alone(constant_bundle, backend):
    bundle = constant_bundle.bundle
    scorer = OnnxScorer(bundle) if backend == "onnx" else TorchScorer(bundle)
    features = manifold_rows(40, seed=8)
    model = bundle.build_model()
    for method in ("likelihood", "latent"):
        out = scorer.score(with_constants(features), method)
        # The reference: the networks on the feature columns, without any column handling.
        reference = score_rows(model, bundle.scaler.transform(features), method)["log_prob"]
        np.testing.assert_allclose(out.log_likelihood, reference, rtol=float32_rtol(bundle.architecture))
        assert out.constant_mismatch.shape == (40, 2) and not out.constant_mismatch.any()
        np.testing.assert_array_equal(out.p_value, bundle.p_values(method, out.score))


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_a_row_that_differs_from_a_constant_is_flagged_with_p_value_0(constant_bundle, backend):
    bundle = constant_bundle.bundle
    scorer = OnnxScorer(bundle) if backend == "onnx" else TorchScorer(bundle)
    features = manifold_rows(5, seed=9)
    rows = with_constants(features)
    rows[0, 1] = np.float32(SITE)  # float32 transport of the constant: within CONSTANT_RTOL
    rows[1, 1] = SITE * (1 + 2 * CONSTANT_RTOL)
    rows[2, -1] = 1e-300  # off a constant 0, however little
    rows[3, 1], rows[3, -1] = -SITE, 5.0
    out = scorer.score(rows)
    expected = [[False, False], [True, False], [False, True], [True, True], [False, False]]
    np.testing.assert_array_equal(out.constant_mismatch, expected)
    flagged = np.array([False, True, True, True, False])
    assert out.is_anomaly[flagged].all() and (out.p_value[flagged] == 0).all()
    # The score is that of the features: the differing value enters only the flag and the p-value.
    at_constants = scorer.score(with_constants(features))
    np.testing.assert_array_equal(out.score, at_constants.score)
    np.testing.assert_array_equal(out.p_value[~flagged], at_constants.p_value[~flagged])
    assert out.columns(list(bundle.constants))["constant_mismatch"].tolist() == [
        "",
        "site",
        "zero",
        "site;zero",
        "",
    ]


def test_rows_of_the_wrong_width_are_refused_naming_the_columns(constant_bundle):
    bundle = constant_bundle.bundle
    with pytest.raises(ValueError, match=r"the model takes \(rows, 8\), the columns f0, site, f1"):
        bundle.split_columns(np.zeros((3, 9)))
    with pytest.raises(ValueError, match="rows of shape"):
        bundle.split_columns(np.zeros(8))


def test_every_method_flags_alike(constant_bundle):
    bundle = constant_bundle.bundle
    scorer = OnnxScorer(bundle)
    rows = with_constants(manifold_rows(3, seed=10), site=0.2)
    for method in METHODS:
        out = scorer.score(rows, method)
        assert out.constant_mismatch[:, 0].all() and out.is_anomaly.all() and (out.p_value == 0).all()


@pytest.mark.parametrize(
    ("noise", "constants", "schema"),
    [("isotropic", False, 2), ("isotropic", True, 3), ("diagonal", False, 5), ("diagonal", True, 5)],
)
def test_a_bundle_is_written_with_the_lowest_schema_that_describes_it(tmp_path, noise, constants, schema):
    """A reader of an older version still reads every bundle it scores correctly, and refuses the rest."""
    rows, columns = manifold_rows(200, seed=1), FEATURES
    if constants:
        rows, columns = with_constants(rows), CONSTANT_COLUMNS
    request = TrainRequest(
        [Candidate(latent_dim=2, hidden=8, components=2)], FitOptions(steps=20, noise=noise)
    )
    train_bundle(rows, columns, request, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["schema_version"] == schema
    assert ("relative_variance" in manifest["noise"]) == (noise == "diagonal")
    assert ("constants" in manifest) == constants and ("columns" in manifest) == constants
    bundle = load_bundle(tmp_path)
    assert (bundle.relative_variance is None) == (noise == "isotropic")
    if not constants:
        assert bundle.columns == bundle.features and bundle.constants == {}
        x = manifold_rows(4, seed=1)
        same, mismatch = bundle.split_columns(x)
        assert same is x and mismatch.shape == (4, 0)


@pytest.fixture()
def copy(constant_bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(constant_bundle.bundle.path, target)
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["constants"].update(other=1.0), r"constants \['other', 'site', 'zero'\] must be among"),
        (
            lambda m: m["constants"].update(site="0.1"),
            r"constant column\(s\) \['site'\] must have finite",
        ),
        (lambda m: m["constants"].update(site=True), r"constant column\(s\) \['site'\] must have finite"),
        (lambda m: m["constants"].pop("site"), "features .* must be the columns without the constant ones"),
        (
            lambda m: m.update(columns=CONSTANT_COLUMNS[::-1]),
            "features .* must be the columns without the constant ones",
        ),
        (lambda m: m.update(columns=[*CONSTANT_COLUMNS, "site"]), "name a column twice"),
        (lambda m: m.pop("constants"), "lacks constants"),
        (lambda m: m.update(schema_version=2), "columns and constants need schema version 3"),
        (lambda m: m.update(schema_version=3), "noise.relative_variance needs schema version 5"),
    ],
)
def test_inconsistent_columns_are_refused(copy, edit, message):
    rewrite_manifest(copy, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_a_table_of_constants_alone_is_refused(tmp_path):
    request = TrainRequest(
        candidates=[Candidate(latent_dim=1, hidden=8, components=1)], fit=FitOptions(steps=1)
    )
    with pytest.raises(ValueError, match="every column holds one value in every row"):
        train_bundle(np.ones((100, 3)), ["a", "b", "c"], request, tmp_path / "b")
    assert not (tmp_path / "b").exists()
