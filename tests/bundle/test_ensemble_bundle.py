"""Ensemble bundles (docs/bundle.md 11): what training writes, what loading refuses, and that both
backends score an ensemble as the mean of its members' ranks, each member scored as it would be
alone, checked against separate computations (one session per member, scipy's percentiles, a
brute-force conformal p-value)."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy.stats import percentileofscore
from sklearn.metrics import roc_auc_score

from app.bundle.format import (
    ENSEMBLE_SCHEMA,
    MANIFEST,
    REFERENCES,
    WEIGHTS,
    BundleError,
    EnsembleBundle,
    describe_networks,
    load_bundle,
    members_of,
    save_ensemble,
)
from app.engine.onnx_backend import OnnxScorer
from app.engine.torch_backend import TorchScorer
from app.model.methods import METHODS
from app.train.fit import score_rows
from app.train.pipeline import split_rows

from ..conftest import (
    CONSTANT_COLUMNS,
    manifold_rows,
    off_manifold_rows,
    rewrite_manifest,
    with_constants,
)
from ..tolerances import FLOAT64_PROJECTION_RTOL, float32_rtol


def _rows() -> np.ndarray:
    return with_constants(np.vstack([manifold_rows(40, seed=11), off_manifold_rows(10, seed=12)]))


def test_training_writes_every_candidate_as_a_member(ensemble_result):
    bundle = load_bundle(ensemble_result.bundle.path)
    assert isinstance(bundle, EnsembleBundle)
    assert bundle.manifest["schema_version"] == ENSEMBLE_SCHEMA
    assert len(bundle.members) == 3 == len(ensemble_result.selected)
    assert [m.architecture.latent_dim for m in bundle.members] == [2, 2, 3]
    assert bundle.columns == CONSTANT_COLUMNS and bundle.constants == {"site": 0.1, "zero": 0.0}
    for i, member in enumerate(bundle.members):
        fitted = ensemble_result.reports[i].fitted.model
        assert member.sigma2 == pytest.approx(fitted.sigma2, rel=1e-12)
        for method in METHODS:  # the reference scores are the member's validation scores, sorted
            np.testing.assert_array_equal(
                member.calibration[method], np.sort(ensemble_result.reports[i].val_scores[method])
            )


def test_the_calibration_is_the_ensembles_score_of_the_calibration_rows(ensemble_result):
    """Recomputed from the split, the members' torch scores and scipy's weak percentile."""
    bundle = ensemble_result.bundle
    raw = with_constants(manifold_rows(600, seed=4))[:, [0, *range(2, 7)]]
    splits = split_rows(600, 0.2, 0.2, seed=0)
    x_cal = bundle.scaler.transform(raw[splits.calibration])
    for method in METHODS:
        mean_rank = np.mean(
            [
                [
                    percentileofscore(member.calibration[method], s, kind="weak") / 100
                    for s in -score_rows(r.fitted.model, x_cal, method)["log_prob"]
                ]
                for member, r in zip(bundle.members, ensemble_result.reports, strict=True)
            ],
            axis=0,
        )
        np.testing.assert_allclose(bundle.calibration[method], np.sort(mean_rank), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_one_onnx_call_scores_each_member_as_it_scores_alone(ensemble_result, method):
    bundle = ensemble_result.bundle
    x = _rows()
    out = OnnxScorer(bundle).score(x, method, explain=True)
    members = [OnnxScorer(member).score(x, method, explain=True) for member in bundle.members]
    # The merged graph runs each member's nodes on the same input: the same arithmetic.
    rtol = float32_rtol(bundle.members[0].architecture)
    for name in ("log_likelihood", "log_prior", "log_volume", "log_residual", "reconstruction_error"):
        np.testing.assert_allclose(
            getattr(out, name),
            np.mean([getattr(m, name) for m in members], axis=0),
            rtol=rtol,
            atol=rtol,
            err_msg=name,
        )
    expected_ranks = np.array(
        [
            [percentileofscore(member.calibration[method], s, kind="weak") / 100 for s in alone.score]
            for member, alone in zip(bundle.members, members, strict=True)
        ]
    ).T
    # Equal counts; scipy's percentile divides by n after scaling by 100, a rounding apart.
    np.testing.assert_allclose(out.member_ranks, expected_ranks, rtol=0, atol=1e-15)
    np.testing.assert_allclose(out.score, expected_ranks.mean(axis=1), rtol=0, atol=1e-15)
    calibration = bundle.calibration[method]
    brute = [(1 + np.sum(calibration >= s)) / (calibration.size + 1) for s in out.score]
    np.testing.assert_allclose(out.p_value[:40], brute[:40], rtol=1e-15)
    # Rows off a training constant: p-value 0 and flagged, whatever their rank.
    assert not out.constant_mismatch.any()


def test_the_torch_backend_scores_the_members_as_the_onnx_graph_does(ensemble_result):
    """Member scores agree to the float32 (float64 for projected) tolerance; a member's rank can then
    differ only by the reference scores within that tolerance of the row's score."""
    bundle = ensemble_result.bundle
    x = _rows()
    onnx_scorer, torch_scorer = OnnxScorer(bundle), TorchScorer(bundle)
    for method in METHODS:
        rtol = (
            FLOAT64_PROJECTION_RTOL if method == "projected" else float32_rtol(bundle.members[0].architecture)
        )
        a, b = onnx_scorer.score(x, method), torch_scorer.score(x, method)
        scale = np.maximum.reduce([np.abs(a.log_prior), np.abs(a.log_volume), np.abs(a.log_residual)])
        np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=0, atol=float(rtol * scale.max()))
        for j, member in enumerate(bundle.members):
            alone = OnnxScorer(member).score(x, method).score
            window = rtol * np.maximum(np.abs(alone), scale)
            refs = member.calibration[method]
            near = (
                np.array([np.sum(np.abs(refs - s) <= w) for s, w in zip(alone, window, strict=True)])
                / refs.size
            )
            assert np.all(np.abs(a.member_ranks[:, j] - b.member_ranks[:, j]) <= near), (method, j)


def test_the_ensemble_ranks_rows_off_the_manifold_higher_and_flags_rows_off_a_constant(ensemble_result):
    bundle = ensemble_result.bundle
    x = with_constants(np.vstack([manifold_rows(200, seed=11), off_manifold_rows(200, seed=12)]))
    x[3, 1] = 0.2  # "site" is 0.1 in every training row
    out = OnnxScorer(bundle).score(x, "likelihood")
    assert out.p_value[3] == 0 and out.is_anomaly[3] and out.constant_mismatch[3].tolist() == [True, False]
    # 200 rows of each class: chance gives AUC 0.5 +- 0.03 (one standard error).
    assert roc_auc_score(np.r_[np.zeros(200), np.ones(200)], out.score) > 0.6


def test_an_ensemble_of_one_member_scores_as_its_member_ranked(ensemble_result, tmp_path):
    bundle, report = ensemble_result.bundle, ensemble_result.reports[0]
    one = save_ensemble(
        tmp_path / "one",
        models=[report.fitted.model],
        references=[{m: report.val_scores[m] for m in METHODS}],
        hyper_parameters=[report.fitted.candidate.to_dict()],
        name="one",
        features=bundle.features,
        scaler=bundle.scaler,
        calibration_scores=dict(bundle.calibration),
        columns=bundle.columns,
        constants=bundle.constants,
        fprs=(0.1,),
        default_fpr=0.1,
    )
    x = _rows()
    out = OnnxScorer(one).score(x, "likelihood", explain=True)
    alone = OnnxScorer(one.members[0]).score(x, "likelihood", explain=True)
    refs = one.members[0].calibration["likelihood"]
    expected = np.array([percentileofscore(refs, s, kind="weak") / 100 for s in alone.score])
    np.testing.assert_allclose(out.score, expected, rtol=0, atol=1e-15)
    assert out.member_ranks.shape == (len(x), 1)
    # The root mean square of one member's residual is its magnitude: the same shares.
    np.testing.assert_allclose(out.residual_share, alone.residual_share, rtol=1e-12, atol=1e-15)
    assert describe_networks(one)[1].startswith("sigma2 from")


def test_members_of_a_plain_bundle_is_the_bundle(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    assert members_of(bundle) == (bundle,)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_file(root, name, tensors):
    """Replace a tensor file and its hash in the manifest, as whoever can write the bundle can."""
    import hashlib

    save_file(tensors, root / name)
    data = (root / name).read_bytes()

    def edit(manifest):
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    rewrite_manifest(root, edit)


def test_loading_refuses_an_inconsistent_ensemble(ensemble_result, tmp_path):
    src = ensemble_result.bundle.path

    root = _copy(src, tmp_path / "unknown-combination")
    rewrite_manifest(root, lambda m: m["ensemble"].update(combination="max"))
    with pytest.raises(BundleError, match="combination 'max'"):
        load_bundle(root)

    root = _copy(src, tmp_path / "no-members")
    rewrite_manifest(root, lambda m: m["ensemble"].update(members=[]))
    with pytest.raises(BundleError, match="non-empty list of members"):
        load_bundle(root)

    root = _copy(src, tmp_path / "missing-reference")
    refs = load_file(root / REFERENCES)
    del refs["latent.1"]
    _rewrite_file(root, REFERENCES, refs)
    with pytest.raises(BundleError, match=r"missing \['latent.1'\]"):
        load_bundle(root)

    root = _copy(src, tmp_path / "unsorted-reference")
    refs = load_file(root / REFERENCES)
    refs["likelihood.2"] = refs["likelihood.2"][::-1].copy()
    _rewrite_file(root, REFERENCES, refs)
    with pytest.raises(
        BundleError, match="member 2's reference scores of 'likelihood' must be finite and ascending"
    ):
        load_bundle(root)

    root = _copy(src, tmp_path / "stray-tensor")
    weights = load_file(root / WEIGHTS)
    weights["members.3.decoder.net.layers.0.bias"] = weights["members.0.decoder.net.layers.0.bias"]
    _rewrite_file(root, WEIGHTS, weights)
    with pytest.raises(BundleError, match="tensors of no member"):
        load_bundle(root)

    root = _copy(src, tmp_path / "borrowed-graph")
    rewrite_manifest(
        root, lambda m: m["ensemble"]["members"][0]["onnx"].update(likelihood="scoring-likelihood-m1.onnx")
    )
    with pytest.raises(BundleError, match="member 0's graphs must be its own files"):
        load_bundle(root)

    root = _copy(src, tmp_path / "nan-in-manifest")
    (root / MANIFEST).write_text(
        (root / MANIFEST).read_text().replace('"default_fpr": 0.1', '"default_fpr": NaN')
    )
    with pytest.raises(BundleError, match=r"malformed bundle\.json: ValueError"):
        load_bundle(root)

    root = _copy(src, tmp_path / "wrong-shape")
    manifest = json.loads((root / MANIFEST).read_text())
    rewrite_manifest(root, lambda m: m["ensemble"]["members"][1]["architecture"].update(latent_dim=3))
    with pytest.raises(BundleError, match="shape"):
        load_bundle(root)
    assert manifest["ensemble"]["members"][1]["architecture"]["latent_dim"] == 2
