"""The interface every scoring backend implements, and the output they share.

Torch-free: the onnx backend (the CPU default) never imports PyTorch, so a CPU deployment can
leave it out. Outputs are plain numpy arrays in input row order, shared by the command line and
the service; app.engine.factory creates a backend by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from app.bundle import ensemble
from app.bundle.format import Bundle, EnsembleBundle, Threshold, members_of
from app.engine.errors import ScoringFailed
from app.model.methods import check_method
from app.model.noise import whitening_factors

# Members stacked along a leading axis (both backends) run each operation on M times a member's
# rows, and past this many member rows per call their tensors outgrow a CPU's caches: 1024-row
# calls of four stacked latent-4 members ran 15% slower than four single-member calls in
# onnxruntime and up to four times slower in torch, 256-row calls as fast (AMD EPYC, 2026-12-02).
# So on CPU a stack of M is called on row blocks of at most MEMBER_ROWS / M rows.
MEMBER_ROWS = 1024


@dataclass(frozen=True)
class ScoreOutput:
    method: str
    threshold: Threshold
    # higher = more anomalous: -log_likelihood, or the mean of an ensemble's member_scores
    score: NDArray[np.float64]
    log_likelihood: NDArray[np.float64]
    log_prior: NDArray[np.float64]
    log_volume: NDArray[np.float64]
    log_residual: NDArray[np.float64]
    reconstruction_error: NDArray[np.float64]  # |x - x'|^2 in standardised units
    p_value: NDArray[np.float64]
    is_anomaly: NDArray[np.bool_]
    residual_share: NDArray[np.float64] | None  # (n, d): each feature's share of the squared residual
    # (n, len(bundle.constants)): the row's value differs from a column's training constant. Such a
    # row lies where no training row did, density 0: p-value 0 and flagged, whatever its score.
    constant_mismatch: NDArray[np.bool_]
    # An ensemble's (n, members): each member's score of the row against its reference values
    # (app.bundle.ensemble.member_scores), whose mean is `score`; None for a single model.
    member_scores: NDArray[np.float64] | None = None

    def rows(self, start: int, stop: int) -> ScoreOutput:
        """The same output restricted to rows start..stop-1 (for a coalesced batch's requests)."""
        part = slice(start, stop)
        return replace(
            self,
            score=self.score[part],
            log_likelihood=self.log_likelihood[part],
            log_prior=self.log_prior[part],
            log_volume=self.log_volume[part],
            log_residual=self.log_residual[part],
            reconstruction_error=self.reconstruction_error[part],
            p_value=self.p_value[part],
            is_anomaly=self.is_anomaly[part],
            residual_share=None if self.residual_share is None else self.residual_share[part],
            constant_mismatch=self.constant_mismatch[part],
            member_scores=None if self.member_scores is None else self.member_scores[part],
        )

    def columns(self, constants: list[str]) -> dict[str, NDArray[np.generic]]:
        """The per-row columns of `anomaly-scores score`, in their documented order; with constant
        columns (their names in the bundle's order), `constant_mismatch` last."""
        out: dict[str, NDArray[np.generic]] = {
            "score": self.score,
            "log_likelihood": self.log_likelihood,
            "log_prior": self.log_prior,
            "log_volume": self.log_volume,
            "log_residual": self.log_residual,
            "reconstruction_error": self.reconstruction_error,
            "p_value": self.p_value,
            "is_anomaly": self.is_anomaly,
        }
        if constants:
            names = mismatch_names(self.constant_mismatch, constants)
            out["constant_mismatch"] = np.asarray([";".join(row) for row in names], dtype=object)
        return out


def mismatch_names(mismatch: NDArray[np.bool_], constants: list[str]) -> list[list[str]]:
    """Per row, the constant columns whose value differs from training, in the bundle's order."""
    if not mismatch.any():
        return [[] for _ in range(mismatch.shape[0])]
    return [[constants[j] for j in np.flatnonzero(row)] for row in mismatch]


class Scorer(Protocol):
    bundle: Bundle
    backend: str
    methods: tuple[str, ...]  # the methods this backend can score for its bundle

    def score(
        self,
        x_raw: NDArray[np.floating],
        method: str | None = None,
        fpr: float | None = None,
        explain: bool = False,
    ) -> ScoreOutput: ...


def method_or_default(method: str | None, bundle: Bundle) -> str:
    return check_method(method or bundle.default_method)


def _check_shapes(
    bundle: Bundle,
    method: str,
    parts: dict[str, NDArray[np.generic]],
    rows: int,
    what: str = "",
    shape: tuple[int, ...] | None = None,
) -> None:
    """Every output has one entry per input row: an answer never pairs a score with the wrong row,
    whatever the backend did. `shape`: what every part's shape must be, if not the output's own."""
    shapes = {"residual": (rows, len(bundle.features)), "constant_mismatch": (rows, len(bundle.constants))}
    for name, values in parts.items():
        expected = shape or shapes.get(name, (rows,))
        if values.shape != expected:
            raise ScoringFailed(
                f"the scoring of {method!r}{what} returned {name} of shape {values.shape} for {rows} rows "
                f"(expected {expected}): the bundle {bundle.path} is broken",
                {"method": method, "output": name, "shape": list(values.shape), "expected": list(expected)},
            )


def assemble_members(
    bundle: Bundle,
    method: str,
    fpr: float | None,
    members: list[dict[str, NDArray[np.floating]]],
    explain: bool,
    rows: int,
    constant_mismatch: NDArray[np.bool_],
) -> ScoreOutput:
    """assemble for the outputs of each of the bundle's members (app.bundle.format.members_of). An
    ensemble's score is the mean of the members' scores by its combination (app.bundle.ensemble);
    its log-likelihood, parts, reconstruction error and residual are the members' means, reported
    beside it."""
    if isinstance(bundle, EnsembleBundle) and len(members) != len(bundle.members):
        raise ScoringFailed(
            f"the scoring of {method!r} returned {len(members)} members' outputs for "
            f"{len(bundle.members)} members: the bundle {bundle.path} is broken",
            {"method": method},
        )
    single = not isinstance(bundle, EnsembleBundle)
    for i, parts in enumerate(members):  # before the residuals are whitened, which would broadcast
        _check_shapes(bundle, method, parts, rows, "" if single else f" (member {i})")
    if explain:
        members = [_whitened(owner, parts) for owner, parts in zip(members_of(bundle), members, strict=True)]
    if single:
        return assemble(bundle, method, fpr, members[0], explain, rows, constant_mismatch)
    # (members, rows) per output: the terms, references and means below as whole-array operations,
    # since per-member Python work, not arithmetic, is what a small request's answer costs.
    stacked = {name: np.stack([p[name] for p in members]).astype(np.float64) for name in members[0]}
    member_scores = ensemble.stacked_member_scores(
        bundle.combination,
        [member.calibration for member in bundle.members],
        ensemble.term_scores(bundle.combination, method, stacked),
        ascending=True,
    )
    mean = {name: values.mean(axis=0) for name, values in stacked.items() if name != "residual"}
    if explain:
        # The root mean square over members: assemble squares it, so each feature's share is that of
        # the members' mean squared residual, where members' residuals of opposite sign cannot cancel.
        mean["residual"] = np.sqrt(np.mean(stacked["residual"] ** 2, axis=0))
    return assemble(
        bundle,
        method,
        fpr,
        mean | {"score": member_scores.mean(axis=1)},
        explain,
        rows,
        constant_mismatch,
        member_scores,
    )


def assemble_combined(
    bundle: EnsembleBundle,
    method: str,
    fpr: float | None,
    combined: dict[str, NDArray[np.floating]],
    explain: bool,
    rows: int,
    constant_mismatch: NDArray[np.bool_],
) -> ScoreOutput:
    """assemble for outputs the members' combination has already made (app.bundle.ensemble.emit,
    inside the onnx backend's graph): what assemble_members computes from the members' outputs, the
    score the same to the bit (the mean of the same member scores, taken the same way)."""
    member_scores = np.ascontiguousarray(combined["member_scores"], dtype=np.float64)
    _check_shapes(bundle, method, {"member_scores": member_scores}, rows, shape=(rows, len(bundle.members)))
    parts = {name: values for name, values in combined.items() if name != "member_scores"}
    parts["score"] = member_scores.mean(axis=1)
    return assemble(bundle, method, fpr, parts, explain, rows, constant_mismatch, member_scores)


def _whitened(member: Bundle, parts: dict[str, NDArray[np.floating]]) -> dict[str, NDArray[np.floating]]:
    """parts with the residual over the square roots of the member's relative noise variances: each
    feature's share of its square is then its share of the residual term the score charges."""
    r = whitening_factors(member.relative_variance)
    return parts if r is None else parts | {"residual": np.asarray(parts["residual"], np.float64) * r}


def assemble(
    bundle: Bundle,
    method: str,
    fpr: float | None,
    parts: dict[str, NDArray[np.floating]],
    explain: bool,
    rows: int,
    constant_mismatch: NDArray[np.bool_],
    member_scores: NDArray[np.float64] | None = None,
) -> ScoreOutput:
    """Turn a backend's outputs (app.model.methods.OUTPUTS; `residual` only when explaining) for
    `rows` input rows into scores, p-values and flags at the threshold of `fpr` (default: the
    bundle's). The score is -log_prob unless `parts` holds a `score` (an ensemble's).
    `constant_mismatch` is Bundle.split_columns' verdict on the same rows."""
    _check_shapes(bundle, method, {**parts, "constant_mismatch": constant_mismatch}, rows)
    threshold = bundle.threshold(method, bundle.default_fpr if fpr is None else fpr)
    log_likelihood = np.asarray(parts["log_prob"], dtype=np.float64)
    score = np.asarray(parts["score"], dtype=np.float64) if "score" in parts else -log_likelihood
    # A score that is not a number (arithmetic that overflowed on a row far outside the data) ranks
    # above every calibration score, as p_values puts it: flagged, with p = 1/(n + 1).
    p_value, is_anomaly = bundle.p_values(method, score), ~(score <= threshold.value)
    if constant_mismatch.any():
        off = constant_mismatch.any(axis=1)
        p_value[off], is_anomaly[off] = 0.0, True
    share = None
    if explain:
        e2 = np.asarray(parts["residual"], dtype=np.float64) ** 2
        share = e2 / np.maximum(e2.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return ScoreOutput(
        method=method,
        threshold=threshold,
        score=score,
        log_likelihood=log_likelihood,
        log_prior=np.asarray(parts["log_prior"], dtype=np.float64),
        log_volume=np.asarray(parts["log_volume"], dtype=np.float64),
        log_residual=np.asarray(parts["log_residual"], dtype=np.float64),
        reconstruction_error=np.asarray(parts["reconstruction_error"], dtype=np.float64),
        p_value=p_value,
        is_anomaly=is_anomaly,
        residual_share=share,
        constant_mismatch=constant_mismatch,
        member_scores=member_scores,
    )
