"""Anomaly scores of a generative model, for a whole batch at once.

Every function returns `ScoreParts`: the log-density `log_prob` (higher = more normal) together
with the parts it sums, log_prob = log_prior + log_volume + log_residual, so a caller can see why a
row scored as it did. The anomaly score is -log_prob.

  likelihood      paper eq. 7: log p(z) - sum_i log s_i(J_f(z) B(z)) + log N(x - f(z); 0, sigma^2 I), z = g(x)
  encoder         paper eq. 8: log p(g(x')) + sum_i log r_i(B^T J_g(x')) + log N(x - x'; 0, sigma^2 I)
  reconstruction  paper eq. 4: log N(x - f(g(x)); 0, sigma^2 I)
  latent          log p(g(x)), the paper's Fig. 1b
  projected       z refined by Gauss-Newton on |x - f(z)|^2, residual only in the d - m normal directions

B(z) is an orthonormal tangent basis (identity for Euclidean latents), m the manifold's dimension.
Singular values are floored at SINGULAR_VALUE_FLOOR so a degenerate Jacobian gives a large finite
volume term instead of -inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from app.geometry import restrict_to_tangent, retract, tangent_basis
from app.model import GenerativeModel

SINGULAR_VALUE_FLOOR = 1e-12
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class ScoreParts:
    log_prob: Tensor  # (B,) log p(x) under the method; the anomaly score is its negative
    log_prior: Tensor  # (B,) log p(z) at the latent point used
    log_volume: Tensor  # (B,) signed change-of-variables term (-sum log s for f, +sum log r for g)
    log_residual: Tensor  # (B,) log-density of the residual e
    reconstruction_error: Tensor  # (B,) |x - x'|^2 over all d coordinates
    residual_sq: Tensor  # (B,) squared norm of the residual in log_residual (normal part for projected)
    z: Tensor  # (B, k) latent point used
    x_hat: Tensor  # (B, d) its image x' = f(z)

    @property
    def score(self) -> Tensor:
        return -self.log_prob


def log_normal_residual(e: Tensor, sigma2: float, dims: int) -> Tensor:
    """log N(e; 0, sigma2 I_dims) for e (B, ...) whose squared norm lives in `dims` directions."""
    return log_normal_of_squared((e * e).sum(-1), sigma2, dims)


def log_normal_of_squared(squared: Tensor, sigma2: float, dims: int) -> Tensor:
    """The same from |e|^2 (B,): a new sigma2 rescores residuals without recomputing them."""
    return -0.5 * squared / sigma2 - 0.5 * dims * (LOG_2PI + math.log(sigma2))


def sum_log_singular_values(J: Tensor) -> Tensor:
    """(B, p, q) -> (B,) sum of log singular values, each floored at SINGULAR_VALUE_FLOOR.

    For a d x m Jacobian of rank m this is log sqrt(det(J^T J)), the log of the m-volume
    stretching factor.
    """
    # In float64 even for float32 networks: small singular values of a graded Jacobian keep their
    # relative accuracy, and the result matches the exported graph's float64 factorisation.
    s = torch.linalg.svdvals(J.double())
    return torch.log(torch.clamp(s, min=SINGULAR_VALUE_FLOOR)).sum(-1).to(J.dtype)


def _parts(
    log_prior: Tensor,
    log_volume: Tensor,
    log_residual: Tensor,
    e: Tensor,
    z: Tensor,
    x_hat: Tensor,
    e_scored: Tensor | None = None,
) -> ScoreParts:
    total = log_prior + log_volume + log_residual
    e2 = (e * e).sum(-1)
    scored = e2 if e_scored is None else (e_scored * e_scored).sum(-1)
    return ScoreParts(total, log_prior, log_volume, log_residual, e2, scored, z, x_hat)


def _check_shapes(model: GenerativeModel, x: Tensor, x_hat: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be a (batch, features) matrix, got shape {tuple(x.shape)}")
    if x_hat.shape != x.shape:
        raise ValueError(f"the decoder maps to {x_hat.shape[-1]} features but x has {x.shape[-1]}")
    if model.intrinsic_dim > x.shape[1]:
        raise ValueError(
            f"latent size {model.intrinsic_dim} exceeds the data size {x.shape[1]}: "
            "no manifold of that dimension fits in the data space"
        )


def _require_encoder(model: GenerativeModel, method: str) -> Callable[[Tensor], Tensor]:
    if model.encoder is None:
        raise ValueError(f"the {method!r} score needs an encoder; use 'projected' for a decoder alone")
    return model.encoder


def likelihood(model: GenerativeModel, x: Tensor) -> ScoreParts:
    """Paper eq. 7 with the volume term sum(log s), not twice it (method notes, departure 1)."""
    z = _require_encoder(model, "likelihood")(x)
    x_hat, J = model.decoder.forward_with_jacobian(z)  # (B, d), (B, d, k)
    _check_shapes(model, x, x_hat)
    e = x - x_hat
    log_prior = model.prior.log_prob(z)
    log_volume = -sum_log_singular_values(restrict_to_tangent(J, z, model.geometry))
    log_residual = log_normal_residual(e, model.sigma2, x.shape[1])
    return _parts(log_prior, log_volume, log_residual, e, z, x_hat)


def encoder(model: GenerativeModel, x: Tensor) -> ScoreParts:
    """Paper eq. 8: the encoder maps the manifold to the latent space, hence +sum(log r).

    The Jacobian is taken at x' = f(g(x)), on the manifold (method notes, departure 3); on the
    sphere only its tangent-space part B(z')^T J_g counts, which drops the zero singular value of
    the normalisation.
    """
    g = _require_encoder(model, "encoder")
    z0 = g(x)
    x_hat = model.decoder(z0)
    _check_shapes(model, x, x_hat)
    z, J = model.encoder.forward_with_jacobian(x_hat)  # (B, k), (B, k, d)
    basis = tangent_basis(z, model.geometry)
    if basis is not None:
        J = basis.transpose(1, 2) @ J
    e = x - x_hat
    log_prior = model.prior.log_prob(z)
    log_volume = sum_log_singular_values(J)
    log_residual = log_normal_residual(e, model.sigma2, x.shape[1])
    return _parts(log_prior, log_volume, log_residual, e, z, x_hat)


def reconstruction(model: GenerativeModel, x: Tensor) -> ScoreParts:
    """Paper eq. 4 as a normalised Gaussian in all d coordinates."""
    z = _require_encoder(model, "reconstruction")(x)
    x_hat = model.decoder(z)
    _check_shapes(model, x, x_hat)
    e = x - x_hat
    log_residual = log_normal_residual(e, model.sigma2, x.shape[1])
    zero = torch.zeros_like(log_residual)
    return _parts(zero, zero, log_residual, e, z, x_hat)


def latent(model: GenerativeModel, x: Tensor) -> ScoreParts:
    """log p(g(x)): blind to how far x lies from the manifold (paper Fig. 1b)."""
    z = _require_encoder(model, "latent")(x)
    x_hat = model.decoder(z)
    _check_shapes(model, x, x_hat)
    e = x - x_hat
    log_prior = model.prior.log_prob(z)
    zero = torch.zeros_like(log_prior)
    return _parts(log_prior, zero, zero, e, z, x_hat, e_scored=torch.zeros_like(e))


def project(
    model: GenerativeModel, x: Tensor, z: Tensor, steps: int, tol: float | None = 1e-7
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Levenberg-Marquardt refinement of z towards argmin |x - f(z)|^2 along the latent manifold.

    x (B, d), z (B, k) -> z, f(z), U (B, d, m) an orthonormal basis of the manifold's tangent space
    at f(z), and the singular values s (B, m) of J_f(z) B(z) (float64). Each step solves
    (J^T J + lambda I) delta = J^T r through the Jacobian's SVD; the damping starts at 1e-3 times
    the largest diagonal entry of J^T J; a step that does not lower the residual is refused for
    that row and its damping multiplied by 10 (divided by 10 after a success), so the residual
    never grows. Gauss-Newton converges only linearly when the residual is large, so it iterates
    up to `steps` times, stopping early once no row's attempted step exceeds `tol` (relative to
    |z| + 1); tol=None runs every step, as the exported graph does.
    """

    def linearise(z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        x_hat, J = model.decoder.forward_with_jacobian(z)
        basis = tangent_basis(z, model.geometry)
        U, s, Vh = torch.linalg.svd((J if basis is None else J @ basis).double(), full_matrices=False)
        return x_hat, U, s, Vh, basis

    x_hat, U, s, Vh, basis = linearise(z)
    err = ((x - x_hat) ** 2).sum(-1)
    jtj_diagonal = ((Vh.transpose(1, 2) * s.unsqueeze(1)) ** 2).sum(-1)  # diag(V S^2 V^T) = diag(J^T J)
    damping = 1e-3 * jtj_diagonal.max(-1, keepdim=True).values  # (B, 1)
    for _ in range(steps):
        r = (x - x_hat).double().unsqueeze(-1)  # (B, d, 1)
        coef = (U.transpose(1, 2) @ r).squeeze(-1) * s / (s * s + damping)  # (B, m)
        step = (Vh.transpose(1, 2) @ coef.unsqueeze(-1)).squeeze(-1).to(z.dtype)  # tangent coordinates
        if basis is not None:
            step = (basis @ step.unsqueeze(-1)).squeeze(-1)
        if tol is not None and bool(
            (torch.linalg.vector_norm(step, dim=-1) <= tol * (1 + torch.linalg.vector_norm(z, dim=-1))).all()
        ):
            break
        z_new = retract(z + step, model.geometry)
        x_new = model.decoder(z_new)
        err_new = ((x - x_new) ** 2).sum(-1)
        better = (err_new < err).unsqueeze(-1)
        z = torch.where(better, z_new, z)
        err = torch.where(better.squeeze(-1), err_new, err)
        damping = torch.where(better, damping * 0.1, damping * 10.0)
        x_hat, U, s, Vh, basis = linearise(z)
    return z, x_hat, U, s


def projected(model: GenerativeModel, x: Tensor, steps: int = 30, starts: int = 8) -> ScoreParts:
    """The properly normalised density: residual evaluated only normal to the manifold.

    x' = f(z*) with z* the projection of x onto the manifold, started from g(x), or, without an
    encoder (a GAN generator), from `starts` prior samples per row keeping the closest. Then
    log p(x) = log p(z*) - sum log s_i + log N(P_perp e; 0, sigma^2 I_(d-m)), which integrates to one
    up to the manifold's curvature within the noise (exactly for a linear decoder).
    """
    n, d = x.shape
    if model.encoder is not None:
        z0, xs = model.encoder(x), x
    else:
        z0, xs = model.prior.rsample(n * starts).to(x.dtype), x.repeat_interleave(starts, dim=0)
    z, x_hat, U, s = project(model, xs, z0, steps)
    _check_shapes(model, xs, x_hat)
    if model.encoder is None:
        err = ((xs - x_hat) ** 2).sum(-1).view(n, starts)
        best = err.argmin(-1) + torch.arange(n, device=x.device) * starts
        z, x_hat, U, s = z[best], x_hat[best], U[best], s[best]
    e = x - x_hat
    m = U.shape[-1]
    e64 = e.double().unsqueeze(-1)
    e_normal = (e64 - U @ (U.transpose(1, 2) @ e64)).squeeze(-1).to(e.dtype)
    sigma2 = model.sigma2_normal if model.sigma2_normal is not None else model.sigma2
    log_prior = model.prior.log_prob(z)
    log_volume = -torch.log(torch.clamp(s, min=SINGULAR_VALUE_FLOOR)).sum(-1).to(x.dtype)
    # With m = d (the normalising-flow case) no normal directions remain.
    log_residual = log_normal_residual(e_normal, sigma2, d - m) if d > m else torch.zeros_like(log_prior)
    return _parts(log_prior, log_volume, log_residual, e, z, x_hat, e_scored=e_normal)


SCORE_METHODS: dict[str, Callable[[GenerativeModel, Tensor], ScoreParts]] = {
    "likelihood": likelihood,
    "encoder": encoder,
    "reconstruction": reconstruction,
    "latent": latent,
    "projected": projected,
}


def score(model: GenerativeModel, x: Tensor, method: str = "likelihood") -> ScoreParts:
    try:
        fn = SCORE_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown score method {method!r}; choose one of {sorted(SCORE_METHODS)}") from None
    return fn(model, x)
