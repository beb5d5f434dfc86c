"""The bundle: round trip, and refusal of every kind of corrupt or mismatched bundle."""

import json
import shutil

import numpy as np
import pytest
import torch

from app.bundle.format import CALIBRATION, MANIFEST, WEIGHTS, BundleError, content_version, load_bundle
from app.bundle.graphs import verified_graphs
from app.engine.torch_backend import TorchScorer
from app.model.manifold import ManifoldModel
from app.model.methods import METHODS
from app.model.spec import Architecture, weight_shapes

from ..conftest import FEATURES, bundle_from, manifold_rows, rewrite_manifest


@pytest.mark.parametrize(
    "arch",
    [
        Architecture(input_dim=7, latent_dim=3, hidden=5, depth=2, prior="normal"),
        Architecture(input_dim=7, latent_dim=3, hidden=5, depth=0, prior="vamp", components=4),
        Architecture(
            input_dim=7, latent_dim=3, hidden=5, depth=3, geometry="sphere", prior="vmf", components=2
        ),
    ],
)
def test_documented_weight_shapes_are_the_networks_state(arch):
    state = ManifoldModel(arch).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == weight_shapes(arch)


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = ManifoldModel(Architecture(input_dim=6, latent_dim=2, hidden=16, prior="vamp", components=2))
    model.sigma2, model.sigma2_projected = 0.5, 0.4
    out = tmp_path_factory.mktemp("bundles") / "untrained"
    bundle_from(model, out, manifold_rows(200, seed=0), fprs=(0.1, 0.05), leaderboard_csv="candidate\n0\n")
    return out


def test_round_trip_rebuilds_the_same_scores(untrained_bundle):
    bundle = load_bundle(untrained_bundle)
    assert bundle.features == FEATURES and bundle.name == "untrained"
    assert len(bundle.version) == 16 and bundle.version == content_version(bundle.manifest)
    x = manifold_rows(50, seed=5)
    first, second = TorchScorer(bundle).score(x), TorchScorer(load_bundle(untrained_bundle)).score(x)
    np.testing.assert_array_equal(first.score, second.score)
    # the rebuilt network reproduces the stored calibration scores of its own default method
    assert bundle.calibration[bundle.default_method].dtype == np.float64
    assert np.all(np.diff(bundle.calibration[bundle.default_method]) >= 0)


def test_derived_prior_tensors_are_the_encoded_pseudo_inputs(untrained_bundle):
    bundle = load_bundle(untrained_bundle)
    model = bundle.build_model()
    # float64, from the float32 weights (exact in float64): what the float64 scoring path uses
    with torch.no_grad():
        locations = model.double().encoder(model.prior.pseudo_inputs).numpy()
    assert bundle.weights["derived.prior.locations"].dtype == np.float64
    np.testing.assert_allclose(bundle.weights["derived.prior.locations"], locations, rtol=1e-13, atol=1e-13)
    scales = np.exp(bundle.weights["prior.log_scales"].astype(np.float64))
    np.testing.assert_allclose(bundle.weights["derived.prior.scales"], scales, rtol=1e-13)


@pytest.fixture()
def copy(untrained_bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(untrained_bundle, target)
    return target


def test_flipped_byte_is_refused(copy):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights.safetensors does not match its SHA-256"):
        load_bundle(copy)


def test_truncated_file_is_refused(copy):
    data = (copy / CALIBRATION).read_bytes()
    (copy / CALIBRATION).write_bytes(data[:-8])
    with pytest.raises(BundleError, match=r"calibration.safetensors has \d+ bytes, the manifest says"):
        load_bundle(copy)


def test_missing_file_is_refused(copy):
    (copy / WEIGHTS).unlink()
    with pytest.raises(BundleError, match=r"weights\.safetensors is missing"):
        load_bundle(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        load_bundle(copy)


def test_other_schema_version_is_refused(copy):
    rewrite_manifest(copy, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match=r"schema version 99, this build reads versions 2, 3, 4, 5$"):
        load_bundle(copy)
    rewrite_manifest(copy, lambda m: m.update(schema_version=1))
    with pytest.raises(BundleError, match=r"version 1, this build reads versions 2, 3, 4, 5: .* retrain it"):
        load_bundle(copy)


def _set_first_relative_variance(value):
    return lambda m: m["noise"]["relative_variance"].__setitem__(0, value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["noise"]["relative_variance"].pop(), "must list 6 positive numbers, one per feature"),
        (_set_first_relative_variance(0.0), "must list 6 positive numbers"),
        (_set_first_relative_variance(-1.0), "must list 6 positive numbers"),
        (_set_first_relative_variance(True), "must list 6 positive numbers"),
        (_set_first_relative_variance("1.0"), "must list 6 positive numbers"),
        (lambda m: m["noise"].update(relative_variance=2.0), "must list 6 positive numbers"),
        (lambda m: m.update(schema_version=2), "relative_variance needs schema version 5"),
    ],
)
def test_malformed_relative_variances_are_refused(tiny_bundle, tmp_path, edit, message):
    target = tmp_path / "copy"
    shutil.copytree(tiny_bundle, target)
    assert load_bundle(target).relative_variance is not None  # what train writes by default
    rewrite_manifest(target, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(target)


def test_the_graphs_are_checked_against_the_relative_variances(tiny_bundle, tmp_path):
    """An edited relative variance, its manifest made consistent again, no longer matches the graphs
    the exporter builds from the bundle: the service refuses them rather than score with either."""
    target = tmp_path / "copy"
    shutil.copytree(tiny_bundle, target)
    rewrite_manifest(target, _set_first_relative_variance(7.0))
    with pytest.raises(BundleError, match="is not the graph the exporter builds from the bundle"):
        verified_graphs(load_bundle(target))


def test_edited_manifest_is_refused(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["noise"]["sigma2"] = 123.0
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="edited after the bundle was written"):
        load_bundle(copy)


def test_shape_mismatch_is_refused(copy):
    rewrite_manifest(copy, lambda m: m["architecture"].update(hidden=17))
    with pytest.raises(
        BundleError,
        match=r"tensor encoder.net.layers.0.weight has shape \(16, 6\), the architecture needs \(17, 6\)",
    ):
        load_bundle(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # The re-implementation audit: 64.0 loaded as a size, which docs/bundle.md says is an integer.
        (lambda a: a.update(hidden=16.0), r"hidden must be a JSON int, got 16\.0"),
        (lambda a: a.update(depth=True), r"depth must be a JSON int, got True"),
        (lambda a: a.update(prior=7), r"prior must be a JSON str, got 7"),
        (lambda a: a.update(colour="red"), r"unknown fields \['colour'\]"),
        (lambda a: a.pop("activation"), r"missing fields \['activation'\]"),
    ],
)
def test_an_architecture_of_the_wrong_types_is_refused(copy, edit, message):
    rewrite_manifest(copy, lambda m: edit(m["architecture"]))
    with pytest.raises(BundleError, match="invalid architecture: " + message):
        load_bundle(copy)


def test_garbage_manifest_is_refused(copy):
    (copy / MANIFEST).write_bytes(b"\x00\xff not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(copy)


def test_no_pickle_anywhere(untrained_bundle):
    for file in untrained_bundle.iterdir():
        head = file.read_bytes()[:2]
        assert head not in {b"\x80\x04", b"\x80\x05"}, f"{file.name} looks like a pickle"
    graphs = {f"scoring-{m}.onnx" for m in METHODS}
    assert {f.name for f in untrained_bundle.iterdir()} == {
        MANIFEST,
        WEIGHTS,
        CALIBRATION,
        "leaderboard.csv",
    } | graphs


@pytest.mark.parametrize("value", [0.0, -1.0, "0.5", None, True])
def test_noise_variances_must_be_positive_numbers(copy, value):
    rewrite_manifest(copy, lambda m: m["noise"].update(sigma2_projected=value))
    with pytest.raises(BundleError, match=r"noise\.sigma2_projected must be a positive number"):
        load_bundle(copy)


def test_a_manifest_without_a_noise_variance_is_refused_as_malformed(copy):
    rewrite_manifest(copy, lambda m: m["noise"].pop("sigma2_projected"))
    with pytest.raises(BundleError, match=r"malformed bundle\.json: KeyError: 'sigma2_projected'"):
        load_bundle(copy)
