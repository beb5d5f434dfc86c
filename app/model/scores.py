"""Anomaly scores of a generative model, for a whole batch at once.

Every function returns `ScoreParts`: the log-density `log_prob` (higher = more normal) together
with the parts it sums, log_prob = log_prior + log_volume + log_residual, so a caller can see why a
row scored as it did. The anomaly score is -log_prob.

  likelihood      paper eq. 7: log p(z) - sum_i log s_i(J_f(z) B(z)) + log N(x - f(z); 0, S), z = g(x)
  encoder         paper eq. 8: log p(z') + sum_i log r_i(B(z')^T J_g(x') Q(x')) + log N(x - x'; 0, S),
                  x' = f(g(x)), z' = g(x'), Q(x') an orthonormal basis of the manifold's tangent space
  reconstruction  paper eq. 4: log N(x - f(g(x)); 0, S)
  latent          log p(g(x)), the paper's Fig. 1b
  projected       the Laplace approximation of p(x) = integral N(x; f(z), S) p(z) dz at the
                  maximum a posteriori z*: a density on R^d whatever the latent size

S = sigma^2 diag(w) is the noise covariance: the paper's sigma^2 I when the model has no relative
variances w, otherwise one variance per feature. B(z) is an orthonormal tangent basis (identity for
Euclidean latents), m the manifold's dimension.
Singular values are floored at SINGULAR_VALUE_FLOOR so a degenerate Jacobian gives a large finite
volume term instead of -inf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from app.model.geometry import restrict_to_tangent, retract, riemannian_derivatives, tangent_basis
from app.model.linalg import cholesky_solve, floored_cholesky, orthonormal_columns, sum_log_singular_values
from app.model.manifold import PRIORS, GenerativeModel, ManifoldModel, ScaledOutputs
from app.model.methods import FLOAT64_METHODS, METHODS, check_method
from app.model.nn import encode, mlp_forward, mlp_with_jacobian
from app.model.noise import LOG_2PI, log_normal_constant, whitening_factors
from app.model.spec import PROJECTION_STEPS, PROJECTION_TOLERANCE, Architecture


def scoring_dtype(method: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the product scores `method` in, for networks stored in `dtype`."""
    return torch.float64 if method in FLOAT64_METHODS else dtype


@dataclass(frozen=True)
class ScoreParts:
    log_prob: Tensor  # (B,) log p(x) under the method; the anomaly score is its negative
    log_prior: Tensor  # (B,) log p(z) at the latent point used
    log_volume: Tensor  # (B,) volume term: -sum log s for f, +sum log r for g, the Laplace term for projected
    log_residual: Tensor  # (B,) log-density of the residual e
    reconstruction_error: Tensor  # (B,) |x - x'|^2 over all d coordinates
    residual_sq: Tensor  # (B,) squared norm of the residual in log_residual (0 for latent)
    z: Tensor  # (B, k) latent point used
    x_hat: Tensor  # (B, d) its image x' = f(z)
    converged: Tensor | None = None  # (B,) projected only: whether the MAP iteration converged

    @property
    def score(self) -> Tensor:
        return -self.log_prob


def whitening(relative_variance: Sequence[float] | None, like: Tensor) -> Tensor | None:
    """app.model.noise.whitening_factors in like's dtype and device: residuals times it have noise
    sigma2 I. None for the paper's isotropic noise (no w)."""
    if relative_variance is None:
        return None
    return _whitening(tuple(relative_variance), like.device, like.dtype)


@functools.lru_cache(maxsize=64)
def _whitening(relative_variance: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    # Kept per model, device and dtype: on a GPU, building it per call would be a synchronous
    # host-to-device copy in every scoring call. Callers only multiply by it, never write to it.
    return torch.as_tensor(whitening_factors(relative_variance), device=device).to(dtype)


def log_normal_residual(
    e: Tensor, sigma2: float, relative_variance: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """log N(e; 0, sigma2 diag(w)) (B,) for e (B, d), and e whitened, e / sqrt(w) (B, d), whose
    squared norm over sigma2 it charges."""
    r = whitening(relative_variance, e)
    whitened = e if r is None else e * r
    squared = (whitened * whitened).sum(-1)
    return log_normal_of_squared(squared, sigma2, e.shape[-1], relative_variance), whitened


def log_normal_of_squared(
    squared: Tensor, sigma2: float, dims: int, relative_variance: Sequence[float] | None = None
) -> Tensor:
    """The same from the whitened |e|^2 (B,): a new sigma2 rescores residuals without recomputing
    them."""
    return -0.5 * squared / sigma2 - log_normal_constant(sigma2, dims, relative_variance)


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
    log_residual, whitened = log_normal_residual(e, model.sigma2, model.relative_variance)
    return _parts(log_prior, log_volume, log_residual, e, z, x_hat, whitened)


def encoder(model: GenerativeModel, x: Tensor) -> ScoreParts:
    """Paper eq. 8: the encoder maps the manifold to the latent space, hence +sum(log r).

    The density of x' = f(g(x)) on the manifold is p(g(x')) |det| of g's Jacobian as a map between
    the two m-dimensional manifolds: J_g(x') restricted to the manifold's tangent space at x'
    (orthonormal basis Q(x') of the span of J_f(z) B(z), z = g(x)) and, on the sphere, projected
    onto the latent tangent space by B(z')^T. J_g over all of R^d would also count how g stretches
    the directions normal to the manifold, which p(x') does not depend on.
    """
    g = _require_encoder(model, "encoder")
    z0 = g(x)
    x_hat, J_f = model.decoder.forward_with_jacobian(z0)  # (B, d), (B, d, k)
    _check_shapes(model, x, x_hat)
    tangent = orthonormal_columns(restrict_to_tangent(J_f.double(), z0.double(), model.geometry))  # (B, d, m)
    z, J_g = model.encoder.forward_with_jacobian(x_hat)  # (B, k), (B, k, d)
    restricted = J_g.double() @ tangent  # (B, k, m)
    basis = tangent_basis(z.double(), model.geometry)
    if basis is not None:
        restricted = basis.transpose(1, 2) @ restricted  # (B, m, m)
    e = x - x_hat
    log_prior = model.prior.log_prob(z)
    log_volume = sum_log_singular_values(restricted).to(x.dtype)
    log_residual, whitened = log_normal_residual(e, model.sigma2, model.relative_variance)
    return _parts(log_prior, log_volume, log_residual, e, z, x_hat, whitened)


def reconstruction(model: GenerativeModel, x: Tensor) -> ScoreParts:
    """Paper eq. 4 as a normalised Gaussian in all d coordinates."""
    z = _require_encoder(model, "reconstruction")(x)
    x_hat = model.decoder(z)
    _check_shapes(model, x, x_hat)
    e = x - x_hat
    log_residual, whitened = log_normal_residual(e, model.sigma2, model.relative_variance)
    zero = torch.zeros_like(log_residual)
    return _parts(zero, zero, log_residual, e, z, x_hat, whitened)


def latent(model: GenerativeModel, x: Tensor) -> ScoreParts:
    """log p(g(x)): blind to how far x lies from the manifold (paper Fig. 1b)."""
    z = _require_encoder(model, "latent")(x)
    x_hat = model.decoder(z)
    _check_shapes(model, x, x_hat)
    e = x - x_hat
    log_prior = model.prior.log_prob(z)
    zero = torch.zeros_like(log_prior)
    return _parts(log_prior, zero, zero, e, z, x_hat, e_scored=torch.zeros_like(e))


# The closed-form methods whose networks' products can run for several models at once.
STACKED_METHODS = ("likelihood", "reconstruction", "latent")


def stacked_score(
    arch: Architecture,
    params: dict[str, Tensor],
    sigma2: Sequence[float],
    x: Tensor,
    method: str,
    relative_variance: Sequence[Sequence[float] | None] | None = None,
) -> ScoreParts:
    """`method` (one of STACKED_METHODS) for C models of one architecture at once, as likelihood,
    reconstruction and latent compute it for one: their state stacked along a leading axis
    (torch.func.stack_module_state), sigma2 and relative_variance (default: none) their noises;
    every part (C, B), z (C, B, k), x_hat (C, B, d). Each layer is one batched product for all C
    models (an ensemble's members), where C models scored one by one launch C times the kernels:
    what a GPU's time goes to."""
    if method not in STACKED_METHODS:
        raise ValueError(f"{method!r} is not scored stacked; stacked methods: {list(STACKED_METHODS)}")
    encoder_layers = ManifoldModel.stacked_layers(arch, params, "encoder")
    decoder_layers = ManifoldModel.stacked_layers(arch, params, "decoder")

    def encoder(v: Tensor) -> Tensor:
        return encode(v, encoder_layers, arch.activation, arch.geometry)

    z = encoder(x)  # (C, B, k)
    zero = torch.zeros(z.shape[:2], dtype=x.dtype, device=x.device)
    if method == "likelihood":
        x_hat, J = mlp_with_jacobian(z, decoder_layers, arch.activation)  # (C, B, d), (C, B, d, k)
        rows = restrict_to_tangent(J.flatten(0, 1), z.flatten(0, 1), arch.geometry)
        log_volume = -sum_log_singular_values(rows).view(z.shape[:2])
    else:
        x_hat = mlp_forward(z, decoder_layers, arch.activation)
        log_volume = zero
    e = x - x_hat
    log_prior = (
        zero
        if method == "reconstruction"
        else PRIORS[arch.prior].stacked(arch, params, encoder, x).log_prob(z)
    )
    if method == "latent":
        return _parts(log_prior, zero, zero, e, z, x_hat, e_scored=torch.zeros_like(e))
    # Each model's own noise, as log_normal_residual takes it.
    noises = [None] * len(sigma2) if relative_variance is None else list(relative_variance)
    terms = [log_normal_residual(e[j], s, w) for j, (s, w) in enumerate(zip(sigma2, noises, strict=True))]
    log_residual = torch.stack([term for term, _ in terms])
    return _parts(log_prior, log_volume, log_residual, e, z, x_hat, torch.stack([w for _, w in terms]))


@dataclass(frozen=True)
class Linearisation:
    """The MAP objective -log N(x; f(z), sigma2 I) - log p(z) + const and its derivatives at z, in
    tangent coordinates, all float64."""

    z: Tensor  # (B, k)
    x_hat: Tensor  # (B, d) f(z), in the network's dtype
    residual: Tensor  # (B, d) x - f(z)
    log_prior: Tensor  # (B,)
    objective: Tensor  # (B,) |x - f(z)|^2 / (2 sigma2) - log p(z)
    gradient: Tensor  # (B, m)
    data_curvature: Tensor  # (B, m, m) J^T J / sigma2, J = J_f(z) B(z)
    hessian: Tensor  # (B, m, m) Gauss-Newton: J^T J / sigma2 - Hess log p(z), the density's
    newton_hessian: Tensor  # (B, m, m) the objective's exact Hessian, the steps'
    basis: Tensor | None  # (B, k, m), None for Euclidean latents

    def map(
        self, fn: Callable[[Tensor, Tensor | None], Tensor], other: Linearisation | None = None
    ) -> Linearisation:
        """A new linearisation from fn(field, other's field) for every field (None stays None)."""
        values: dict[str, Tensor | None] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            values[name] = (
                None if value is None else fn(value, None if other is None else getattr(other, name))
            )
        return Linearisation(**values)  # type: ignore[arg-type]

    def rows(self, index: Tensor) -> Linearisation:
        return self.map(lambda value, _: value[index])

    def updated(self, rows: Tensor, part: Linearisation) -> Linearisation:
        """self with the given rows (B',) replaced by part's rows."""

        def put(value: Tensor, new: Tensor | None) -> Tensor:
            value = value.clone()
            value[rows] = new
            return value

        return self.map(put, part)


def linearise(
    model: GenerativeModel, x: Tensor, z: Tensor, sigma2: float, net_dtype: torch.dtype
) -> Linearisation:
    """x (B, d), z (B, k) float64 -> the objective's value, gradient and Hessians at z.

    The exact Hessian adds the decoder's curvature weighted by the residual,
    -Hess(r . f)(z) / sigma2 with r = x - f(z) held fixed: where the residual is large and f bends
    (a saturating decoder far from the data), Gauss-Newton alone underestimates the curvature many
    times over and its steps zig-zag.
    """
    x_hat, J, curvature = model.decoder.forward_with_curvature(z.to(net_dtype))
    basis = tangent_basis(z, model.geometry)
    J_ambient = J.double()
    J = restrict_to_tangent(J_ambient, z, model.geometry)  # (B, d, m)
    log_prior, prior_gradient, prior_hessian = model.prior.log_prob_derivatives(z)
    prior_gradient, prior_hessian = riemannian_derivatives(prior_gradient, prior_hessian, z, basis)
    residual = x - x_hat.double()
    pull = (J_ambient.transpose(1, 2) @ residual.unsqueeze(-1)).squeeze(-1)  # grad of r . f, (B, k)
    _, bending = riemannian_derivatives(pull, curvature(residual.to(net_dtype)).double(), z, basis)
    data_curvature = J.transpose(1, 2) @ J / sigma2
    hessian = data_curvature - prior_hessian
    return Linearisation(
        z=z,
        x_hat=x_hat,
        residual=residual,
        log_prior=log_prior,
        objective=0.5 * (residual * residual).sum(-1) / sigma2 - log_prior,
        gradient=-(J.transpose(1, 2) @ residual.unsqueeze(-1)).squeeze(-1) / sigma2 - prior_gradient,
        data_curvature=data_curvature,
        hessian=hessian,
        newton_hessian=hessian - bending / sigma2,
        basis=basis,
    )


def map_point(
    model: GenerativeModel,
    x: Tensor,
    z: Tensor,
    sigma2: float,
    steps: int = PROJECTION_STEPS,
    tol: float = PROJECTION_TOLERANCE,
) -> tuple[Linearisation, Tensor]:
    """z* = argmax_z log N(x; f(z), sigma2 I) + log p(z), by Levenberg-Marquardt steps from z.

    x (B, d), z (B, k) on the latent manifold -> the linearisation at z* and whether each row
    converged (B,). Each step solves (H + lambda I) delta = -gradient with H the objective's exact
    Hessian, and is taken when the objective falls; where H + lambda I is not positive definite
    (a Cholesky pivot below the floor) it is refused untried. lambda follows Nielsen's rule from the gain
    ratio rho = actual / predicted decrease: times max(1/3, 1 - (2 rho - 1)^3) after a step taken,
    times nu (2, doubling while steps are refused) after a step refused; it starts at 1e-3 times
    the Frobenius norm of H. Nothing depends on the choice of tangent basis. A row stops for good
    once its next step is no longer than tol (1 + |z|), so its result depends on no other row.
    The algebra is float64 whatever the network's dtype.
    """
    net_dtype = x.dtype
    x = x.double()
    current = linearise(model, x, z.double(), sigma2, net_dtype)
    m = current.newton_hessian.shape[-1]
    eye = torch.eye(m, dtype=torch.float64, device=x.device)
    damping = 1e-3 * torch.linalg.matrix_norm(current.newton_hessian).clamp(min=1e-300)
    growth = torch.full_like(damping, 2.0)
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for step in range(steps + 1):
        L, indefinite = floored_cholesky(current.newton_hessian + damping[:, None, None] * eye)
        delta = -cholesky_solve(L, current.gradient.unsqueeze(-1)).squeeze(-1)  # (B, m) tangent coordinates
        ambient = delta if current.basis is None else (current.basis @ delta.unsqueeze(-1)).squeeze(-1)
        done |= torch.linalg.vector_norm(ambient, dim=-1) <= tol * (
            1 + torch.linalg.vector_norm(current.z, dim=-1)
        )
        if step == steps or bool(done.all()):
            break
        # Only the rows still moving are evaluated; a step that lowers the objective replaces them.
        active = torch.nonzero(~done).squeeze(-1)
        trial = linearise(
            model, x[active], retract(current.z[active] + ambient[active], model.geometry), sigma2, net_dtype
        )
        d_active = delta[active]
        predicted = 0.5 * (d_active * (damping[active, None] * d_active - current.gradient[active])).sum(-1)
        gain = (current.objective[active] - trial.objective) / predicted
        taken = (predicted > 0) & (gain > 0) & ~indefinite[active]
        current = current.updated(active[taken], trial.rows(taken))
        shrink = torch.clamp(1 - (2 * gain - 1) ** 3, min=1 / 3)
        damping[active] = torch.where(taken, damping[active] * shrink, damping[active] * growth[active])
        growth[active] = torch.where(taken, 2.0, growth[active] * 2)
    return current, done


def laplace_log_volume(hessian: Tensor) -> Tensor:
    """(m/2) log 2 pi - (1/2) log det H: the volume of the posterior around z* (B,)."""
    L, _ = floored_cholesky(hessian)
    m = hessian.shape[-1]
    return 0.5 * m * LOG_2PI - torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)


def effective_dimensions(point: Linearisation) -> Tensor:
    """tr(H^-1 J^T J / sigma2) (B,), in [0, m]: how many latent directions the data pin down rather
    than the prior. The noise variance's evidence fixed point uses it (app.train.fit.fit_noise)."""
    L, _ = floored_cholesky(point.hessian)
    solved = cholesky_solve(L, point.data_curvature)
    return solved.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(0, point.hessian.shape[-1])


def projected(model: GenerativeModel, x: Tensor, starts: int = 8) -> ScoreParts:
    """The Laplace approximation of p(x) = integral of N(x; f(z), sigma2 I) p(z) dz, a density on R^d.

    z* is the maximum a posteriori point (map_point), started from g(x), or, without an encoder
    (a GAN generator), from `starts` prior samples per row keeping the best. With H the
    Gauss-Newton Hessian at z*,
        log p(x) = log p(z*) + log N(x - f(z*); 0, sigma2 I_d) + (m/2) log 2 pi - (1/2) log det H,
    exact for a linear decoder and a Gaussian prior. The prior keeps z* finite where the decoder
    saturates. sigma2 is the model's sigma2_projected when set. Computed in x's dtype for the
    networks and float64 for the rest; the product scores this method in float64 throughout.
    """
    n = x.shape[0]
    sigma2 = model.sigma2_projected if model.sigma2_projected is not None else model.sigma2
    if model.encoder is not None:
        z0, xs = model.encoder(x), x
    else:
        z0, xs = model.prior.rsample(n * starts).to(x.dtype), x.repeat_interleave(starts, dim=0)
    isotropic, r = whitened(model, x)
    point, converged = map_point(isotropic, xs if r is None else xs * r, z0, sigma2)
    _check_shapes(model, xs, point.x_hat)
    if model.encoder is None:
        best = point.objective.view(n, starts).argmin(-1) + torch.arange(n, device=x.device) * starts
        point, converged = point.rows(best), converged[best]
    return laplace_parts(point, converged, sigma2, x.dtype, model.relative_variance)


def whitened(model: GenerativeModel, like: Tensor) -> tuple[GenerativeModel, Tensor | None]:
    """The model in coordinates where its noise sigma2 diag(w) is sigma2 I: decoder f / sqrt(w),
    and the factors r = 1 / sqrt(w) that take rows x there (the model itself and None for
    isotropic noise). The projection runs there; laplace_parts takes its results back."""
    r = whitening(model.relative_variance, like)
    if r is None:
        return model, None
    return replace(model, decoder=ScaledOutputs(model.decoder, r), relative_variance=None), r


def laplace_parts(
    point: Linearisation,
    converged: Tensor,
    sigma2: float,
    dtype: torch.dtype,
    relative_variance: Sequence[float] | None = None,
) -> ScoreParts:
    """The projected method's parts at a MAP point found in whitened coordinates (whitened), in
    `dtype`; residual and x_hat back in the rows' own coordinates."""
    e = point.residual
    log_residual = log_normal_of_squared((e * e).sum(-1), sigma2, e.shape[-1], relative_variance)
    r = whitening(relative_variance, e)
    parts = _parts(
        point.log_prior.to(dtype),
        laplace_log_volume(point.hessian).to(dtype),
        log_residual.to(dtype),
        (e if r is None else e / r).to(dtype),
        point.z.to(dtype),
        point.x_hat if r is None else point.x_hat / r.to(point.x_hat.dtype),
        e.to(dtype),
    )
    return replace(parts, converged=converged)


SCORE_METHODS: dict[str, Callable[[GenerativeModel, Tensor], ScoreParts]] = {
    "likelihood": likelihood,
    "encoder": encoder,
    "reconstruction": reconstruction,
    "latent": latent,
    "projected": projected,
}
assert tuple(SCORE_METHODS) == METHODS, "app.model.methods names the methods"


def score(model: GenerativeModel, x: Tensor, method: str = "likelihood") -> ScoreParts:
    return SCORE_METHODS[check_method(method)](model, x)
