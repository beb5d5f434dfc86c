"""Fitting: the WAE objective (paper eq. 1), candidates trained together, noise by maximum likelihood.

Candidates that share an architecture differ only in beta and the kernel width, so their
parameters are stacked along a leading axis and one batched forward pass (the same `mlp_forward`
the networks use, with batched matrix products) trains all of them at once; Adam is elementwise,
so this is exactly C independent optimisations that share the mini-batch sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from torch.func import stack_module_state

from app.model.manifold import ManifoldModel
from app.model.methods import OUTPUTS
from app.model.scores import (
    ScoreParts,
    effective_dimensions,
    laplace_parts,
    map_point,
    score,
    scoring_dtype,
    whitened,
)
from app.train.options import Candidate, FitOptions, NoiseModel

SIGMA2_FLOOR = 1e-8  # a perfect reconstruction must not give an infinite density
# A feature's noise variance is at least this share of the features' mean. A feature the networks
# reconstruct almost exactly (a column derived from others) would otherwise weigh its residual
# without bound, and a product computed in float32 cannot resolve a residual much below 1e-3 of
# the others': its term would carry the rounding of x - f(z), not the row.
RELATIVE_VARIANCE_FLOOR = 1e-2


@dataclass
class Fitted:
    candidate: Candidate
    model: ManifoldModel
    loss_curve: list[float]


def imq_mmd(z: Tensor, y: Tensor, width: Tensor) -> Tensor:
    """Unbiased MMD^2 with the inverse multiquadric kernel c / (c + |a - b|^2).

    z, y (C, n, k) samples of two distributions per candidate, width (C,) -> (C,).
    """
    c = width.view(-1, 1, 1)
    n = z.shape[-2]

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        sq = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)
        return c / (c + sq.clamp(min=0))

    off_diagonal = 1 - torch.eye(n, dtype=z.dtype, device=z.device)
    within = ((kernel(z, z) + kernel(y, y)) * off_diagonal).sum((-1, -2)) / (n * (n - 1))
    return within - 2 * kernel(z, y).mean((-1, -2))


def trimmed(errors: Tensor, z: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Per candidate, the `keep` rows of a batch with the smallest reconstruction error: errors
    (C, B) -> (C, keep) and their codes z (C, B, k) -> (C, keep, k).

    Generative models fit inliers before outliers (ODIM, Kim et al. 2023): the rows worst
    reconstructed are the likeliest anomalies in a contaminated table, and a trimmed step leaves
    them out of both terms of the objective. The choice is not differentiated through."""
    if keep >= errors.shape[-1]:
        return errors, z
    kept = errors.detach().topk(keep, dim=-1, largest=False).indices
    return errors.gather(-1, kept), z.gather(-2, kept.unsqueeze(-1).expand(*kept.shape, z.shape[-1]))


def _adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam with one fused kernel per parameter (PyTorch >= 2.4 on CPU), else multi-tensor Adam:
    the per-tensor loop of the default costs a step about a millisecond of Python."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr, foreach=True)


def _fit_group(
    x: Tensor, candidates: list[Candidate], opts: FitOptions, progress: Callable[[int], None] | None
) -> list[Fitted]:
    n, d = x.shape
    arch = candidates[0].architecture(d)
    torch.manual_seed(opts.seed)
    batches = torch.Generator(device="cpu").manual_seed(opts.seed)
    models = [ManifoldModel(arch) for _ in candidates]
    if arch.prior in ("vamp", "vmf"):
        for model in models:  # pseudo-inputs start at training rows, where the encoder is meaningful
            rows = torch.randint(n, (arch.components,), generator=batches)
            model.prior.pseudo_inputs.data.copy_(x[rows].cpu())
    models = [m.to(opts.device) for m in models]
    params, buffers = stack_module_state(models)

    beta = torch.tensor([c.beta for c in candidates], dtype=x.dtype, device=opts.device)
    width = torch.tensor([c.kernel_width for c in candidates], dtype=x.dtype, device=opts.device)
    optimizer = _adam(list(params.values()), opts.lr)
    every = max(1, opts.steps // opts.curve_points)
    curves: list[list[float]] = [[] for _ in candidates]
    running = torch.zeros(len(candidates), dtype=torch.float64, device=opts.device)
    batch = min(opts.batch_size, n)
    # At least two rows stay: the MMD term compares pairs. The epsilon keeps 0.29 x 100 at 29.
    keep = max(min(2, batch), batch - math.floor(opts.trim * batch + 1e-9))
    for step in range(1, opts.steps + 1):
        rows = torch.randint(n, (min(opts.batch_size, n),), generator=batches)
        xb = x[rows]
        z, x_hat, prior = ManifoldModel.stacked_forward(arch, params, xb)
        squared = (x_hat - xb) ** 2
        if keep < xb.shape[0]:
            errors, z = trimmed(squared.mean(-1), z, keep)
            reconstruction = errors.mean(-1)
        else:  # the untrimmed objective, summed as it always was: the same weights, bit for bit
            reconstruction = squared.mean((-1, -2))
        y = prior.rsample(z.shape[-2])
        loss = reconstruction + beta * imq_mmd(z, y, width)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        running += loss.detach().double()
        if step % every == 0 or step == opts.steps:
            span = every if step % every == 0 else step % every
            for curve, value in zip(curves, (running / span).tolist(), strict=True):
                curve.append(value)
            running.zero_()
        if progress is not None:
            progress(1)
    fitted = []
    for i, (candidate, model) in enumerate(zip(candidates, models, strict=True)):
        model.load_state_dict(
            {k: v[i].detach() for k, v in params.items()} | {k: v[i] for k, v in buffers.items()}
        )
        fitted.append(Fitted(candidate, model.eval(), curves[i]))
    return fitted


def fit_candidates(
    x_train: NDArray[np.float64],
    candidates: Iterable[Candidate],
    opts: FitOptions,
    progress: Callable[[int], None] | None = None,
) -> list[Fitted]:
    """Train every candidate on the standardised rows; candidates sharing an architecture together."""
    x = torch.as_tensor(x_train, dtype=torch.float32, device=opts.device)
    candidates = list(candidates)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(c.group(), []).append(i)
    fitted: list[Fitted | None] = [None] * len(candidates)
    # A step multiplies 100 rows by tens of units: one thread fits as fast as two on a quiet machine
    # (the default ensemble on breast cancer, 2 cores: 18.6 s against 17.7 s), and where another
    # process holds a core, intra-op threads wait on each other (19 s against 66 s; 23 s against
    # 765 s in an audit). The caller's setting is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for indices in groups.values():
            for i, f in zip(
                indices, _fit_group(x, [candidates[i] for i in indices], opts, progress), strict=True
            ):
                fitted[i] = f
    finally:
        torch.set_num_threads(threads)
    return [f for f in fitted if f is not None]


# Per row: the method's outputs but the residual vector, and |residual|^2 in log_residual's directions
SCORED_PARTS = (*OUTPUTS[:-1], "residual_sq")


def score_rows(
    model: ManifoldModel, x: NDArray[np.float64], method: str, chunk_rows: int = 65_536
) -> dict[str, NDArray[np.float64]]:
    """Score standardised rows in bounded-memory chunks, in the precision the product scores `method`
    in; numpy arrays of the parts (and `converged` for projected), in row order."""
    model = model.with_dtype(scoring_dtype(method, model.dtype))
    reference = next(model.parameters())
    out: dict[str, list[NDArray[np.float64]]] = {}
    with torch.no_grad():
        generative = model.generative()
        for start in range(0, x.shape[0], chunk_rows):
            xb = torch.as_tensor(
                x[start : start + chunk_rows], dtype=reference.dtype, device=reference.device
            )
            for name, values in _arrays(score(generative, xb, method)).items():
                out.setdefault(name, []).append(values)
    return {k: np.concatenate(v) for k, v in out.items()}


def _arrays(parts: ScoreParts) -> dict[str, NDArray[np.float64]]:
    arrays = {name: getattr(parts, name).double().cpu().numpy() for name in SCORED_PARTS}
    if parts.converged is not None:
        arrays["converged"] = parts.converged.cpu().numpy()
    return arrays


# The evidence fixed point of the projected model's noise stops when sigma^2 would move by at most
# this fraction, or after NOISE_ITERATIONS projections of the validation rows.
NOISE_TOLERANCE = 1e-4
NOISE_ITERATIONS = 20


def feature_variances(
    model: ManifoldModel, x: NDArray[np.float64], chunk_rows: int = 65_536
) -> NDArray[np.float64]:
    """Each feature's mean squared residual x - f(g(x)) over the rows (d,), the networks in their
    own dtype as `reconstruction` scores them."""
    reference = next(model.parameters())
    total = np.zeros(x.shape[1])
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk_rows):
            xb = torch.as_tensor(
                x[start : start + chunk_rows], dtype=reference.dtype, device=reference.device
            )
            e = (xb - model.decoder(model.encoder(xb))).double()
            total += (e * e).sum(0).cpu().numpy()
    return total / x.shape[0]


def fit_noise(
    model: ManifoldModel,
    x_val: NDArray[np.float64],
    noise: NoiseModel = "diagonal",
    chunk_rows: int = 65_536,
) -> dict[str, NDArray[np.float64]]:
    """Maximum-likelihood noise from held-out rows; returns x_val's `projected` parts.

    The residual x - f(g(x)) is modelled as N(0, sigma2 diag(w)) (likelihood, encoder,
    reconstruction). "diagonal": each feature's variance v_j is its mean squared residual,
    floored at RELATIVE_VARIANCE_FLOOR times their mean; sigma2 is their geometric mean and
    w = v / sigma2, so sum log w = 0. "isotropic" (the paper's sigma2 I): sigma2 = mean v_j, no w.
    sigma2_projected: the maximum of the rows' Laplace evidence (the projected density, noise
    sigma2_projected diag(w)) over its scale. Its stationarity condition is MacKay's fixed point
    sigma^2 = sum |r (x - f(z*))|^2 / sum (d - gamma), r = 1 / sqrt(w), gamma = tr(H^-1 J^T J /
    sigma^2) the latent directions the data determine, all in the whitened coordinates; it is
    iterated from sigma2, each pass projecting x_val anew. With d = m no direction is left to
    estimate it from, and sigma2 is used. The parts returned are those of the last pass, scored
    with the sigma2_projected it ends with, so a caller need not project x_val again.
    """
    d, m = x_val.shape[1], model.arch.intrinsic_dim
    variances = feature_variances(model, x_val, chunk_rows)
    mean = float(variances.mean())
    if noise == "isotropic" or d == 1:
        model.sigma2, model.relative_variance = max(mean, SIGMA2_FLOOR), None
    else:
        variances = np.maximum(variances, max(RELATIVE_VARIANCE_FLOOR * mean, SIGMA2_FLOOR))
        model.sigma2 = float(np.exp(np.log(variances).mean()))
        model.relative_variance = tuple(float(v) for v in variances / model.sigma2)
    model.sigma2_projected = model.sigma2
    if d <= m:
        return score_rows(model, x_val, "projected")
    precise = model.with_dtype(scoring_dtype("projected", model.dtype))
    x = torch.as_tensor(x_val, dtype=precise.dtype, device=next(precise.parameters()).device)
    chunks = x.split(chunk_rows)  # as score_rows, so the parts returned are exactly its
    with torch.no_grad():
        generative = precise.generative()
        isotropic, r = whitened(generative, x)
        starts = [generative.encoder(chunk) for chunk in chunks]
        targets = chunks if r is None else [chunk * r for chunk in chunks]
        for iteration in range(NOISE_ITERATIONS):
            sigma2 = model.sigma2_projected
            points = [
                map_point(isotropic, chunk, start, sigma2)
                for chunk, start in zip(targets, starts, strict=True)
            ]
            squared = sum(float((p.residual * p.residual).sum()) for p, _ in points)
            free = sum(float((d - effective_dimensions(p)).sum()) for p, _ in points)
            updated = max(squared / free, SIGMA2_FLOOR)
            if abs(updated - sigma2) <= NOISE_TOLERANCE * sigma2 or iteration == NOISE_ITERATIONS - 1:
                break
            model.sigma2_projected = updated
    # map_point with this sigma2 from g(x), as scoring does: these are x_val's projected parts.
    parts = [
        _arrays(laplace_parts(point, converged, sigma2, precise.dtype, model.relative_variance))
        for point, converged in points
    ]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
