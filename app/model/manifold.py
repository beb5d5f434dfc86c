"""The generative model: encoder g, decoder f, learned prior p(z), noise variance sigma^2.

`ManifoldModel` is the trainable nn.Module, made of the modules below that hold the parameters (the
MLP, encoder, decoder and priors; their computations are app.model.nn's and
app.model.distributions' functions of those parameters); `GenerativeModel` is the frozen view the
score functions take, so they work equally with hand-written f and g (tests, a GAN generator without
encoder). This module imports no training, bundle or web code.
"""

from __future__ import annotations

import copy
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from app.model.distributions import (
    GaussianMixture,
    LatentDistribution,
    StandardNormal,
    VonMisesFisherMixture,
)
from app.model.nn import encode, encode_with_jacobian, mlp_forward, mlp_with_curvature, mlp_with_jacobian
from app.model.spec import Architecture, Geometry, intrinsic_dim, layer_names


class JacobianMap(Protocol):
    """A batched map that can also return its Jacobian: (B, n) -> (B, m), (B, m, n)."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


class CurvedMap(JacobianMap, Protocol):
    """A decoder whose second derivatives the projection's Newton steps use."""

    def forward_with_curvature(self, x: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """Value (B, m), Jacobian (B, m, n), and w (B, m) -> sum_o w_o Hessian of output o (B, n, n)."""
        ...


class FunctionMap:
    """Any batched differentiable function as a `JacobianMap`, e.g. a GAN generator or a closed-form f.

    Its Jacobian is exact, by forward-mode autodiff vectorised over the batch (torch.func).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        def one_row(row: Tensor) -> Tensor:
            return self.fn(row.unsqueeze(0)).squeeze(0)

        return self.fn(x), torch.func.vmap(torch.func.jacfwd(one_row))(x)

    def forward_with_curvature(self, x: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        value, J = self.forward_with_jacobian(x)

        def contract(w: Tensor) -> Tensor:
            def weighted(row: Tensor, w_row: Tensor) -> Tensor:
                return (self.fn(row.unsqueeze(0)).squeeze(0) * w_row).sum()

            return torch.func.vmap(torch.func.hessian(weighted))(x, w)

        return value, J, contract


class ScaledOutputs:
    """z -> f(z) * r for a CurvedMap f and fixed factors r (m,): value, Jacobian and curvature
    scaled alike. With r = 1 / sqrt(w) it whitens a decoder, so that noise sigma2 diag(w) on f's
    outputs is sigma2 I on its own."""

    def __init__(self, inner: CurvedMap, r: Tensor) -> None:
        self.inner, self.r = inner, r

    def __call__(self, x: Tensor) -> Tensor:
        value = self.inner(x)
        return value * self.r.to(value.dtype)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        value, J = self.inner.forward_with_jacobian(x)
        r = self.r.to(value.dtype)
        return value * r, J * r[:, None]

    def forward_with_curvature(self, x: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        value, J, contract = self.inner.forward_with_curvature(x)
        r = self.r.to(value.dtype)
        return value * r, J * r[:, None], lambda w: contract(w * r)


@dataclass(frozen=True)
class GenerativeModel:
    """x = f(z) + e, z ~ p(z), with g an approximate inverse of f (optional)."""

    decoder: CurvedMap  # f: R^k -> R^d
    prior: LatentDistribution  # p(z) on R^k or on S^(k-1)
    geometry: Geometry
    sigma2: float = 1.0  # variance of each coordinate of e in the full residual
    sigma2_projected: float | None = None  # the noise variance of the projected method's marginal
    encoder: JacobianMap | None = None  # g: R^d -> R^k
    # e ~ N(0, sigma2 diag(w)), w (d,) each feature's variance relative to sigma2; None: w = 1, the
    # paper's sigma2 I.
    relative_variance: tuple[float, ...] | None = None

    @property
    def latent_dim(self) -> int:
        return self.prior.dim

    @property
    def intrinsic_dim(self) -> int:
        return intrinsic_dim(self.prior.dim, self.geometry)


class MLP(nn.Module):
    """`depth` hidden layers of `hidden` units with `activation`, then a linear output layer."""

    def __init__(self, n_in: int, n_out: int, hidden: int, depth: int, activation: str) -> None:
        super().__init__()
        sizes = [n_in] + [hidden] * depth + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.activation = activation

    def weights(self) -> list[tuple[Tensor, Tensor]]:
        return [(layer.weight, layer.bias) for layer in self.layers]

    def forward(self, x: Tensor) -> Tensor:  # (B, n_in) -> (B, n_out)
        return mlp_forward(x, self.weights(), self.activation)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, n_in) -> value (B, n_out) and Jacobian d value / d x, (B, n_out, n_in)."""
        return mlp_with_jacobian(x, self.weights(), self.activation)

    def forward_with_curvature(self, x: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """Value, Jacobian and the contraction w -> sum_o w_o Hessian of output o: see mlp_with_curvature."""
        return mlp_with_curvature(x, self.weights(), self.activation)


class Encoder(nn.Module):
    """g: R^d -> R^k, or onto the unit sphere S^(k-1) for the spherical geometry."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.geometry = arch.geometry
        self.net = MLP(arch.input_dim, arch.latent_dim, arch.hidden, arch.depth, arch.activation)

    def forward(self, x: Tensor) -> Tensor:  # (B, d) -> (B, k)
        return encode(x, self.net.weights(), self.net.activation, self.geometry)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, d) -> z (B, k) and J_g (B, k, d) in ambient latent coordinates."""
        return encode_with_jacobian(x, self.net.weights(), self.net.activation, self.geometry)


class Decoder(nn.Module):
    """f: R^k -> R^d. On the sphere only its restriction to S^(k-1) matters."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.net = MLP(arch.latent_dim, arch.input_dim, arch.hidden, arch.depth, arch.activation)

    def forward(self, z: Tensor) -> Tensor:  # (B, k) -> (B, d)
        return self.net(z)

    def forward_with_jacobian(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, k) -> x (B, d) and J_f (B, d, k) in ambient latent coordinates."""
        return self.net.forward_with_jacobian(z)

    def forward_with_curvature(self, z: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """As MLP.forward_with_curvature, in ambient latent coordinates."""
        return self.net.forward_with_curvature(z)


Encode = Callable[[Tensor], Tensor]


class Prior(nn.Module, ABC):
    """Learnable parameters of p(z); `distribution` turns them into a density given the encoder,
    `stacked` does the same for C models trained together from their stacked parameters."""

    @abstractmethod
    def distribution(self, encoder: Encoder) -> LatentDistribution: ...

    @staticmethod
    @abstractmethod
    def stacked(
        arch: Architecture, params: dict[str, Tensor], encode: Encode, like: Tensor
    ) -> LatentDistribution:
        """params: the state of C models stacked along a leading axis, named as ManifoldModel's;
        encode: their stacked encoder; like: a tensor of their dtype and device."""


class NormalPrior(Prior):
    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def distribution(self, encoder: Encoder) -> LatentDistribution:
        reference = next(encoder.parameters())  # dtype and device of the model
        return StandardNormal(self.latent_dim, dtype=reference.dtype, device=reference.device)

    @staticmethod
    def stacked(
        arch: Architecture, params: dict[str, Tensor], encode: Encode, like: Tensor
    ) -> LatentDistribution:
        models = next(iter(params.values())).shape[0]
        return StandardNormal(arch.latent_dim, like.dtype, like.device, batch_shape=(models,))


class VampGaussianPrior(Prior):
    """Mixture of K diagonal Gaussians centred at the encodings of K learnable pseudo-inputs."""

    def __init__(self, components: int, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.pseudo_inputs = nn.Parameter(torch.randn(components, input_dim))
        self.log_scales = nn.Parameter(torch.zeros(components, latent_dim))

    @staticmethod
    def from_parameters(locations: Tensor, log_scales: Tensor) -> GaussianMixture:
        """Also used on stacked (C, K, .) tensors when candidates train together."""
        return GaussianMixture(locations, torch.exp(log_scales))

    def distribution(self, encoder: Encoder) -> LatentDistribution:
        return self.from_parameters(encoder(self.pseudo_inputs), self.log_scales)

    @staticmethod
    def stacked(
        arch: Architecture, params: dict[str, Tensor], encode: Encode, like: Tensor
    ) -> LatentDistribution:
        return VampGaussianPrior.from_parameters(
            encode(params["prior.pseudo_inputs"]), params["prior.log_scales"]
        )


class VampVMFPrior(Prior):
    """Mixture of K von Mises-Fisher densities whose directions are encoded pseudo-inputs.

    kappa = softplus(raw): positive and unbounded, unlike the reference code's 100 * sigmoid.
    """

    def __init__(self, components: int, input_dim: int, initial_kappa: float = 10.0) -> None:
        super().__init__()
        self.pseudo_inputs = nn.Parameter(torch.randn(components, input_dim))
        raw = math.log(math.expm1(initial_kappa))  # inverse softplus
        self.kappa_raw = nn.Parameter(torch.full((components,), raw))

    @staticmethod
    def from_parameters(locations: Tensor, kappa_raw: Tensor) -> VonMisesFisherMixture:
        """Also used on stacked (C, K, .) tensors when candidates train together."""
        return VonMisesFisherMixture(locations, nn.functional.softplus(kappa_raw))

    def distribution(self, encoder: Encoder) -> LatentDistribution:
        return self.from_parameters(encoder(self.pseudo_inputs), self.kappa_raw)

    @staticmethod
    def stacked(
        arch: Architecture, params: dict[str, Tensor], encode: Encode, like: Tensor
    ) -> LatentDistribution:
        return VampVMFPrior.from_parameters(encode(params["prior.pseudo_inputs"]), params["prior.kappa_raw"])


PRIORS: dict[str, type[Prior]] = {"normal": NormalPrior, "vamp": VampGaussianPrior, "vmf": VampVMFPrior}


def build_prior(arch: Architecture) -> Prior:
    if arch.prior == "normal":
        return NormalPrior(arch.latent_dim)
    if arch.prior == "vamp":
        return VampGaussianPrior(arch.components, arch.input_dim, arch.latent_dim)
    return VampVMFPrior(arch.components, arch.input_dim)


class ManifoldModel(nn.Module):
    """Encoder, decoder and prior rebuilt from an `Architecture` alone."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        self.prior = build_prior(arch)
        self.sigma2 = 1.0
        self.sigma2_projected: float | None = None
        self.relative_variance: tuple[float, ...] | None = None

    def prior_distribution(self) -> LatentDistribution:
        return self.prior.distribution(self.encoder)

    @staticmethod
    def stacked_forward(
        arch: Architecture, params: dict[str, Tensor], x: Tensor
    ) -> tuple[Tensor, Tensor, LatentDistribution]:
        """C models of one architecture at once, their state stacked along a leading axis
        (torch.func.stack_module_state): x (B, d) -> z (C, B, k), x_hat (C, B, d) and their priors,
        by batched matrix products through the same mlp_forward the single model uses."""

        encoder_layers = ManifoldModel.stacked_layers(arch, params, "encoder")

        def encoder(v: Tensor) -> Tensor:
            return encode(v, encoder_layers, arch.activation, arch.geometry)

        z = encoder(x)
        x_hat = mlp_forward(z, ManifoldModel.stacked_layers(arch, params, "decoder"), arch.activation)
        return z, x_hat, PRIORS[arch.prior].stacked(arch, params, encoder, x)

    @staticmethod
    def stacked_layers(
        arch: Architecture, params: dict[str, Tensor], net: str
    ) -> list[tuple[Tensor, Tensor]]:
        """The (weight (C, out, in), bias (C, out)) of each layer of `net` of C stacked models."""
        names = (layer_names(net, i) for i in range(arch.depth + 1))
        return [(params[weight], params[bias]) for weight, bias in names]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def with_dtype(self, dtype: torch.dtype) -> ManifoldModel:
        """This model, or a copy in another floating dtype (float32 weights are exact in float64)."""
        return self if dtype == self.dtype else copy.deepcopy(self).to(dtype)

    def generative(self) -> GenerativeModel:
        return GenerativeModel(
            decoder=self.decoder,
            prior=self.prior_distribution(),
            geometry=self.arch.geometry,
            sigma2=self.sigma2,
            sigma2_projected=self.sigma2_projected,
            relative_variance=self.relative_variance,
            encoder=self.encoder,
        )
