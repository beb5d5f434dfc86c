"""Ensemble bundles (docs/bundle.md 11): what training writes, what loading refuses, and that both
backends score an ensemble as the mean of its members' scores, each member scored as it would be
alone, checked against separate computations (one session per member, the factors of its density
computed here from its parts, brute-force counts of its reference values, scipy's percentiles for
the first combination, a brute-force conformal p-value)."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file, save_file
from scipy.stats import percentileofscore
from sklearn.metrics import roc_auc_score

from app.bundle.format import (
    MANIFEST,
    NOISE_SCHEMA,
    REFERENCES,
    WEIGHTS,
    BundleError,
    EnsembleBundle,
    describe_networks,
    load_bundle,
    members_of,
    save_ensemble,
)
from app.bundle.graphs import merged_graphs, verified_graphs
from app.engine.onnx_backend import OnnxScorer
from app.engine.scorer import MEMBER_ROWS
from app.engine.torch_backend import TorchScorer
from app.model.methods import METHODS
from app.train.fit import score_rows
from app.train.pipeline import split_rows

from ..conftest import (
    CONSTANT_COLUMNS,
    first_combination,
    manifold_rows,
    off_manifold_rows,
    rewrite_manifest,
    with_constants,
)
from ..tolerances import FLOAT64_PROJECTION_RTOL, float32_rtol


def _rows() -> np.ndarray:
    return with_constants(np.vstack([manifold_rows(40, seed=11), off_manifold_rows(10, seed=12)]))


# docs/bundle.md 11.2: the factors each method's density has, ranked apart.
FACTORS = {
    "likelihood": ("manifold", "residual"),
    "encoder": ("manifold", "residual"),
    "reconstruction": ("residual",),
    "latent": ("manifold",),
    "projected": ("manifold", "residual"),
}


def _factors(parts: dict[str, np.ndarray], method: str) -> dict[str, np.ndarray]:
    """The factors of a member's outputs of `method`, higher = more anomalous."""
    part = {
        name: np.asarray(parts[name], dtype=np.float64)
        for name in ("log_prior", "log_volume", "log_residual")
    }
    values = {"manifold": -(part["log_prior"] + part["log_volume"]), "residual": -part["log_residual"]}
    return {f"{method}.{factor}": values[factor] for factor in FACTORS[method]}


def _at_or_above(references: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.array([np.sum(references >= v) for v in values])


def _tail_surprisal(references: np.ndarray, values: np.ndarray) -> np.ndarray:
    """docs/bundle.md 11.2, factor_fisher_tail: -log((1 + #{r >= v}) / (n + 1)), and beyond the
    largest reference log(n + 1) + (v - r_n) / s, s the mean excess of the top n // 10 (at least one)
    over the next largest, 1 where that is not positive."""
    r, n = np.sort(references), references.size
    k = max(1, n // 10)
    s = r[n - k :].sum() / k - r[n - k - 1] if n > k else 0.0
    s = s if s > 0 else 1.0
    inside = -np.log((1 + _at_or_above(r, values)) / (n + 1))
    return np.where(values > r[-1], np.log(n + 1) + (values - r[-1]) / s, inside)


def _member_score(member, parts, method: str) -> np.ndarray:
    """A member's score of each row: the sum over its factors of their tail surprisals among the
    member's reference values of that factor."""
    return sum(
        _tail_surprisal(member.calibration[term], values) for term, values in _factors(parts, method).items()
    )


def _alone(member, x: np.ndarray, method: str) -> dict[str, np.ndarray]:
    """A member's outputs of its own graph, from a session of its own: what it computes alone."""
    session = ort.InferenceSession(verified_graphs(member)[method], providers=["CPUExecutionProvider"])
    x_model, _ = member.split_columns(x)
    values = session.run(None, {"x": np.ascontiguousarray(x_model, dtype=np.float64)})
    return {
        o.name: np.asarray(v, dtype=np.float64) for o, v in zip(session.get_outputs(), values, strict=True)
    }


def _members_saved(result, order: list[int], out):
    """The trained candidates `order` (in that order) saved as an ensemble of their own, with the
    trained ensemble's calibration (what these tests read is the members' scores)."""
    bundle, reports = result.bundle, result.reports
    return save_ensemble(
        out,
        models=[reports[i].fitted.model for i in order],
        references=[reports[i].val_scores for i in order],
        hyper_parameters=[reports[i].fitted.candidate.to_dict() for i in order],
        name=out.name,
        features=bundle.features,
        scaler=bundle.scaler,
        calibration_scores=dict(bundle.calibration),
        columns=bundle.columns,
        constants=bundle.constants,
        fprs=(0.1,),
        default_fpr=0.1,
    )


def _parts(merged) -> tuple[int, int]:
    """How many parts (stacks, or members alone) a merged graph's nodes come from; its largest stack."""
    model = onnx.ModelProto()
    model.ParseFromString(merged.data)
    prefixes = {re.match(r"m\d+/", node.output[0]) for node in model.graph.node}
    return len({p.group() for p in prefixes if p}), merged.stack


def test_training_writes_every_candidate_as_a_member(ensemble_result):
    bundle = load_bundle(ensemble_result.bundle.path)
    assert isinstance(bundle, EnsembleBundle)
    # an ensemble whose members have one noise variance per feature: version 5, with the ensemble key
    assert bundle.manifest["schema_version"] == NOISE_SCHEMA and "ensemble" in bundle.manifest
    assert all(m.relative_variance is not None for m in bundle.members)
    assert bundle.combination == "factor_fisher_tail"
    assert len(bundle.members) == 3 == len(ensemble_result.selected)
    assert [m.architecture.latent_dim for m in bundle.members] == [2, 2, 3]
    assert bundle.columns == CONSTANT_COLUMNS and bundle.constants == {"site": 0.1, "zero": 0.0}
    for i, member in enumerate(bundle.members):
        fitted = ensemble_result.reports[i].fitted.model
        assert member.sigma2 == pytest.approx(fitted.sigma2, rel=1e-12)
        val = ensemble_result.reports[i].val_scores
        assert set(member.calibration) == {f"{m}.{f}" for m, factors in FACTORS.items() for f in factors}
        for term, references in member.calibration.items():  # the validation rows' values, sorted
            np.testing.assert_array_equal(references, np.sort(val[term]))
        for method in ("likelihood", "encoder", "projected"):  # the factors add up to -log p(x)
            manifold, residual = val[f"{method}.manifold"], val[f"{method}.residual"]
            # log p(x) is score_rows' float32 sum of the three parts (float64 for projected): two
            # roundings of at most 2^-24 of |prior + volume| and of |log p(x)|, both at most
            # |manifold| + |residual|.
            bound = 2**-23 * (np.abs(manifold) + np.abs(residual))
            assert np.all(np.abs(manifold + residual - val[method]) <= bound), method


def test_the_calibration_is_the_ensembles_score_of_the_calibration_rows(ensemble_result):
    """Recomputed from the split, the members' torch parts and brute-force counts of their references."""
    bundle = ensemble_result.bundle
    raw = with_constants(manifold_rows(600, seed=4))[:, [0, *range(2, 7)]]
    splits = split_rows(600, 0.2, 0.2, seed=0)
    x_cal = bundle.scaler.transform(raw[splits.calibration])
    for method in METHODS:
        mean_score = np.mean(
            [
                _member_score(member, score_rows(r.fitted.model, x_cal, method), method)
                for member, r in zip(bundle.members, ensemble_result.reports, strict=True)
            ],
            axis=0,
        )
        np.testing.assert_allclose(bundle.calibration[method], np.sort(mean_score), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_one_onnx_call_scores_each_member_as_it_scores_alone(ensemble_result, method):
    bundle = ensemble_result.bundle
    x = _rows()
    out = OnnxScorer(bundle).score(x, method, explain=True)
    members = [_alone(member, x, method) for member in bundle.members]
    # The merged graph runs each member's nodes on the same input: the same arithmetic.
    rtol = float32_rtol(bundle.members[0].architecture)
    for name in ("log_prob", "log_prior", "log_volume", "log_residual", "reconstruction_error"):
        np.testing.assert_allclose(
            getattr(out, "log_likelihood" if name == "log_prob" else name),
            np.mean([m[name] for m in members], axis=0),
            rtol=rtol,
            atol=rtol,
            err_msg=name,
        )
    expected = np.array(
        [_member_score(member, alone, method) for member, alone in zip(bundle.members, members, strict=True)]
    ).T
    # The same counts; log(n + 1) - log(1 + k) against -log((1 + k) / (n + 1)): each logarithm within
    # an ulp or two of values below 6 (n < 400), so the two agree to a few 1e-15.
    np.testing.assert_allclose(out.member_scores, expected, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(out.score, out.member_scores.mean(axis=1), rtol=1e-15, atol=0)
    calibration = bundle.calibration[method]
    brute = [(1 + np.sum(calibration >= s)) / (calibration.size + 1) for s in out.score]
    np.testing.assert_allclose(out.p_value[:40], brute[:40], rtol=1e-15)
    # Rows off a training constant: p-value 0 and flagged, whatever their score.
    assert not out.constant_mismatch.any()


def test_a_stacked_graphs_row_blocks_come_back_in_row_order(ensemble_result):
    """The two latent-2 members are one stack (app.model.stacking); a call of more rows than a
    stack's block (MEMBER_ROWS / 2) is cut into blocks (run on two threads by onnxruntime), and each member's
    values of every row must be its own graph's of that row, the stack's member axis kept apart
    from the rows'."""
    bundle = ensemble_result.bundle
    scorer = OnnxScorer(bundle, threads=2)
    assert scorer._layouts[scorer.sessions["likelihood"]].block_rows == MEMBER_ROWS // 2
    assert _parts(merged_graphs(bundle)["likelihood"]) == (2, 2)  # latent 2 twice, one stack
    x = with_constants(manifold_rows(2 * MEMBER_ROWS + 37, seed=21))
    out = scorer.score(x, "likelihood")
    members = [_alone(member, x, "likelihood") for member in bundle.members]
    expected = np.array(
        [_member_score(m, alone, "likelihood") for m, alone in zip(bundle.members, members, strict=True)]
    ).T
    # Counts of references at or above each value: a float32 rounding apart can move a value past a
    # reference only where the two are that close, so allow that many rows to differ.
    rtol = float32_rtol(bundle.members[0].architecture)
    np.testing.assert_allclose(
        out.log_likelihood, np.mean([m["log_prob"] for m in members], axis=0), rtol=rtol, atol=rtol
    )
    assert np.mean(np.isclose(out.member_scores, expected, rtol=1e-14, atol=1e-14)) > 0.99
    # The torch backend stacks the same two members and cuts the same rows into blocks on a CPU.
    torch_out = TorchScorer(bundle).score(x, "likelihood")
    np.testing.assert_allclose(
        torch_out.log_likelihood, np.mean([m["log_prob"] for m in members], axis=0), rtol=rtol, atol=rtol
    )


def test_the_torch_backend_scores_the_members_as_the_onnx_graph_does(ensemble_result):
    """Member outputs agree to the float32 (float64 for projected) tolerance; a member's score can then
    differ only by the reference values within that tolerance of the row's."""
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
            # The torch value of a factor lies within the tolerance w of the graph's value v, so its
            # count of references at or above lies between #{r >= v + w} and #{r >= v - w}: the
            # member's score between the sums of the surprisals those counts give.
            low, high = 0.0, 0.0
            for term, values in _factors(_alone(member, x, method), method).items():
                refs, window = member.calibration[term], rtol * np.maximum(np.abs(values), scale)
                low = low + _tail_surprisal(refs, values - window)  # increasing in the value
                high = high + _tail_surprisal(refs, values + window)
            score = b.member_scores[:, j]
            assert np.all((low - 1e-12 <= score) & (score <= high + 1e-12)), (method, j)


def test_the_ensemble_ranks_rows_off_the_manifold_higher_and_flags_rows_off_a_constant(ensemble_result):
    bundle = ensemble_result.bundle
    x = with_constants(np.vstack([manifold_rows(200, seed=11), off_manifold_rows(200, seed=12)]))
    x[3, 1] = 0.2  # "site" is 0.1 in every training row
    out = OnnxScorer(bundle).score(x, "likelihood")
    assert out.p_value[3] == 0 and out.is_anomaly[3] and out.constant_mismatch[3].tolist() == [True, False]
    # 200 rows of each class: chance gives AUC 0.5 +- 0.03 (one standard error).
    assert roc_auc_score(np.r_[np.zeros(200), np.ones(200)], out.score) > 0.6


def test_an_ensemble_of_one_member_scores_as_its_member(ensemble_result, tmp_path):
    one = _members_saved(ensemble_result, [0], tmp_path / "one")
    x = _rows()
    out = OnnxScorer(one).score(x, "likelihood", explain=True)
    alone = _alone(one.members[0], x, "likelihood")
    expected = _member_score(one.members[0], alone, "likelihood")
    np.testing.assert_allclose(out.score, expected, rtol=1e-14, atol=1e-14)
    assert out.member_scores.shape == (len(x), 1)
    # The root mean square of one member's residual is its magnitude: the same shares, of the
    # residual term (each squared residual over the feature's relative noise variance).
    squared = alone["residual"] ** 2 / np.asarray(one.members[0].relative_variance)
    np.testing.assert_allclose(
        out.residual_share, squared / squared.sum(axis=1, keepdims=True), rtol=1e-12, atol=1e-15
    )
    assert describe_networks(one)[1].startswith("sigma2 from")


def test_an_ensemble_of_the_first_combination_ranks_the_whole_log_density(ensemble_result, tmp_path):
    """Bundles written before the factors were ranked apart name "rank_mean": each member's -log p(x)
    ranked among its references of it, the calibration rows' mean ranks as the calibration. They
    still load, and score so in both backends: ranks, p-values, flags."""
    bundle, reports = ensemble_result.bundle, ensemble_result.reports
    raw = with_constants(manifold_rows(600, seed=4))[:, [0, *range(2, 7)]]
    x_cal = bundle.scaler.transform(raw[split_rows(600, 0.2, 0.2, seed=0).calibration])

    def mean_rank(x_std, member_reports):  # as the first trainer computed it, by scipy's percentile
        return np.mean(
            [
                [
                    percentileofscore(r.val_scores["likelihood"], v, kind="weak") / 100
                    for v in -score_rows(r.fitted.model, x_std, "likelihood")["log_prob"]
                ]
                for r in member_reports
            ],
            axis=0,
        )

    calibration = {m: bundle.calibration[m] for m in METHODS} | {"likelihood": mean_rank(x_cal, reports)}
    first = first_combination(ensemble_result, tmp_path / "first", calibration, fprs=(0.1,), default_fpr=0.1)
    loaded = load_bundle(first.path)
    assert loaded.combination == "rank_mean"
    assert set(loaded.members[0].calibration) == set(METHODS)
    assert set(load_file(first.path / REFERENCES)) == {f"{m}.{i}" for m in METHODS for i in range(3)}
    x = _rows()
    rtol = float32_rtol(loaded.members[0].architecture)
    for scorer in (OnnxScorer(loaded), TorchScorer(loaded)):
        out = scorer.score(x, "likelihood")
        for j, member in enumerate(loaded.members):
            refs, alone = member.calibration["likelihood"], _alone(member, x, "likelihood")
            value = -alone["log_prob"]
            if scorer.backend == "onnx":  # the same graph: the same values
                window = np.zeros_like(value)
            else:  # the torch values lie within the float32 tolerance of the parts' scale
                window = rtol * sum(np.abs(alone[p]) for p in ("log_prior", "log_volume", "log_residual"))
            low = (refs[None, :] <= (value - window)[:, None]).mean(axis=1)
            high = (refs[None, :] <= (value + window)[:, None]).mean(axis=1)
            assert np.all((out.member_scores[:, j] >= low) & (out.member_scores[:, j] <= high)), (
                scorer.backend
            )
        c = loaded.calibration["likelihood"]
        np.testing.assert_array_equal(
            out.p_value, (1 + (c[None, :] >= out.score[:, None]).sum(1)) / (c.size + 1)
        )
        np.testing.assert_array_equal(out.is_anomaly, out.score > loaded.threshold("likelihood", 0.1).value)
    with pytest.raises(BundleError, match="unknown ensemble combination 'max'"):
        save_ensemble(
            tmp_path / "max",
            models=[reports[0].fitted.model],
            references=[reports[0].val_scores],
            hyper_parameters=[{}],
            name="max",
            combination="max",
            features=bundle.features,
            scaler=bundle.scaler,
            calibration_scores=dict(bundle.calibration),
        )


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
    del refs["latent.manifold.1"]
    _rewrite_file(root, REFERENCES, refs)
    with pytest.raises(BundleError, match=r"missing \['latent.manifold.1'\]"):
        load_bundle(root)

    root = _copy(src, tmp_path / "unsorted-reference")
    refs = load_file(root / REFERENCES)
    refs["likelihood.residual.2"] = refs["likelihood.residual.2"][::-1].copy()
    _rewrite_file(root, REFERENCES, refs)
    with pytest.raises(
        BundleError,
        match=r"member 2's reference scores of 'likelihood\.residual' must be finite and ascending",
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


def test_members_stacked_out_of_their_order_keep_their_own_columns(ensemble_result, tmp_path):
    """Members 0 and 2 share an architecture (latent 2) and member 1 does not: the merged graph
    stacks 0 and 2 and puts 1 after them, so its combination must put the members back in their
    order. Each column of member_scores and the explanation's residual are those of the member's
    own graph, alone."""
    order = [0, 2, 1]  # latent 2, 3, 2
    shuffled = _members_saved(ensemble_result, order, tmp_path / "shuffled")
    assert [m.architecture.latent_dim for m in shuffled.members] == [2, 3, 2]
    assert _parts(merged_graphs(shuffled)["likelihood"]) == (2, 2)  # members 0 and 2 one stack
    x = _rows()
    out = OnnxScorer(shuffled).score(x, "likelihood", explain=True)
    alone = [_alone(member, x, "likelihood") for member in shuffled.members]
    expected = np.array(
        [_member_score(m, a, "likelihood") for m, a in zip(shuffled.members, alone, strict=True)]
    ).T
    np.testing.assert_allclose(out.member_scores, expected, rtol=1e-14, atol=1e-14)
    assert not np.allclose(expected[:, 1], expected[:, 2])  # a swap of columns would be seen
    # The members' mean residual share: each whitened by its own noise variances.
    whitened = [
        a["residual"] ** 2 / np.asarray(m.relative_variance)
        for m, a in zip(shuffled.members, alone, strict=True)
    ]
    squared = np.mean(whitened, axis=0)
    rtol = float32_rtol(shuffled.members[0].architecture)
    np.testing.assert_allclose(
        out.residual_share, squared / squared.sum(axis=1, keepdims=True), rtol=rtol, atol=rtol
    )


def _far_off(n: int, seed: int, distance: float) -> np.ndarray:
    """Rows on the manifold pushed `distance` raw units off it in a random direction."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal((n, 6))
    return manifold_rows(n, seed + 1) + distance * direction / np.linalg.norm(
        direction, axis=1, keepdims=True
    )


def test_rows_far_beyond_every_reference_score_by_how_far_and_are_flagged(ensemble_result, tmp_path):
    """The tail (factor_fisher_tail): rows a hundred and a thousand times farther off the manifold
    than the off-manifold rows lie beyond every member's references of the residual, and score higher
    the farther they are, above every calibration score: flagged, p-value 1 / (n + 1). The same members
    without the tail (factor_fisher, sessions 11 to 17) give the two sets the same residual
    surprisal, log(n + 1), and no longer order them by distance."""
    bundle = ensemble_result.bundle
    near, far = with_constants(_far_off(100, 30, 300.0)), with_constants(_far_off(100, 30, 3000.0))
    out_near, out_far = (OnnxScorer(bundle).score(x, "reconstruction") for x in (near, far))
    assert np.all(out_far.score > out_near.score)
    c = bundle.calibration["reconstruction"]
    assert np.all(out_near.score > c.max()) and out_far.is_anomaly.all() and out_near.is_anomaly.all()
    assert np.all(out_far.p_value == 1 / (c.size + 1))
    untailed = first_combination(
        ensemble_result,
        tmp_path / "untailed",
        dict(bundle.calibration),
        "factor_fisher",
        fprs=(0.1,),
        default_fpr=0.1,
    )
    a, b = (OnnxScorer(untailed).score(x, "reconstruction").member_scores for x in (near, far))
    np.testing.assert_array_equal(a, b)  # every member: log(n + 1), the residual beyond its references
