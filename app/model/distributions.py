"""Latent densities p(z): standard normal, Gaussian mixture, von Mises-Fisher mixture, in torch and
as ONNX nodes side by side.

Plain tensor programs (like torch.distributions): they hold no parameters of their own, so the
same objects serve training (parameters flow in with gradients) and scoring (frozen tensors).
Mixtures have uniform weights, as in the VampPrior. Sampling uses torch's global generator, so
`torch.manual_seed` makes it reproducible. Each class's `emit` writes the same log-density (and,
when asked, its gradient and Hessian in float64) into a graph from a bundle's derived tensors.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import special

from app.model.graph import Graph
from app.model.noise import LOG_2PI

# torch is imported only inside the functions that compute with it, so that the serving install,
# which has no torch, can build and verify graphs with the emitters (app.bundle.graphs).
if TYPE_CHECKING:
    import torch
    from torch import Tensor

Parameters = dict[str, NDArray[np.floating]]  # a bundle's tensors, the derived prior among them
Emitted = str | tuple[str, str, str]  # log p, or log p with its gradient and Hessian


class LatentDistribution(Protocol):
    dim: int  # k, the ambient latent size

    def log_prob(self, z: Tensor) -> Tensor:  # (..., B, k) -> (..., B)
        ...

    def log_prob_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, k) -> log p (B,), its gradient (B, k) and Hessian (B, k, k) in ambient coordinates,
        in z's dtype. On the sphere they are those of the formula extended to R^k; the geometry
        turns them into Riemannian ones."""
        ...

    def rsample(self, n: int) -> Tensor:  # -> (..., n, k), differentiable in the parameters
        ...


class StandardNormal:
    """N(0, I_k); `batch_shape` stacks independent copies so sampling matches the mixtures' shapes."""

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
        batch_shape: tuple[int, ...] = (),
    ) -> None:
        self.dim, self.dtype, self.device, self.batch_shape = dim, dtype, device, batch_shape

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z * z).sum(-1) - 0.5 * self.dim * LOG_2PI

    def log_prob_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        import torch

        hessian = -torch.eye(self.dim, dtype=z.dtype, device=z.device).expand(z.shape[0], -1, -1)
        return self.log_prob(z), -z, hessian

    @staticmethod
    def emit(
        g: Graph, z: str, weights: Parameters, k: int, dtype: type, derivatives: bool = False
    ) -> Emitted:
        log_p = g.sub(
            g.mul(g.sum(g.mul(z, z), 1), g.const(-0.5, dtype)), g.computed(0.5 * k * LOG_2PI, dtype)
        )
        if not derivatives:
            return log_p
        batch_eye = g.mul(g.unsqueeze(g.unsqueeze(g.sum(z, 1), 1), 2), g.const(0.0, np.float64))
        return log_p, g.op("Neg", z), g.add(batch_eye, g.const(-np.eye(k), np.float64))

    def rsample(self, n: int) -> Tensor:
        import torch

        return torch.randn(*self.batch_shape, n, self.dim, dtype=self.dtype, device=self.device)


def _mixture_derivatives(
    components: Tensor, gradients: Tensor, curvature: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """log p, gradient and Hessian of a uniform mixture from its components' log-densities c_j (B, K),
    their gradients a_j (B, K, k) and their Hessians, diagonal and given as (B, K, k) or None for 0.

    With weights w = softmax(c): grad = sum_j w_j a_j and
    Hessian = sum_j w_j (C_j + a_j a_j^T) - grad grad^T.
    """
    import torch

    w = torch.softmax(components, dim=-1)  # (B, K)
    log_p = torch.logsumexp(components, dim=-1) - math.log(components.shape[-1])
    grad = (w.unsqueeze(-1) * gradients).sum(-2)  # (B, k)
    hessian = (w.unsqueeze(-1) * gradients).transpose(-1, -2) @ gradients - grad.unsqueeze(
        -1
    ) * grad.unsqueeze(-2)
    if curvature is not None:
        hessian = hessian + torch.diag_embed((w.unsqueeze(-1) * curvature).sum(-2))
    return log_p, grad, hessian


def _emit_mixture(
    g: Graph,
    components: str,
    count: int,
    dtype: type,
    gradients: str | None = None,
    curvature: NDArray[np.float64] | None = None,
) -> Emitted:
    """_mixture_derivatives as nodes: log p from the components c_j (B, K); given their gradients
    (B, K, k), also grad and Hessian, `curvature` being the components' diagonal Hessians (K, k)."""
    log_p = g.sub(
        g.op("ReduceLogSumExp", components, axes=[1], keepdims=0), g.computed(math.log(count), dtype)
    )
    if gradients is None:
        return log_p
    w = g.op("Softmax", components, axis=1)  # (B, K)
    weighted = g.mul(g.unsqueeze(w, 2), gradients)  # (B, K, k)
    gradient = g.sum(weighted, 1)  # (B, k)
    outer = g.mul(g.unsqueeze(gradient, 2), g.unsqueeze(gradient, 1))
    hessian = g.sub(g.matmul(g.transpose(weighted), gradients), outer)
    if curvature is not None:
        diagonal = g.matmul(w, g.computed(curvature, np.float64))  # (B, k)
        eye = g.const(np.eye(curvature.shape[1]), np.float64)
        hessian = g.add(hessian, g.mul(g.unsqueeze(diagonal, 1), eye))
    return log_p, gradient, hessian


def _pick_components(locations: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Uniformly chosen component per sample: indices (..., n) and their locations (..., n, k)."""
    import torch

    c = torch.randint(locations.shape[-2], (*locations.shape[:-2], n), device=locations.device)
    return c, torch.gather(locations, -2, c.unsqueeze(-1).expand(*c.shape, locations.shape[-1]))


class GaussianMixture:
    """Uniform mixture of K diagonal Gaussians: means (..., K, k), scales (..., K, k) > 0.

    Leading dimensions index independent mixtures (e.g. stacked training candidates): z (..., B, k).
    """

    def __init__(self, means: Tensor, scales: Tensor) -> None:
        if means.shape != scales.shape or means.ndim < 2:
            raise ValueError(
                f"means and scales must both be (..., K, k), got {means.shape} and {scales.shape}"
            )
        self.means, self.scales = means, scales
        self.dim = means.shape[-1]

    def component_log_prob(self, z: Tensor) -> Tensor:  # (..., B, k) -> (..., B, K)
        import torch

        u = (z.unsqueeze(-2) - self.means.unsqueeze(-3)) / self.scales.unsqueeze(-3)
        log_det = torch.log(self.scales).sum(-1).unsqueeze(-2)
        return -0.5 * (u * u).sum(-1) - log_det - 0.5 * self.dim * LOG_2PI

    def log_prob(self, z: Tensor) -> Tensor:
        import torch

        return torch.logsumexp(self.component_log_prob(z), dim=-1) - math.log(self.means.shape[-2])

    def log_prob_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        means, scales = self.means.to(z.dtype), self.scales.to(z.dtype)
        inverse_variance = scales**-2  # (K, k)
        gradients = -(z.unsqueeze(-2) - means) * inverse_variance  # (B, K, k)
        mixture = GaussianMixture(means, scales)
        return _mixture_derivatives(
            mixture.component_log_prob(z), gradients, -inverse_variance.expand_as(gradients)
        )

    @staticmethod
    def emit(
        g: Graph, z: str, weights: Parameters, k: int, dtype: type, derivatives: bool = False
    ) -> Emitted:
        locations = weights["derived.prior.locations"].astype(dtype)
        scales = weights["derived.prior.scales"].astype(np.float64)
        offsets = g.sub(g.unsqueeze(z, 1), g.const(locations, dtype))  # (B, K, k)
        u = g.div(offsets, g.const(scales, dtype))
        constant = -np.log(scales).sum(-1) - 0.5 * k * LOG_2PI  # (K,)
        components = g.add(g.mul(g.sum(g.mul(u, u), 2), g.const(-0.5, dtype)), g.computed(constant, dtype))
        if not derivatives:
            return _emit_mixture(g, components, len(scales), dtype)
        gradients = g.op("Neg", g.div(offsets, g.const(scales**2, dtype)))  # -(z - mu_j) / s_j^2
        return _emit_mixture(g, components, len(scales), dtype, gradients, -(scales**-2))

    def rsample(self, n: int) -> Tensor:  # -> (..., n, k)
        import torch

        c, means = _pick_components(self.means, n)
        scales = torch.gather(self.scales, -2, c.unsqueeze(-1).expand_as(means))
        return means + scales * torch.randn_like(means)


# --- von Mises-Fisher -------------------------------------------------------------------------------

# Below this concentration log I_v is summed from its power series; above it, the uniform asymptotic
# (Debye) expansion with four correction terms is accurate to ~1e-9 relative, since its terms fall
# as r^-j with r = sqrt(v^2 + kappa^2) >= 50.
_SERIES_LIMIT = 50.0
_SERIES_TERMS = 200  # the series' terms peak near m = kappa / 2 <= 25 and are negligible long before 200

# Debye polynomials u_j(t) / t^j, coefficients in ascending powers of t^2 (Abramowitz & Stegun 9.3.9).
_DEBYE = (
    ((3.0, -5.0), 24.0),
    ((81.0, -462.0, 385.0), 1152.0),
    ((30375.0, -369603.0, 765765.0, -425425.0), 414720.0),
    ((4465125.0, -94121676.0, 349922430.0, -446185740.0, 185910725.0), 39813120.0),
)


def log_bessel_iv_over_power(v: float, kappa: Tensor) -> Tensor:
    """log(I_v(kappa) / kappa^v) for order v >= 0, elementwise, finite for kappa from 0 up.

    Dividing by kappa^v keeps the small-kappa end free of cancellation: it tends to
    -v log 2 - lgamma(v + 1) as kappa -> 0. Differentiable in kappa. Computed in float64.
    """
    import torch

    kappa64 = kappa.to(torch.float64)
    # Both branches are evaluated everywhere (torch.where); clamping keeps each one in its own domain
    # so neither produces inf or NaN, which would poison the gradient of the other.
    small = torch.clamp(kappa64, max=_SERIES_LIMIT)
    m = torch.arange(_SERIES_TERMS, dtype=torch.float64, device=kappa.device)
    log_half = torch.log(torch.clamp(small / 2, min=1e-300)).unsqueeze(-1)
    terms = 2 * m * log_half - torch.lgamma(m + 1) - torch.lgamma(m + v + 1)
    series = torch.logsumexp(terms, dim=-1) - v * math.log(2.0)

    large = torch.clamp(kappa64, min=_SERIES_LIMIT)
    r = torch.sqrt(v * v + large * large)
    t2 = (v / r) ** 2
    correction = torch.ones_like(r)
    for j, (coefficients, denominator) in enumerate(_DEBYE, start=1):
        poly = torch.zeros_like(r)
        for c in reversed(coefficients):
            poly = poly * t2 + c
        correction = correction + poly / denominator / r**j
    debye = (
        r
        + v * torch.log(large / (v + r))
        - 0.5 * torch.log(2 * math.pi * r)
        + torch.log(correction)
        - v * torch.log(large)
    )
    return torch.where(kappa64 < _SERIES_LIMIT, series, debye).to(kappa.dtype)


def log_bessel_iv(v: float, kappa: Tensor) -> Tensor:
    """log I_v(kappa), kappa > 0."""
    import torch

    return log_bessel_iv_over_power(v, kappa) + v * torch.log(kappa)


def vmf_log_normalizer(kappa: Tensor, dim: int) -> Tensor:
    """log C_k(kappa) of the vMF density C_k(kappa) exp(kappa mu.z) on S^(k-1), k = dim.

    C_k(kappa) = kappa^(k/2-1) / ((2 pi)^(k/2) I_(k/2-1)(kappa)); as kappa -> 0 it tends to
    1 / area(S^(k-1)), the uniform density.
    """
    return -0.5 * dim * LOG_2PI - log_bessel_iv_over_power(0.5 * dim - 1, kappa)


# The graphs' normaliser is a constant computed without torch: above kappa = 1 from scipy's
# exponentially scaled Bessel function, log I_v = log(ive(v, kappa)) + kappa, accurate to ~1e-15
# relative, and exact to rounding from there up to orders v = 140 (latent size 282), where ive(v, 1)
# would underflow. Below, where it underflows sooner (~ (kappa/2)^v / v!), the power series: its
# terms shrink by a factor kappa^2 / (4 m (v + m)) <= 1/4, so 16 of them are exact to rounding.
_NUMPY_SERIES_LIMIT = 1.0
_NUMPY_SERIES_TERMS = 16


def numpy_vmf_log_normalizer(kappa: NDArray[np.float64], dim: int) -> NDArray[np.float64]:
    """vmf_log_normalizer in numpy, float64: log C_k(kappa) for concentrations kappa >= 0."""
    v = 0.5 * dim - 1
    kappa = np.asarray(kappa, dtype=np.float64)
    t = np.minimum(kappa, _NUMPY_SERIES_LIMIT) ** 2 / 4
    term, total = np.ones_like(t), np.ones_like(t)
    for m in range(1, _NUMPY_SERIES_TERMS):  # sum_m t^m / (m! (v + 1)_m)
        term = term * t / (m * (v + m))
        total = total + term
    series = np.log(total) - v * math.log(2.0) - special.gammaln(v + 1)
    large = np.maximum(kappa, _NUMPY_SERIES_LIMIT)
    scaled = np.log(special.ive(v, large)) + large - v * np.log(large)
    return -0.5 * dim * LOG_2PI - np.where(kappa < _NUMPY_SERIES_LIMIT, series, scaled)


def vmf_mean_resultant_length(kappa: Tensor, dim: int) -> Tensor:
    """A_k(kappa) = E[mu . z] = I_(k/2)(kappa) / I_(k/2-1)(kappa)."""
    import torch

    v = 0.5 * dim - 1
    return torch.exp(log_bessel_iv(v + 1, kappa) - log_bessel_iv(v, kappa))


def sample_vmf(mu: Tensor, kappa: Tensor, proposals: int = 2) -> Tensor:
    """One draw from vMF(mu_i, kappa_i) per row: mu (N, k) unit vectors, kappa (N,) -> (N, k).

    Wood (1994): the component w = mu . z is drawn by rejection from a Beta proposal, the rest
    uniformly on the tangent sphere. Each round draws `proposals` candidates for every row still
    waiting and keeps the first accepted; with Wood's acceptance rate above one half, each round
    leaves at most a quarter of the rows waiting, so a batch takes a few rounds of small operations
    rather than a loop until the unluckiest row accepts. Gradients reach kappa through
    w = h(eps, kappa) at the accepted proposal eps (the reparameterisation term of Davidson et
    al., 2018, without its rejection correction) and mu through the projection of a Gaussian onto
    its tangent space, which is uniform on the tangent sphere and needs no basis.
    """
    import torch

    n, k = mu.shape
    m1 = float(k - 1)
    kappa64 = kappa.to(torch.float64)
    with torch.no_grad():
        kd = kappa64.detach()
        b = m1 / (2 * kd + torch.sqrt(4 * kd * kd + m1 * m1))
        x0 = (1 - b) / (1 + b)
        c = kd * x0 + m1 * torch.log1p(-x0 * x0)
        half = torch.full((proposals,), m1 / 2, dtype=torch.float64, device=mu.device)
        beta = torch.distributions.Beta(half, half)
        eps = torch.empty(n, dtype=torch.float64, device=mu.device)
        todo = torch.arange(n, device=mu.device)
        while todo.numel():
            e = beta.sample((todo.numel(),))  # (waiting, proposals)
            bi, x0i, ci, ki = b[todo, None], x0[todo, None], c[todo, None], kd[todo, None]
            w = (1 - (1 + bi) * e) / (1 - (1 - bi) * e)
            u = torch.rand(e.shape, dtype=torch.float64, device=mu.device)
            accept = ki * w + m1 * torch.log1p(-x0i * w) - ci >= torch.log(u)
            done = accept.any(-1)
            first = accept.to(torch.int8).argmax(-1)  # the first accepted proposal of each row
            eps[todo[done]] = e[done, first[done]]
            todo = todo[~done]
    b = m1 / (2 * kappa64 + torch.sqrt(4 * kappa64 * kappa64 + m1 * m1))
    w = ((1 - (1 + b) * eps) / (1 - (1 - b) * eps)).to(mu.dtype).clamp(-1.0, 1.0).unsqueeze(-1)
    v = torch.randn(n, k, dtype=mu.dtype, device=mu.device)
    v = v - (v * mu).sum(-1, keepdim=True) * mu
    direction = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return w * mu + torch.sqrt(1 - w * w) * direction


class VonMisesFisherMixture:
    """Uniform mixture of K vMF densities on S^(k-1): directions (..., K, k) unit, kappa (..., K) > 0."""

    def __init__(self, directions: Tensor, kappa: Tensor) -> None:
        if directions.ndim < 2 or kappa.shape != directions.shape[:-1]:
            raise ValueError(
                f"directions must be (..., K, k) and kappa (..., K), got {directions.shape}, {kappa.shape}"
            )
        self.directions, self.kappa = directions, kappa
        self.dim = directions.shape[-1]

    @functools.cached_property
    def log_normalizer(self) -> Tensor:  # (..., K); lazy: a training step only samples
        return vmf_log_normalizer(self.kappa, self.dim)

    def component_log_prob(self, z: Tensor) -> Tensor:  # (..., B, k) -> (..., B, K)
        cosine = z @ self.directions.transpose(-1, -2)
        return self.log_normalizer.unsqueeze(-2) + self.kappa.unsqueeze(-2) * cosine

    def log_prob(self, z: Tensor) -> Tensor:
        import torch

        return torch.logsumexp(self.component_log_prob(z), dim=-1) - math.log(self.directions.shape[-2])

    def log_prob_derivatives(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        directions, kappa = self.directions.to(z.dtype), self.kappa.to(z.dtype)
        components = vmf_log_normalizer(kappa, self.dim) + kappa * (z @ directions.T)  # (B, K)
        gradients = (kappa.unsqueeze(-1) * directions).expand(z.shape[0], -1, -1)  # (B, K, k)
        return _mixture_derivatives(components, gradients, None)

    @staticmethod
    def emit(
        g: Graph, z: str, weights: Parameters, k: int, dtype: type, derivatives: bool = False
    ) -> Emitted:
        locations = weights["derived.prior.locations"].astype(dtype)
        kappa = weights["derived.prior.kappa"].astype(np.float64)
        # kappa is fixed once trained, so the normaliser is a constant of the graph
        cosines = g.matmul(z, g.const(locations.T, dtype))
        components = g.add(
            g.mul(cosines, g.const(kappa, dtype)), g.computed(numpy_vmf_log_normalizer(kappa, k), dtype)
        )
        if not derivatives:
            return _emit_mixture(g, components, len(kappa), dtype)
        directions = weights["derived.prior.locations"].astype(np.float64)
        zeros = g.mul(g.unsqueeze(components, 2), g.const(0.0, np.float64))  # (B, K, 1), for the batch
        gradients = g.add(zeros, g.const(kappa[:, None] * directions, np.float64))  # kappa_j mu_j
        return _emit_mixture(g, components, len(kappa), dtype, gradients)

    def rsample(self, n: int) -> Tensor:  # -> (..., n, k)
        import torch

        c, mu = _pick_components(self.directions, n)
        kappa = torch.gather(self.kappa, -1, c)
        return sample_vmf(mu.reshape(-1, self.dim), kappa.reshape(-1)).reshape(mu.shape)


# The density each prior of app.model.spec is, by name.
DENSITIES: dict[str, type[StandardNormal] | type[GaussianMixture] | type[VonMisesFisherMixture]] = {
    "normal": StandardNormal,
    "vamp": GaussianMixture,
    "vmf": VonMisesFisherMixture,
}


def emit_log_prior(g: Graph, z: str, prior: str, weights: Parameters, k: int, dtype: type) -> str:
    """log p(z) (B,) of the named prior as nodes, in `dtype`."""
    log_p = DENSITIES[prior].emit(g, z, weights, k, dtype)
    assert isinstance(log_p, str)
    return log_p


def emit_prior_derivatives(g: Graph, z: str, prior: str, weights: Parameters, k: int) -> tuple[str, str, str]:
    """log p(z), its gradient (B, k) and Hessian (B, k, k) in R^k as float64 nodes."""
    emitted = DENSITIES[prior].emit(g, z, weights, k, np.float64, derivatives=True)
    assert isinstance(emitted, tuple)
    return emitted
