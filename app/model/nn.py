"""Multilayer perceptrons that return their batched Jacobian together with their value, in torch
and as ONNX nodes side by side.

The Jacobian is the analytic layer-by-layer product, carried forward as a stack of tangent vectors
(forward mode): for an affine layer T <- W T, for an activation T <- a'(h) * T. It costs a few extra
matrix products per layer, is exact, needs no autograd graph and is a plain tensor program, so it
runs batched on any device and its graph form is the same products. No Python loop over rows.

Both halves are functions of the weights: the torch half takes tensors (the modules holding them as
parameters are app.model.manifold's), the graph half a bundle's numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from app.model.graph import Graph, onnx_type
from app.model.spec import ACTIVATION_NAMES, layer_names

# torch is imported only inside the functions that compute with it, so that the serving install,
# which has no torch, can build and verify graphs with the emitters (app.bundle.graphs).
if TYPE_CHECKING:
    from torch import Tensor

    Layers = Sequence[tuple[Tensor, Tensor]]  # (weight (..., out, in), bias (..., out)) per layer


@dataclass(frozen=True)
class Activation:
    """One activation in torch and as ONNX nodes, side by side.

    derivatives: h -> (a(h), a'(h), a''(h)), so the tangent and curvature updates reuse the forward
    computation; value: a(h) alone, the fast path of the plain forward pass; emit(g, h, order,
    dtype): the same [a, a', a''][: order + 1] as graph nodes.
    """

    derivatives: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    value: Callable[[Tensor], Tensor]
    emit: Callable[[Graph, str, int, type], list[str]]


def _swish(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    import torch

    s = torch.sigmoid(h)
    return h * s, s * (1 + h * (1 - s)), s * (1 - s) * (2 + h * (1 - 2 * s))


def _emit_swish(g: Graph, h: str, order: int, dtype: type) -> list[str]:
    s = g.op("Sigmoid", h)
    out = [g.mul(h, s)]
    if order >= 1:
        one = g.const(1.0, dtype)
        s_complement = g.sub(one, s)
        out.append(g.mul(s, g.add(one, g.mul(h, s_complement))))
    if order >= 2:  # s (1 - s) (2 + h (1 - 2 s))
        bend = g.add(g.const(2.0, dtype), g.mul(h, g.sub(s_complement, s)))
        out.append(g.mul(g.mul(s, s_complement), bend))
    return out


def _tanh(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    import torch

    t = torch.tanh(h)
    slope = 1 - t * t
    return t, slope, -2 * t * slope


def _emit_tanh(g: Graph, h: str, order: int, dtype: type) -> list[str]:
    t = g.op("Tanh", h)
    out = [t]
    if order >= 1:
        out.append(g.sub(g.const(1.0, dtype), g.mul(t, t)))
    if order >= 2:
        out.append(g.mul(g.mul(t, out[1]), g.const(-2.0, dtype)))
    return out


def _relu(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    import torch

    positive = (h > 0).to(h.dtype)
    return h * positive, positive, torch.zeros_like(h)


def _emit_relu(g: Graph, h: str, order: int, dtype: type) -> list[str]:
    out = [g.op("Relu", h)]
    if order >= 1:
        out.append(g.cast(g.op("Greater", h, g.const(0.0, dtype)), onnx_type(dtype)))
    return out + [g.mul(h, g.const(0.0, dtype))] * (order >= 2)


def _softplus(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    import torch

    s = torch.sigmoid(h)
    return torch.nn.functional.softplus(h), s, s * (1 - s)


def _emit_softplus(g: Graph, h: str, order: int, dtype: type) -> list[str]:
    if dtype is np.float32:
        out = [g.op("Softplus", h)]
    else:  # onnxruntime has no float64 Softplus: max(h, 0) + log(1 + exp(-|h|)), exact to rounding
        tail = g.op("Log", g.add(g.const(1.0, dtype), g.op("Exp", g.op("Neg", g.op("Abs", h)))))
        out = [g.add(g.op("Relu", h), tail)]
    if order >= 1:
        out.append(g.op("Sigmoid", h))
    if order >= 2:
        out.append(g.mul(out[1], g.sub(g.const(1.0, dtype), out[1])))
    return out


def _linear(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    import torch

    return h, torch.ones_like(h), torch.zeros_like(h)


def _emit_linear(g: Graph, h: str, order: int, dtype: type) -> list[str]:
    zero = g.mul(h, g.const(0.0, dtype))
    return [h, g.add(zero, g.const(1.0, dtype)), zero][: order + 1]


def _swish_value(h: Tensor) -> Tensor:
    import torch

    return torch.nn.functional.silu(h)


def _tanh_value(h: Tensor) -> Tensor:
    import torch

    return torch.tanh(h)


def _relu_value(h: Tensor) -> Tensor:
    import torch

    return torch.relu(h)


def _softplus_value(h: Tensor) -> Tensor:
    import torch

    return torch.nn.functional.softplus(h)


ACTIVATIONS: dict[str, Activation] = {
    "swish": Activation(_swish, _swish_value, _emit_swish),
    "tanh": Activation(_tanh, _tanh_value, _emit_tanh),
    "relu": Activation(_relu, _relu_value, _emit_relu),
    "softplus": Activation(_softplus, _softplus_value, _emit_softplus),
    "linear": Activation(_linear, lambda h: h, _emit_linear),
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "app.model.spec names the activations"


def emit_activation(g: Graph, h: str, name: str, order: int, dtype: type) -> list[str]:
    """[a(h)], [a(h), a'(h)] or [a(h), a'(h), a''(h)] by `order`, as graph nodes."""
    return ACTIVATIONS[name].emit(g, h, order, dtype)


def _affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    import torch

    if weight.ndim == 2:
        return torch.nn.functional.linear(x, weight, bias)
    # Stacked candidates: weight (C, out, in), x (B, in) shared or (C, B, in) -> (C, B, out).
    x = x.expand(weight.shape[0], *x.shape) if x.ndim == 2 else x
    return torch.baddbmm(bias.unsqueeze(-2), x, weight.transpose(-1, -2))


def mlp_forward(x: Tensor, layers: Layers, activation: str) -> Tensor:
    """The MLP as a function of its weights, so stacked training candidates share this code path."""
    act = ACTIVATIONS[activation].value
    for weight, bias in layers[:-1]:
        x = act(_affine(x, weight, bias))
    return _affine(x, *layers[-1])


def mlp_with_jacobian(x: Tensor, layers: Layers, activation: str) -> tuple[Tensor, Tensor]:
    """(B, n_in) -> value (B, n_out) and Jacobian d value / d x, (B, n_out, n_in); with stacked
    layers (weights (C, out, in)) and x (C, B, n_in) or shared, (C, B, n_out) and (C, B, n_out, n_in)."""
    value, T, _ = _tangents(x, layers, activation)
    return value, T.transpose(-1, -2)


def mlp_with_curvature(
    x: Tensor, layers: Layers, activation: str
) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """Value (B, n_out), Jacobian (B, n_out, n_in), and w (B, n_out) -> sum_o w_o times the
    Hessian of output o, (B, n_in, n_in).

    Affine layers have no curvature, so the Hessian of w . MLP(x) collects one term per
    activation: sum_l T_l diag(a''(h_l) * adj_l) T_l^T, with T_l the tangents of the
    pre-activation h_l (forward) and adj_l the derivative of w . MLP with respect to a(h_l)
    (backward). One backward pass over the forward pass's cache.
    """
    import torch

    value, T, cache = _tangents(x, layers, activation)

    def contract(w: Tensor) -> Tensor:
        adjoint = w  # d(w . output) / d(pre-activation of the layer after)
        total = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
        for (weight, _), (tangents, slope, bend) in zip(reversed(layers[1:]), reversed(cache), strict=True):
            adjoint = adjoint @ weight  # d / d a(h_l)
            total = total + (tangents * (bend * adjoint).unsqueeze(1)) @ tangents.transpose(1, 2)
            adjoint = adjoint * slope
        return total

    return value, T.transpose(1, 2), contract


def _tangents(
    x: Tensor, layers: Layers, activation: str
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """Value, transposed Jacobian (B, n_in, n_out) and, per hidden layer, its pre-activation's
    tangents (B, n_in, width), a'(h) and a''(h)."""
    # T holds the tangents transposed, (B, n_in, width), so each layer is one batched matmul
    # on the right, the same product as the layer itself.
    derivatives = ACTIVATIONS[activation].derivatives
    first_weight, first_bias = layers[0]
    if first_weight.ndim == 3:  # stacked models (C, width, in): tangents (C, B, in, width)
        T = first_weight.mT.unsqueeze(1).expand(-1, x.shape[-2], -1, -1)
    else:
        T = first_weight.T.expand(x.shape[0], -1, -1)
    h = _affine(x, first_weight, first_bias)
    cache = []
    for weight, bias in layers[1:]:
        h, slope, bend = derivatives(h)
        cache.append((T, slope, bend))
        T = T * slope.unsqueeze(-2)
        h = _affine(h, weight, bias)
        T = _times_transposed(T, weight)
    return h, T, cache


def _times_transposed(T: Tensor, weight: Tensor) -> Tensor:
    """T W^T: (B, n, in) by (out, in), or stacked models' (C, B, n, in) by (C, out, in) as one
    product per model over all its rows' tangents rather than one small product per row."""
    if weight.ndim == 2:
        return T @ weight.T
    models, rows, n, width = T.shape
    return (T.reshape(models, rows * n, width) @ weight.mT).reshape(models, rows, n, weight.shape[-2])


def normalize_to_sphere(v: Tensor) -> Tensor:
    import torch

    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def encode(x: Tensor, layers: Layers, activation: str, geometry: str) -> Tensor:
    """g: R^d -> R^k, or onto the unit sphere S^(k-1) for the spherical geometry."""
    v = mlp_forward(x, layers, activation)
    return normalize_to_sphere(v) if geometry == "sphere" else v


def encode_with_jacobian(x: Tensor, layers: Layers, activation: str, geometry: str) -> tuple[Tensor, Tensor]:
    """(B, d) -> z (B, k) and J_g (B, k, d) in ambient latent coordinates."""
    import torch

    v, J = mlp_with_jacobian(x, layers, activation)
    if geometry == "euclidean":
        return v, J
    # d(v/|v|)/dv = (I - z z^T) / |v|: the Jacobian's range is the tangent space at z.
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    z = v / norm
    J = (J - z.unsqueeze(-1) * (z.unsqueeze(1) @ J)) / norm.unsqueeze(-1)
    return z, J


# --- the same networks as ONNX nodes, from a bundle's numpy weights -------------------------------

ArrayLayers = list[tuple[NDArray[np.floating], NDArray[np.floating]]]  # (W^T (in, out), b (out,))


def numpy_layers(weights: dict[str, NDArray[np.floating]], net: str, depth: int, dtype: type) -> ArrayLayers:
    """(W^T, b) per layer in `dtype`, transposed once so that every use shares one initializer."""
    layers = []
    for i in range(depth + 1):
        weight, bias = layer_names(net, i)
        layers.append(
            (np.ascontiguousarray(weights[weight].T, dtype=dtype), np.asarray(weights[bias], dtype=dtype))
        )
    return layers


def emit_mlp(g: Graph, x: str, layers: ArrayLayers, activation: str) -> str:
    dtype = layers[0][0].dtype.type
    for i, (wt, b) in enumerate(layers):
        x = g.add(g.matmul(x, g.weight(wt)), g.weight(b))
        if i < len(layers) - 1:
            x = emit_activation(g, x, activation, 0, dtype)[0]
    return x


def emit_mlp_with_tangents(
    g: Graph, x: str, layers: ArrayLayers, activation: str, cache: list[tuple[str, str, str]] | None = None
) -> tuple[str, str]:
    """Value (B, out) and transposed Jacobian T = J^T (B, in, out), carried forward layer by layer.

    With a `cache` list, each hidden layer's pre-activation tangents (B, in, width), a'(h) and
    a''(h) are appended to it, for emit_mlp_curvature.
    """
    dtype = layers[0][0].dtype.type
    w0t, b0 = layers[0]
    h = g.add(g.matmul(x, g.weight(w0t)), g.weight(b0))
    tangents = g.weight(w0t)  # (in, width): broadcast over the batch by the first Mul
    for wt, b in layers[1:]:
        value, slope, *bend = emit_activation(g, h, activation, 1 if cache is None else 2, dtype)
        if cache is not None:
            cache.append((tangents, slope, bend[0]))
        tangents = g.mul(tangents, g.unsqueeze(slope, 1))  # (B, in, width)
        h = g.add(g.matmul(value, g.weight(wt)), g.weight(b))
        tangents = g.matmul(tangents, g.weight(wt))
    if len(layers) == 1:  # a linear map: J^T is the constant weight, broadcast to the batch
        zeros = g.mul(g.unsqueeze(g.sum(x, 1, keepdims=True), 2), g.const(0.0, dtype))
        tangents = g.add(zeros, tangents)
    return h, tangents


def emit_mlp_curvature(
    g: Graph, cache: list[tuple[str, str, str]], weights_t: list[NDArray[np.floating]], w: str
) -> str:
    """MLP.forward_with_curvature's contraction: the Hessian of w . MLP(x) (B, in, in) as
    sum_l T_l diag(a''(h_l) adj_l) T_l^T, adjoints by one backward pass. weights_t: each layer
    after the first as W (out, in), the transpose of what numpy_layers holds."""
    adjoint, total = w, None
    for layer in reversed(range(len(cache))):
        tangents, slope, bend = cache[layer]
        adjoint = g.matmul(adjoint, g.weight(weights_t[layer]))  # d / d a(h_l)
        scaled = g.mul(tangents, g.unsqueeze(g.mul(bend, adjoint), 1))
        # the first layer's tangents are W_0^T itself (in, width), shared by the batch
        transposed = g.op("Transpose", tangents) if layer == 0 else g.transpose(tangents)
        term = g.matmul(scaled, transposed)
        total = term if total is None else g.add(total, term)
        adjoint = g.mul(adjoint, slope)
    assert total is not None
    return total
