"""Multilayer perceptrons that return their batched Jacobian together with their value.

The Jacobian is the analytic layer-by-layer product, carried forward as a stack of tangent vectors
(forward mode): for an affine layer T <- W T, for an activation T <- a'(h) * T. It costs a few extra
matrix products per layer, is exact, needs no autograd graph and is a plain tensor program, so it
exports to ONNX and runs batched on any device. No Python loop over rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from app.geometry import Geometry, intrinsic_dim

ActivationName = Literal["swish", "tanh", "relu", "softplus", "linear"]
PriorName = Literal["normal", "vamp", "vmf"]
# Which latent geometry each prior is a density on: a Gaussian is no density on the sphere, nor a
# vMF on R^k.
PRIOR_GEOMETRY: dict[str, Geometry] = {"normal": "euclidean", "vamp": "euclidean", "vmf": "sphere"}


def _swish(h: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(h)
    return h * s, s * (1 + h * (1 - s))


def _tanh(h: Tensor) -> tuple[Tensor, Tensor]:
    t = torch.tanh(h)
    return t, 1 - t * t


def _relu(h: Tensor) -> tuple[Tensor, Tensor]:
    positive = (h > 0).to(h.dtype)
    return h * positive, positive


def _softplus(h: Tensor) -> tuple[Tensor, Tensor]:
    return nn.functional.softplus(h), torch.sigmoid(h)


def _linear(h: Tensor) -> tuple[Tensor, Tensor]:
    return h, torch.ones_like(h)


# Each activation returns (a(h), a'(h)) so the tangent update reuses the forward computation.
ACTIVATIONS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "swish": _swish,
    "tanh": _tanh,
    "relu": _relu,
    "softplus": _softplus,
    "linear": _linear,
}


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild encoder, decoder and prior; stored verbatim in a model bundle."""

    input_dim: int  # d
    latent_dim: int  # k, the ambient latent size (the sphere S^(k-1) has intrinsic size k - 1)
    hidden: int = 64
    depth: int = 3  # hidden layers in each of encoder and decoder
    activation: ActivationName = "swish"
    geometry: Geometry = "euclidean"
    prior: PriorName = "normal"
    components: int = 1  # K, mixture components of the vamp and vmf priors

    def __post_init__(self) -> None:
        if self.input_dim < 1 or self.latent_dim < 1:
            raise ValueError(
                f"input_dim and latent_dim must be >= 1, got {self.input_dim}, {self.latent_dim}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.geometry not in ("euclidean", "sphere"):
            raise ValueError(f"unknown geometry {self.geometry!r}; choose 'euclidean' or 'sphere'")
        if self.geometry == "sphere" and self.latent_dim < 2:
            raise ValueError("a spherical latent space needs latent_dim >= 2 (S^(k-1) with k >= 2)")
        if self.intrinsic_dim > self.input_dim:
            raise ValueError(
                f"latent size {self.intrinsic_dim} (intrinsic) exceeds the data size {self.input_dim}: "
                "a manifold cannot have more dimensions than the space it lies in"
            )
        if self.prior not in PRIOR_GEOMETRY:
            raise ValueError(f"unknown prior {self.prior!r}; choose one of {sorted(PRIOR_GEOMETRY)}")
        if PRIOR_GEOMETRY[self.prior] != self.geometry:
            raise ValueError(
                f"prior {self.prior!r} is a density on the {PRIOR_GEOMETRY[self.prior]} latent space, "
                f"not on the {self.geometry} one"
            )
        if self.components < 1:
            raise ValueError(f"components must be >= 1, got {self.components}")
        if self.hidden < 1 or self.depth < 0:
            raise ValueError(f"hidden must be >= 1 and depth >= 0, got {self.hidden}, {self.depth}")

    @property
    def intrinsic_dim(self) -> int:
        """m: the manifold's dimension, k for Euclidean latents and k - 1 on the sphere."""
        return intrinsic_dim(self.latent_dim, self.geometry)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class MLP(nn.Module):
    """`depth` hidden layers of `hidden` units with `activation`, then a linear output layer."""

    def __init__(self, n_in: int, n_out: int, hidden: int, depth: int, activation: str) -> None:
        super().__init__()
        sizes = [n_in] + [hidden] * depth + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:  # (B, n_in) -> (B, n_out)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))[0]
        return self.layers[-1](x)

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, n_in) -> value (B, n_out) and Jacobian d value / d x, (B, n_out, n_in)."""
        # T holds the tangents transposed, (B, n_in, width), so each layer is one batched matmul
        # on the right, the same product as the layer itself.
        T = self.layers[0].weight.T.expand(x.shape[0], -1, -1)
        h = self.layers[0](x)
        for layer in self.layers[1:]:
            h, slope = self.activation(h)
            T = T * slope.unsqueeze(1)
            h = layer(h)
            T = T @ layer.weight.T
        return h, T.transpose(1, 2)


def normalize_to_sphere(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


class Encoder(nn.Module):
    """g: R^d -> R^k, or onto the unit sphere S^(k-1) for the spherical geometry."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.geometry = arch.geometry
        self.net = MLP(arch.input_dim, arch.latent_dim, arch.hidden, arch.depth, arch.activation)

    def forward(self, x: Tensor) -> Tensor:  # (B, d) -> (B, k)
        v = self.net(x)
        return normalize_to_sphere(v) if self.geometry == "sphere" else v

    def forward_with_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, d) -> z (B, k) and J_g (B, k, d) in ambient latent coordinates."""
        v, J = self.net.forward_with_jacobian(x)
        if self.geometry == "euclidean":
            return v, J
        # d(v/|v|)/dv = (I - z z^T) / |v|: the Jacobian's range is the tangent space at z.
        norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        z = v / norm
        J = (J - z.unsqueeze(-1) * (z.unsqueeze(1) @ J)) / norm.unsqueeze(-1)
        return z, J


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
