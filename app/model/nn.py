"""Multilayer perceptrons that return their batched Jacobian together with their value.

The Jacobian is the analytic layer-by-layer product, carried forward as a stack of tangent vectors
(forward mode): for an affine layer T <- W T, for an activation T <- a'(h) * T. It costs a few extra
matrix products per layer, is exact, needs no autograd graph and is a plain tensor program, so it
exports to ONNX and runs batched on any device. No Python loop over rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from app.model.spec import ACTIVATION_NAMES, Architecture


def _swish(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(h)
    return h * s, s * (1 + h * (1 - s)), s * (1 - s) * (2 + h * (1 - 2 * s))


def _tanh(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(h)
    slope = 1 - t * t
    return t, slope, -2 * t * slope


def _relu(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    positive = (h > 0).to(h.dtype)
    return h * positive, positive, torch.zeros_like(h)


def _softplus(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(h)
    return nn.functional.softplus(h), s, s * (1 - s)


def _linear(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return h, torch.ones_like(h), torch.zeros_like(h)


# Each activation returns (a(h), a'(h), a''(h)) so the tangent and curvature updates reuse the
# forward computation.
ACTIVATIONS_WITH_SLOPE: dict[str, Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]] = {
    "swish": _swish,
    "tanh": _tanh,
    "relu": _relu,
    "softplus": _softplus,
    "linear": _linear,
}
# The value alone, for the plain forward pass (training and reconstruction need no slopes).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "swish": nn.functional.silu,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softplus": nn.functional.softplus,
    "linear": lambda h: h,
}
assert tuple(ACTIVATIONS) == tuple(ACTIVATIONS_WITH_SLOPE) == ACTIVATION_NAMES, (
    "app.model.spec names the activations"
)

Layers = Sequence[tuple[Tensor, Tensor]]  # (weight (..., out, in), bias (..., out)) per layer


def _affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    if weight.ndim == 2:
        return nn.functional.linear(x, weight, bias)
    # Stacked candidates: weight (C, out, in), x (B, in) shared or (C, B, in) -> (C, B, out).
    x = x.expand(weight.shape[0], *x.shape) if x.ndim == 2 else x
    return torch.baddbmm(bias.unsqueeze(-2), x, weight.transpose(-1, -2))


def mlp_forward(x: Tensor, layers: Layers, activation: str) -> Tensor:
    """The MLP as a function of its weights, so stacked training candidates share this code path."""
    act = ACTIVATIONS[activation]
    for weight, bias in layers[:-1]:
        x = act(_affine(x, weight, bias))
    return _affine(x, *layers[-1])


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
        value, T, _ = self._tangents(x)
        return value, T.transpose(1, 2)

    def forward_with_curvature(self, x: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """Value (B, n_out), Jacobian (B, n_out, n_in), and w (B, n_out) -> sum_o w_o times the
        Hessian of output o, (B, n_in, n_in).

        Affine layers have no curvature, so the Hessian of w . MLP(x) collects one term per
        activation: sum_l T_l diag(a''(h_l) * adj_l) T_l^T, with T_l the tangents of the
        pre-activation h_l (forward) and adj_l the derivative of w . MLP with respect to a(h_l)
        (backward). One backward pass over the forward pass's cache.
        """
        value, T, cache = self._tangents(x)

        def contract(w: Tensor) -> Tensor:
            adjoint = w  # d(w . output) / d(pre-activation of the layer after)
            total = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
            for layer, (tangents, slope, bend) in zip(
                reversed(self.layers[1:]), reversed(cache), strict=True
            ):
                adjoint = adjoint @ layer.weight  # d / d a(h_l)
                total = total + (tangents * (bend * adjoint).unsqueeze(1)) @ tangents.transpose(1, 2)
                adjoint = adjoint * slope
            return total

        return value, T.transpose(1, 2), contract

    def _tangents(self, x: Tensor) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        """Value, transposed Jacobian (B, n_in, n_out) and, per hidden layer, its pre-activation's
        tangents (B, n_in, width), a'(h) and a''(h)."""
        # T holds the tangents transposed, (B, n_in, width), so each layer is one batched matmul
        # on the right, the same product as the layer itself.
        activation = ACTIVATIONS_WITH_SLOPE[self.activation]
        T = self.layers[0].weight.T.expand(x.shape[0], -1, -1)
        h = self.layers[0](x)
        cache = []
        for layer in self.layers[1:]:
            h, slope, bend = activation(h)
            cache.append((T, slope, bend))
            T = T * slope.unsqueeze(1)
            h = layer(h)
            T = T @ layer.weight.T
        return h, T, cache


def normalize_to_sphere(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def encode(x: Tensor, layers: Layers, activation: str, geometry: str) -> Tensor:
    v = mlp_forward(x, layers, activation)
    return normalize_to_sphere(v) if geometry == "sphere" else v


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

    def forward_with_curvature(self, z: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """As MLP.forward_with_curvature, in ambient latent coordinates."""
        return self.net.forward_with_curvature(z)
