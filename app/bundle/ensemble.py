"""Putting an ensemble's members on one scale and combining them (issue 16).

Each member m has reference values r_m (its values of held-out normal rows). A new row's value v
is put on their scale as its rank among them, the empirical distribution function
F_m(v) = #{r_m <= v} / n_m in [0, 1], or as the surprisal -log p of its conformal p-value
p = (1 + #{r_m >= v}) / (n_m + 1); each member scores the row so, and the ensemble's score is the
mean of the members' scores. Ranks and p-values rather than values standardised by a centre and a
spread: members' scores differ in scale by orders of magnitude and
in tail weight (a volume term can explode on a few rows), and a rank caps what one member can add,
so no member dominates the mean; on the paper's ten datasets (issue 16's study, five splits) rank
averaging matched or beat median/IQR standardisation for every score tried. A rank is also what a
conformal p-value is made of, so the ensemble's own calibration and p-values follow as for one model.

What is ranked, and how, is the combination's (docs/bundle.md 11.2). FACTOR_FISHER, what training
writes, ranks the two factors of each member's density apart: the density of the row's point on the
learned manifold, -(log_prior + log_volume), and the residual's, -log_residual. Summed into
-log p(x), the residual's log-density, a sum of d squared residuals over 2 sigma2, spreads more with
every feature while the manifold's does not, so with many features off-manifold distance decides
alone and a row on the manifold where the density is low looks normal. Apart, each factor counts.
The factors' p-values are combined by Fisher's rule, the sum of their surprisals -log p, not by the
mean of their ranks: a mean caps what one factor can add at 1/2 of the scale, so a row far off the
manifold but with a typical latent density would score as the 88th percentile of normal rows and
go unflagged; a surprisal grows to log(n + 1) for a row beyond all n references. On the paper's
ten datasets (docs/evaluation.md, five splits) this beat ranking -log p(x) whole (RANK_MEAN, the
rule the first ensemble bundles name) on 8 of 10 datasets trained with anomalies (mean AUC 0.746
against 0.723) and 7 of 10 trained clean (0.841 against 0.826), and matched the mean of the
factors' ranks (0.746 and 0.832).

The trainer, the evaluation and the torch backend combine members with the numpy functions here;
the onnx backend runs the same combination inside its merged graph (`emit`, beside them), so one
onnxruntime call, which releases the interpreter's lock, answers for every member: the numpy
combination held it for ~140 us per call whatever the rows (six members, AMD EPYC), which is what a
single-row request to an ensemble paid beyond one model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from app.model.graph import F64, Graph
from app.model.methods import METHODS, PARTS

RANK_MEAN = "rank_mean"
FACTOR_FISHER = "factor_fisher"
# FACTOR_FISHER with each factor's surprisal continued beyond its largest reference value (tail_scale):
# what training writes since session 18.
FISHER_TAIL = "factor_fisher_tail"
COMBINATIONS = (RANK_MEAN, FACTOR_FISHER, FISHER_TAIL)
# The share of a reference set whose mean excess over the next value sets the tail's scale.
TAIL_SHARE = 10
# The factors of each method's density (app.model.methods.PARTS): latent's has no volume or residual
# term, reconstruction's no prior or volume term, so each has one factor.
FACTORS: dict[str, tuple[str, ...]] = {
    "likelihood": ("manifold", "residual"),
    "encoder": ("manifold", "residual"),
    "reconstruction": ("residual",),
    "latent": ("manifold",),
    "projected": ("manifold", "residual"),
}


def _check(combination: str) -> None:
    if combination not in COMBINATIONS:
        raise ValueError(f"unknown ensemble combination {combination!r}; known: {list(COMBINATIONS)}")


def terms(combination: str, method: str) -> tuple[str, ...]:
    """The names of what `combination` ranks of a member's `method` scores: "likelihood" (its -log p(x))
    under RANK_MEAN, "likelihood.manifold" and "likelihood.residual" under FACTOR_FISHER and
    FISHER_TAIL."""
    _check(combination)
    if combination == RANK_MEAN:
        return (method,)
    return tuple(f"{method}.{factor}" for factor in FACTORS[method])


def every_term(combination: str) -> tuple[str, ...]:
    """The terms of every method: the reference values a member of a `combination` bundle holds."""
    return tuple(term for method in METHODS for term in terms(combination, method))


def term_scores(
    combination: str, method: str, parts: Mapping[str, NDArray[np.floating]]
) -> dict[str, NDArray[np.float64]]:
    """Each term of `terms` from a member's outputs of `method` (log_prob and the PARTS), higher =
    more anomalous."""
    part = {name: np.asarray(parts[name], dtype=np.float64) for name in ("log_prob", *PARTS)}
    factor = {"manifold": -(part["log_prior"] + part["log_volume"]), "residual": -part["log_residual"]}
    return {
        term: -part["log_prob"] if term == method else factor[term.split(".", 1)[1]]
        for term in terms(combination, method)
    }


def member_scores(
    combination: str,
    references: Sequence[Mapping[str, NDArray[np.float64]]],
    values: Sequence[Mapping[str, NDArray[np.float64]]],
    ascending: bool = False,
) -> NDArray[np.float64]:
    """(rows, members): each member's score of each row, whose mean over members is the ensemble's.
    RANK_MEAN: the sum over the terms (in a bundle, the one term) of the row's rank among the
    member's references of the term; FACTOR_FISHER: the sum over its terms of the row's surprisal
    among the member's references of that term (Fisher's combination of the factors' p-values);
    FISHER_TAIL: the same with each surprisal continued beyond the largest reference (tail_scale).
    references[m] and values[m] map each term to member m's reference values (sorted if
    `ascending`, as a bundle's are) and to its values of the rows (term_scores)."""
    if not values or any(member.keys() != values[0].keys() for member in values):
        raise ValueError("every member's scores must hold the same terms")
    terms = {term: [np.asarray(member[term], dtype=np.float64) for member in values] for term in values[0]}
    return stacked_member_scores(combination, references, terms, ascending)


def stacked_member_scores(
    combination: str,
    references: Sequence[Mapping[str, NDArray[np.float64]]],
    terms: Mapping[str, NDArray[np.float64] | Sequence[NDArray[np.float64]]],
    ascending: bool = False,
) -> NDArray[np.float64]:
    """member_scores, with each term's values of every member at once: terms[t][m] member m's values
    of term t, an (members, rows) array as a backend's stacked outputs give them, or a list."""
    _check(combination)
    counts = {len(values) for values in terms.values()}
    if not references or counts != {len(references)}:
        given = ", ".join(map(str, sorted(counts)))
        raise ValueError(f"{len(references)} reference sets for {given} members' scores")
    per_term = [
        _members_statistic(combination, [refs[term] for refs in references], values, ascending)
        for term, values in terms.items()
    ]
    return np.ascontiguousarray(np.sum(per_term, axis=0).T)  # (rows, members), rows whole in memory


# Below this many comparisons (members x rows x reference values), a term's counts for every member
# come from one broadcast comparison instead of a binary search per member: what a small request
# costs is Python's overhead per numpy call (a dozen per member and term), not the arithmetic.
BROADCAST_COMPARISONS = 1 << 16


def _members_statistic(
    combination: str,
    references: list[NDArray[np.float64]],
    values: NDArray[np.float64] | Sequence[NDArray[np.float64]],
    ascending: bool,
) -> NDArray[np.float64]:
    """(members, rows): each member's rank or surprisal of its values among its references."""
    n = np.size(references[0])
    broadcast = (
        ascending  # a bundle's references: sorted and finite, checked at load
        and n > 0
        and all(np.size(r) == n for r in references)
        and all(v.ndim == 1 and v.shape == values[0].shape for v in values)
        and len(values) * values[0].size * n <= BROADCAST_COMPARISONS
    )
    tail = combination == FISHER_TAIL
    pairs = zip(references, values, strict=True)
    if not broadcast and combination == RANK_MEAN:
        return np.stack([ranks(r, v, ascending) for r, v in pairs])
    if not broadcast:
        return np.stack([surprisal(r, v, ascending, tail) for r, v in pairs])
    # The counts searchsorted finds in sorted references, exactly: #{r <= v} and #{r >= v}.
    r = np.stack(references)[:, None, :]
    v = values if isinstance(values, np.ndarray) else np.stack(values)
    if combination == RANK_MEAN:
        out = (r <= v[:, :, None]).sum(axis=-1) / n
    else:
        out = np.log(n + 1.0) - np.log1p((r >= v[:, :, None]).sum(axis=-1))
    if tail:  # surprisal's expression beyond each set's largest value
        largest, scales = r[:, :, -1], np.array([[tail_scale(x)] for x in references])
        out = np.where(v > largest, np.log(n + 1.0) + (v - largest) / scales, out)
    return np.where(np.isnan(v), np.nan, out)


def _ordered(reference: NDArray[np.float64], ascending: bool) -> NDArray[np.float64]:
    """The reference sorted. Sorted ones (`ascending`) are a bundle's, which the loader has found
    finite and ascending: a request does not check each again."""
    ordered = np.asarray(reference, dtype=np.float64)
    if not ascending:
        ordered = np.sort(ordered)
        if np.isnan(ordered).any():
            raise ValueError("reference scores must be a non-empty set of numbers")
    if ordered.size == 0:
        raise ValueError("reference scores must be a non-empty set of numbers")
    return ordered


def surprisal(
    reference: NDArray[np.float64], scores: NDArray[np.float64], ascending: bool = False, tail: bool = False
) -> NDArray[np.float64]:
    """-log p(s) for each score, p(s) = (1 + #{r >= s}) / (n + 1) its conformal p-value among the
    reference scores: 0 below them all, log(n + 1) above the largest; NaN scores stay NaN.
    `tail`: above the largest reference r_n, log(n + 1) + (s - r_n) / tail_scale instead.
    `ascending` as for ranks."""
    ordered = _ordered(reference, ascending)
    s = np.asarray(scores, dtype=np.float64)
    at_or_above = ordered.size - np.searchsorted(ordered, s, side="left")
    out = np.log(ordered.size + 1.0) - np.log1p(at_or_above)
    if tail:
        beyond = np.log(ordered.size + 1.0) + (s - ordered[-1]) / tail_scale(ordered)
        out = np.where(s > ordered[-1], beyond, out)
    return np.where(np.isnan(s), np.nan, out)


def tail_scale(ordered: NDArray[np.float64]) -> float:
    """How fast a surprisal grows beyond the largest of n ascending reference values: the mean excess
    of the largest k = max(1, n // TAIL_SHARE) over the next largest, or 1 where that is not positive
    (n = 1, or the top values tied).

    Why a tail at all: a conformal surprisal stops at log(n + 1), so a row twice as far off the
    manifold as any reference and one a thousand times as far score alike, and a row whose other
    factor is typical stays below a threshold that a sum of two factors' surprisals sets near the
    calibration's top: on a 200-feature table with 600 references, up to a third of rows drawn far
    off the manifold went unflagged at a false-positive rate of 0.01 (benchmarks/far_rows.py).
    Why this slope: each factor is a negative log-density, whose upper tail falls by a factor e per
    unit under the model (Gaussian noise, a Gaussian-mixture prior: gamma tails), a slope the top
    decile's mean excess estimates without trusting the model; 1, the model's own, where it cannot.
    The ensemble's flags and p-values come from its calibration rows' scores, so their false-positive
    rate holds whatever this slope; the ten datasets' AUC did not move (0.773 -> 0.774 trained with
    anomalies, 0.860 -> 0.859 clean, session 17's member scores combined both ways)."""
    n = ordered.size
    k = max(1, n // TAIL_SHARE)
    scale = float(np.mean(ordered[n - k :]) - ordered[n - k - 1]) if n > k else 0.0
    return scale if scale > 0 else 1.0


def ranks(
    reference: NDArray[np.float64], scores: NDArray[np.float64], ascending: bool = False
) -> NDArray[np.float64]:
    """F(s) = #{r <= s} / n for each score: 0 below every reference score, 1 at or above the largest.
    `reference` need not be sorted unless `ascending` says it is (a bundle's, checked at load: a
    request then skips the sort); NaN scores stay NaN."""
    ordered = _ordered(reference, ascending)
    s = np.asarray(scores, dtype=np.float64)
    out = np.searchsorted(ordered, s, side="right") / ordered.size
    return np.where(np.isnan(s), np.nan, out)


# What an ensemble's merged graph answers (app.bundle.graphs): each member's score, the members'
# means of their outputs and, for an explanation, the root mean square of their whitened residuals
# (what assemble_members computes from the members' outputs).
COMBINED_OUTPUTS = ("member_scores", "log_prob", *PARTS, "reconstruction_error", "residual")


def emit(
    g: Graph,
    combination: str,
    method: str,
    stacked: Mapping[str, str],
    references: Sequence[Mapping[str, NDArray[np.float64]]],
    whitening: Sequence[NDArray[np.float64] | None],
) -> dict[str, str]:
    """The combination's nodes in `g`, reading each of the members' outputs (app.model.methods
    OUTPUTS) stacked in member order: stacked[name] an (M, B) tensor, (M, B, d) for residual, float32
    or float64. references[m] are member m's sorted reference values of each term (a bundle's),
    whitening[m] its residual's whitening factors (None: isotropic). Returns each of COMBINED_OUTPUTS
    and the tensor holding it, float64: member_scores (B, M), bit for bit stacked_member_scores';
    the means (B,) and residual (B, d) as assemble_members computes them, to the rounding of a sum
    of M values (onnxruntime may add them in another order).

    A reference set's count of values below (or at) a row's value is a branchless binary search:
    references padded with +inf to 2^K - 1 values, K halving steps of a gather and a comparison.
    That is exact, as searchsorted is, and costs K steps over M x B values where comparing every
    row with every reference would cost M x B x n."""
    from onnx import numpy_helper

    _check(combination)
    members = len(references)
    f64 = {name: g.cast(tensor, F64) for name, tensor in stacked.items()}
    names = terms(combination, method)
    factor = {
        "manifold": lambda: g.op("Neg", g.add(f64["log_prior"], f64["log_volume"])),
        "residual": lambda: g.op("Neg", f64["log_residual"]),
    }
    values = [g.op("Neg", f64["log_prob"]) if t == method else factor[t.split(".", 1)[1]]() for t in names]
    v = g.op("Concat", *values, axis=0) if len(values) > 1 else values[0]  # (T M, B): term-major
    sets = [np.asarray(refs[t], np.float64) for t in names for refs in references]
    counts = np.array([[r.size] for r in sets], np.float64)  # (T M, 1)
    steps = max(1, int(np.ceil(np.log2(counts.max() + 1))))
    padded = np.full((len(sets), 2**steps - 1), np.inf)
    for row, r in zip(padded, sets, strict=True):
        row[: r.size] = r
    table = g.const(padded, np.float64)
    # below + 1 counts the references below v (RANK_MEAN: at or below); below starts at -1, and at a
    # halving step s looks at below + s, within the table since earlier steps added at most 2^K - 2s.
    below = g.op("ConstantOfShape", g.op("Shape", v), value=numpy_helper.from_array(np.array([-1], np.int64)))
    compare = "LessOrEqual" if combination == RANK_MEAN else "Less"
    for k in reversed(range(steps)):
        probe = g.add(below, g.const(np.array(2**k), np.int64))
        found = g.op(compare, g.op("GatherElements", table, probe, axis=1), v)
        below = g.where(found, probe, below)
    if combination == RANK_MEAN:  # #{r <= v} / n, the +inf padding counted only for v = +inf
        n = g.const(counts, np.float64)
        counted = g.add(g.cast(below, F64), g.const(np.array(1.0), np.float64))
        statistic = g.div(g.op("Min", counted, n), n)
    else:
        # Looked up, not computed: each set's surprisal of every count k = #{r >= v} in 0..n, by the
        # numpy expression `surprisal` evaluates, so the graph's scores are numpy's to the bit. A
        # logarithm of onnxruntime's differs in the last place from numpy's for about a fifth of the
        # integers, and an ensemble score (a sum of a few such values) often equals a calibration
        # score exactly: an ulp would decide its p-value and flag.
        surprisals = np.zeros((len(sets), int(counts.max()) + 1))
        for row, r in zip(surprisals, sets, strict=True):
            row[: r.size + 1] = np.log(r.size + 1.0) - np.log1p(np.arange(r.size + 1))
        at_or_above = g.sub(g.const(counts.astype(np.int64) - 1, np.int64), below)  # n - (below + 1)
        statistic = g.op("GatherElements", g.const(surprisals, np.float64), at_or_above, axis=1)
        if combination == FISHER_TAIL:  # beyond the largest reference: surprisal's expression
            largest = g.const(np.array([[r[-1]] for r in sets]), np.float64)
            scales = g.const(np.array([[tail_scale(r)] for r in sets]), np.float64)
            log_n1 = g.const(np.array([[np.log(r.size + 1.0)] for r in sets]), np.float64)  # as numpy
            beyond = g.add(log_n1, g.div(g.sub(v, largest), scales))
            statistic = g.where(g.op("Greater", v, largest), beyond, statistic)
    statistic = g.where(g.op("IsNaN", v), g.const(np.array(np.nan), np.float64), statistic)
    # The sum of at most two terms, as numpy's; the members' mean is assemble_combined's, in numpy,
    # as assemble_members takes it: the score is then the same to the bit.
    shape = g.const(np.array([len(names), members, -1]), np.int64)
    per_member = g.sum(g.op("Reshape", statistic, shape), 0)  # (M, B)
    out = {"member_scores": g.op("Transpose", per_member, perm=[1, 0])}
    for name in ("log_prob", *PARTS, "reconstruction_error"):
        out[name] = g.op("ReduceMean", f64[name], axes=[0], keepdims=0)
    residual = f64["residual"]
    if any(r is not None for r in whitening):
        d = next(r.size for r in whitening if r is not None)
        factors = np.stack([np.ones(d) if r is None else np.asarray(r, np.float64) for r in whitening])
        residual = g.mul(residual, g.const(factors[:, None, :], np.float64))
    out["residual"] = g.op("Sqrt", g.op("ReduceMean", g.mul(residual, residual), axes=[0], keepdims=0))
    return out
