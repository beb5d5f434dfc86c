"""The members' common scale: ranks against scipy's percentile of score, surprisals against a
brute-force count; the combinations' member scores against the factors computed by hand from the
parts."""

import numpy as np
import pytest
from scipy.stats import percentileofscore

from app.bundle import ensemble
from app.bundle.ensemble import (
    FACTOR_FISHER,
    FISHER_TAIL,
    RANK_MEAN,
    member_scores,
    ranks,
    surprisal,
    term_scores,
    terms,
)
from app.model.methods import PARTS


def test_ranks_are_the_weak_percentile_of_score():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(101)
    scores = np.r_[rng.standard_normal(50), reference[:10], -10.0, 10.0]  # ties with the reference too
    expected = [percentileofscore(reference, s, kind="weak") / 100 for s in scores]
    np.testing.assert_allclose(ranks(reference, scores), expected, rtol=0, atol=1e-15)
    assert ranks(reference, [-10.0, 10.0]).tolist() == [0.0, 1.0]
    assert np.isnan(ranks(reference, [np.nan])).all()
    with pytest.raises(ValueError, match="non-empty"):
        ranks(np.array([]), scores)


def test_surprisal_is_minus_the_log_of_the_conformal_p_value():
    rng = np.random.default_rng(4)
    reference = np.round(rng.standard_normal(99), 1)  # ties among the references
    scores = np.r_[rng.standard_normal(50), reference[:10], -10.0, 10.0]
    p = np.array([(1 + sum(r >= s for r in reference)) / 100 for s in scores])
    np.testing.assert_allclose(surprisal(reference, scores), -np.log(p), rtol=1e-15, atol=1e-15)
    assert surprisal(reference, [-10.0]).tolist() == [0.0]
    assert surprisal(reference, [10.0])[0] == pytest.approx(np.log(100), rel=1e-15)
    assert np.isnan(surprisal(reference, [np.nan])).all()
    with pytest.raises(ValueError, match="non-empty"):
        surprisal(np.array([np.nan]), scores)


def test_the_rank_mean_member_score_is_its_rank_and_no_member_dominates():
    rng = np.random.default_rng(1)
    small, huge = rng.standard_normal(200), 1e6 * rng.standard_cauchy(200)  # scales 1 and 1e6, one heavy
    rows = [np.array([0.0, 3.0, -3.0]), np.array([0.0, -1e9, 1e9])]
    got = member_scores(RANK_MEAN, [{"latent": small}, {"latent": huge}], [{"latent": r} for r in rows])
    weak = [
        [percentileofscore(ref, s, kind="weak") / 100 for s in member]
        for ref, member in zip([small, huge], rows, strict=True)
    ]
    np.testing.assert_allclose(got, np.array(weak).T, atol=1e-15)
    combined = got.mean(axis=1)
    assert combined[1] == pytest.approx(combined[2], abs=0.02)  # one member's extreme counts no more than 1
    with pytest.raises(ValueError, match="2 reference sets for 1 members"):
        member_scores(RANK_MEAN, [{"latent": small}, {"latent": huge}], [{"latent": rows[0]}])


@pytest.mark.parametrize("combination", [RANK_MEAN, FACTOR_FISHER, FISHER_TAIL])
def test_small_batches_counted_by_one_comparison_equal_the_binary_search_exactly(combination, monkeypatch):
    """A bundle's small calls count references by one broadcast comparison of all members (the tail,
    where there is one, applied to the stacked counts), larger ones by searchsorted per member: the
    same counts, so the same bits, ties, rows beyond the largest reference and NaN included."""
    rng = np.random.default_rng(7)
    names = terms(combination, "likelihood")  # one term, or the two factors
    # integers: many ties between values and references, values beyond them; one NaN row
    refs = [{t: np.sort(rng.integers(0, 20, 63).astype(float)) for t in names} for _ in range(6)]
    values = [{t: rng.integers(-2, 40, 9).astype(float) for t in names} for _ in range(6)]
    for member in values:
        member[names[0]][4] = np.nan
    broadcast = member_scores(combination, refs, values, ascending=True)
    monkeypatch.setattr(ensemble, "BROADCAST_COMPARISONS", 0)
    searched = member_scores(combination, refs, values, ascending=True)
    assert np.array_equal(broadcast, searched, equal_nan=True) and np.isnan(broadcast[4]).all()
    if combination == FISHER_TAIL:  # its values beyond the references: test_the_tail_continues_*
        assert (np.delete(broadcast, 4, axis=0) > 2 * np.log(64)).any()  # some rows reach the tail
        return

    def brute(reference, v):  # the definitions, counted one value at a time
        if combination == RANK_MEAN:
            return np.array([np.sum(reference <= s) / reference.size for s in v])
        return -np.log(_p(reference, v))

    expected = np.array([sum(brute(r[t], v[t]) for t in names) for r, v in zip(refs, values, strict=True)]).T
    # log(n + 1) - log1p(count) against -log(p): each log within half an ulp of log(64), summed over
    # two factors, so within 4 ulps of log(64) absolute
    atol = 4 * np.spacing(np.log(64.0))
    finite = np.delete(broadcast, 4, axis=0)
    np.testing.assert_allclose(finite, np.delete(expected, 4, axis=0), rtol=0, atol=atol)


def _parts(rng, n):
    """A member's outputs of one method: parts of very different scales, their sum as log_prob."""
    prior, volume, residual = rng.normal(0, 1, n), rng.normal(5, 0.1, n), -1e6 * rng.chisquare(30, n)
    return {
        "log_prob": prior + volume + residual,
        "log_prior": prior,
        "log_volume": volume,
        "log_residual": residual,
    }


def _p(reference, values):
    return np.array([(1 + np.sum(reference >= v)) / (reference.size + 1) for v in values])


def test_factor_fisher_adds_the_surprisals_of_the_manifold_and_the_residual():
    """Each factor computed from the parts by hand, its conformal p-value counted among the member's
    reference values of that factor; a member's score -log p_manifold - log p_residual."""
    rng = np.random.default_rng(2)
    held_out, rows = [_parts(rng, 300), _parts(rng, 200)], [_parts(rng, 20), _parts(rng, 20)]
    references = [term_scores(FACTOR_FISHER, "likelihood", p) for p in held_out]
    assert set(references[0]) == {"likelihood.manifold", "likelihood.residual"}
    got = member_scores(
        FACTOR_FISHER, references, [term_scores(FACTOR_FISHER, "likelihood", r) for r in rows]
    )
    expected = np.array(
        [
            -np.log(_p(-(h["log_prior"] + h["log_volume"]), -(r["log_prior"] + r["log_volume"])))
            - np.log(_p(-h["log_residual"], -r["log_residual"]))
            for h, r in zip(held_out, rows, strict=True)
        ]
    ).T
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-14)
    # Summed, the residual's scale decides the rank alone; apart, the manifold factor counts too. (The
    # residuals are further apart than the manifold factor's whole range: no sum can reorder them.)
    for h, r in zip(held_out, rows, strict=True):
        manifold = -np.r_[h["log_prior"] + h["log_volume"], r["log_prior"] + r["log_volume"]]
        assert np.diff(np.sort(np.r_[h["log_residual"], r["log_residual"]])).min() > np.ptp(manifold)
    whole = [term_scores(RANK_MEAN, "likelihood", p) for p in held_out]
    summed = member_scores(RANK_MEAN, whole, [term_scores(RANK_MEAN, "likelihood", r) for r in rows])
    residual_only = [
        ranks(-h["log_residual"], -r["log_residual"]) for h, r in zip(held_out, rows, strict=True)
    ]
    np.testing.assert_array_equal(summed, np.array(residual_only).T)


def test_a_row_extreme_in_one_factor_alone_is_not_averaged_away():
    """A row beyond every reference in its residual and typical on the manifold: Fisher's sum puts it
    above the 99th percentile of normal rows' scores; the mean of the two ranks (0.75) would put it
    near their 88th."""
    rng = np.random.default_rng(5)
    reference, normal = _parts(rng, 2000), _parts(rng, 5000)
    row = {k: np.array([np.median(v)]) for k, v in _parts(rng, 2001).items()}
    row["log_residual"] = np.array([reference["log_residual"].min() - 1.0])
    refs = [term_scores(FACTOR_FISHER, "likelihood", reference)]
    score = member_scores(FACTOR_FISHER, refs, [term_scores(FACTOR_FISHER, "likelihood", row)])[0, 0]
    normal_scores = member_scores(FACTOR_FISHER, refs, [term_scores(FACTOR_FISHER, "likelihood", normal)])[
        :, 0
    ]
    assert score > np.quantile(normal_scores, 0.99)
    mean_ranks = np.mean(
        [ranks(refs[0][t], v) for t, v in term_scores(FACTOR_FISHER, "likelihood", normal).items()], 0
    )
    assert np.mean(mean_ranks >= 0.75) > 0.1


def test_methods_without_a_factor_score_the_one_they_have():
    rng = np.random.default_rng(3)
    latent, rows = _parts(rng, 100), _parts(rng, 10)
    latent["log_volume"] = latent["log_residual"] = np.zeros(100)
    latent["log_prob"] = latent["log_prior"].copy()
    rows["log_volume"] = rows["log_residual"] = np.zeros(10)
    assert terms(FACTOR_FISHER, "latent") == ("latent.manifold",)
    assert terms(FACTOR_FISHER, "reconstruction") == ("reconstruction.residual",)
    assert terms(RANK_MEAN, "projected") == ("projected",)
    references = [term_scores(FACTOR_FISHER, "latent", latent)]
    np.testing.assert_array_equal(
        member_scores(FACTOR_FISHER, references, [term_scores(FACTOR_FISHER, "latent", rows)])[:, 0],
        surprisal(-latent["log_prior"], -rows["log_prior"]),
    )
    with pytest.raises(ValueError, match="unknown ensemble combination 'max'"):
        terms("max", "likelihood")


def _emitted(combination, method, stacked, references, whitening):
    """Run ensemble.emit's nodes in onnxruntime on the stacked member outputs."""
    import onnx
    import onnxruntime as ort

    from app.model.graph import OPSET, Graph, onnx_type

    g = Graph()
    outputs = ensemble.emit(g, combination, method, {n: n for n in stacked}, references, whitening)
    graph = onnx.helper.make_graph(
        g.nodes + [onnx.helper.make_node("Identity", [t], [f"out_{n}"]) for n, t in outputs.items()],
        "emit",
        [onnx.helper.make_tensor_value_info(n, onnx_type(v.dtype.type), v.shape) for n, v in stacked.items()],
        [onnx.helper.make_tensor_value_info(f"out_{n}", onnx.TensorProto.DOUBLE, None) for n in outputs],
        g.initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(outputs, session.run([f"out_{n}" for n in outputs], stacked), strict=True))


@pytest.mark.parametrize(
    ("combination", "method", "dtype"),
    [
        (FACTOR_FISHER, "likelihood", np.float32),
        (FACTOR_FISHER, "latent", np.float32),
        (FACTOR_FISHER, "reconstruction", np.float32),
        (FACTOR_FISHER, "projected", np.float64),
        (RANK_MEAN, "likelihood", np.float32),
        (FISHER_TAIL, "likelihood", np.float32),
        (FISHER_TAIL, "projected", np.float64),
    ],
)
def test_the_graphs_combination_counts_as_searchsorted_does(combination, method, dtype):
    """The onnx backend combines members inside its graph by a binary search over references padded
    with +inf (ensemble.emit): the same counts as searchsorted, ties, infinities and NaN included,
    for reference sets of 1, 7 (2^3 - 1: no padding), 8 and 300 values, so the same member scores,
    bit for bit; the means and the residual's root mean square as numpy's, to a sum's rounding."""
    rng = np.random.default_rng(11)
    sizes, rows, d = (1, 7, 8, 300), 64, 5
    members = len(sizes)
    # Values on a coarse grid (exact in float32), the references drawn from the same grid: many ties.
    grid = lambda *shape: (rng.integers(-40, 40, shape) / 4).astype(dtype)  # noqa: E731
    stacked = {name: grid(members, rows) for name in ("log_prob", *PARTS, "reconstruction_error")}
    stacked["log_volume"][:, :8] = 0  # a factor equal to -log_prior alone: ties with its references
    stacked["residual"] = grid(members, rows, d)
    stacked["log_prob"][:, 0] = stacked["log_prior"][:, 1] = stacked["log_residual"][:, 2] = np.inf
    stacked["log_prob"][:, 3] = stacked["log_prior"][:, 4] = stacked["log_residual"][:, 5] = -np.inf
    stacked["log_prob"][:, 6] = stacked["log_prior"][:, 7] = stacked["log_residual"][:, 8] = np.nan
    values = ensemble.term_scores(combination, method, {k: v.astype(np.float64) for k, v in stacked.items()})
    references = [
        {t: np.sort(rng.choice(np.r_[v[m], rng.integers(-80, 80, n) / 4], n)) for t, v in values.items()}
        for m, n in enumerate(sizes)
    ]
    for refs in references:  # a bundle's references are finite (checked at load)
        for t in refs:
            refs[t] = np.sort(np.where(np.isfinite(refs[t]), refs[t], 0.0))
    whitening = [None, np.linspace(0.5, 2, d), None, np.full(d, 3.0)]
    out = _emitted(combination, method, stacked, references, whitening)

    expected = ensemble.stacked_member_scores(combination, references, values, ascending=True)
    assert np.isnan(expected).any() and np.isinf(next(iter(values.values()))).any()
    # To the bit (NaN where numpy's is): an ensemble score often equals a calibration score exactly,
    # and a last-place difference would decide its p-value and flag.
    np.testing.assert_array_equal(out["member_scores"], expected)
    # Means of four float64 values: each sum rounds at most three times, by half an ulp of its size.
    sums = {k: v.astype(np.float64) for k, v in stacked.items()}
    for name in ("log_prob", *PARTS, "reconstruction_error"):
        finite = np.isfinite(sums[name]).all(axis=0)
        np.testing.assert_allclose(out[name][finite], sums[name].mean(axis=0)[finite], rtol=4e-16 * members)
    whitened = sums["residual"] * np.stack([np.ones(d) if w is None else w for w in whitening])[:, None, :]
    np.testing.assert_allclose(out["residual"], np.sqrt(np.mean(whitened**2, axis=0)), rtol=8e-16 * members)


def test_the_tail_continues_the_surprisal_beyond_the_largest_reference():
    """factor_fisher_tail: the conformal surprisal up to the largest reference r_n, then log(n + 1) +
    (v - r_n) / s, s the mean excess of the top tenth over the next value (by hand here), 1 where
    that is not positive; NaN stays NaN."""
    reference = np.arange(1.0, 31.0) ** 2  # 1, 4, ..., 900: the top three over 729 = 27^2
    s = np.mean([784.0, 841.0, 900.0]) - 729.0
    values = np.array([0.0, 900.0, 900.0 + s, 900.0 + 10 * s, np.nan, np.inf])
    p = np.array([(1 + np.sum(reference >= v)) / 31 for v in values[:2]])
    expected = np.r_[-np.log(p), np.log(31) + 1, np.log(31) + 10, np.nan, np.inf]
    got = surprisal(reference, values, tail=True)
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=1e-15)
    # Continuous at the largest reference, where the conformal surprisal stops at log(n + 1) - log 2.
    assert surprisal(reference, [np.nextafter(900.0, np.inf)], tail=True)[0] == pytest.approx(np.log(31))
    # No positive excess (ties at the top; one value): the model's own slope, one per unit.
    assert ensemble.tail_scale(np.array([1.0, 5.0, 5.0])) == 1.0 == ensemble.tail_scale(np.array([3.0]))
    # member_scores applies it to every term of every member.
    refs = [{t: reference for t in terms(FISHER_TAIL, "latent")}] * 2
    rows = [{t: values[:4] for t in terms(FISHER_TAIL, "latent")}] * 2
    np.testing.assert_allclose(member_scores(FISHER_TAIL, refs, rows), np.c_[expected[:4], expected[:4]])
