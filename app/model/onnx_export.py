"""The whole scoring computation of a bundle as one ONNX graph per score method.

Built directly from the bundle's numpy weights with onnx.helper, so export needs neither PyTorch
nor tracing, takes milliseconds, and the graph is exactly the mathematics of app/scores.py:

  raw rows (float64) -> scaler (float64) -> encoder -> decoder with its Jacobian by forward-mode
  tangents -> (sphere) tangent-space restriction -> log volume -> residual -> prior -> parts

The closed-form methods run their networks in float32 and factorise in float64: the log volume
by modified Gram-Schmidt on the Jacobian's m rows (log|det R| = sum log s_i, no Gram matrix whose
determinant would underflow). `encoder` first makes an orthonormal basis of the manifold's tangent
space by Gram-Schmidt with re-orthogonalisation (CGS2). m is known at export time, so these are
unrolled. `projected` runs in float64 throughout: its Levenberg-Marquardt iteration is an ONNX
Loop that stops when every row has converged or after PROJECTION_STEPS steps, the same per-row
rule as app.scores.map_point.

Outputs of every graph: log_prob, log_prior, log_volume, log_residual, reconstruction_error (B,)
and residual (B, d); float32, float64 for `projected`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.model.methods import OUTPUTS, check_method
from app.model.spec import (
    PIVOT_FLOOR,
    PROJECTION_STEPS,
    PROJECTION_TOLERANCE,
    SINGULAR_VALUE_FLOOR,
    Architecture,
)

OPSET = 17
LOG_2PI = math.log(2 * math.pi)
F32, F64 = 1, 11  # onnx.TensorProto.FLOAT, DOUBLE
BOOL, INT64 = 9, 7

Layers = list[tuple[NDArray[np.floating], NDArray[np.floating]]]


class Graph:
    """A minimal builder: each method adds one node and returns its output's name.

    A Loop body is a Graph with a parent: it shares the parent's name counter, and its weights
    are initializers of the parent, read from the outer scope.
    """

    def __init__(self, parent: Graph | None = None) -> None:
        import onnx.helper as h

        self.h = h
        self.parent = parent
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0
        # id of a weight array -> (the array, its initializer); holding the array keeps its id unique
        self.weights: dict[int, tuple[NDArray[Any], str]] = {}

    def name(self, hint: str) -> str:
        if self.parent is not None:
            return self.parent.name(hint)
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: NDArray[Any] | float, dtype: type = np.float32) -> str:
        from onnx import numpy_helper

        name = self.name("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, value: NDArray[Any]) -> str:
        """A constant used many times (unrolled or looped): one initializer per array object."""
        if self.parent is not None:
            return self.parent.weight(value)
        if id(value) not in self.weights:
            self.weights[id(value)] = (value, self.const(value, value.dtype.type))
        return self.weights[id(value)][1]

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(self.h.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], n_out: int, **attrs: Any) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, **attrs))
        return outs

    # Shorthands for the operations the scores need.
    def add(self, a: str, b: str) -> str:
        return self.op("Add", a, b)

    def sub(self, a: str, b: str) -> str:
        return self.op("Sub", a, b)

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", a, b)

    def div(self, a: str, b: str) -> str:
        return self.op("Div", a, b)

    def matmul(self, a: str, b: str) -> str:
        return self.op("MatMul", a, b)

    def sum(self, x: str, axis: int, keepdims: bool = False) -> str:
        return self.op("ReduceSum", x, self.const(np.array([axis]), np.int64), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", x, self.const(np.array([axis]), np.int64))

    def squeeze(self, x: str, axis: int) -> str:
        return self.op("Squeeze", x, self.const(np.array([axis]), np.int64))

    def transpose(self, x: str) -> str:
        """Swap the last two axes of a (B, p, q) tensor."""
        return self.op("Transpose", x, perm=[0, 2, 1])

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def where(self, condition: str, a: str, b: str) -> str:
        return self.op("Where", condition, a, b)

    def norm(self, v: str, keepdims: bool = False) -> str:
        """Euclidean norm over the last axis of (B, n)."""
        return self.op("Sqrt", self.sum(self.mul(v, v), 1, keepdims=keepdims))


def _layers(weights: dict[str, NDArray[np.float32]], net: str, depth: int, dtype: type) -> Layers:
    """(W^T, b) per layer in `dtype`, transposed once so that every use shares one initializer."""
    return [
        (
            np.ascontiguousarray(weights[f"{net}.net.layers.{i}.weight"].T, dtype=dtype),
            np.asarray(weights[f"{net}.net.layers.{i}.bias"], dtype=dtype),
        )
        for i in range(depth + 1)
    ]


def _swish(g: Graph, h: str, order: int, dtype: type) -> list[str]:
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


def _tanh(g: Graph, h: str, order: int, dtype: type) -> list[str]:
    t = g.op("Tanh", h)
    out = [t]
    if order >= 1:
        out.append(g.sub(g.const(1.0, dtype), g.mul(t, t)))
    if order >= 2:
        out.append(g.mul(g.mul(t, out[1]), g.const(-2.0, dtype)))
    return out


def _softplus(g: Graph, h: str, order: int, dtype: type) -> list[str]:
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


def _relu(g: Graph, h: str, order: int, dtype: type) -> list[str]:
    out = [g.op("Relu", h)]
    if order >= 1:
        out.append(g.cast(g.op("Greater", h, g.const(0.0, dtype)), _onnx_type(dtype)))
    return out + [g.mul(h, g.const(0.0, dtype))] * (order >= 2)


def _linear(g: Graph, h: str, order: int, dtype: type) -> list[str]:
    zero = g.mul(h, g.const(0.0, dtype))
    return [h, g.add(zero, g.const(1.0, dtype)), zero][: order + 1]


ACTIVATIONS = {"swish": _swish, "tanh": _tanh, "softplus": _softplus, "relu": _relu, "linear": _linear}


def _activation(g: Graph, h: str, name: str, order: int, dtype: type) -> list[str]:
    """[a(h)], [a(h), a'(h)] or [a(h), a'(h), a''(h)] by `order`, as app.model.nn's activations."""
    return ACTIVATIONS[name](g, h, order, dtype)


def _onnx_type(dtype: type) -> int:
    return F64 if dtype is np.float64 else F32


def _mlp(g: Graph, x: str, layers: Layers, activation: str) -> str:
    dtype = layers[0][0].dtype.type
    for i, (wt, b) in enumerate(layers):
        x = g.add(g.matmul(x, g.weight(wt)), g.weight(b))
        if i < len(layers) - 1:
            x = _activation(g, x, activation, 0, dtype)[0]
    return x


def _mlp_with_tangents(
    g: Graph, x: str, layers: Layers, activation: str, cache: list[tuple[str, str, str]] | None = None
) -> tuple[str, str]:
    """Value (B, out) and transposed Jacobian T = J^T (B, in, out), carried forward layer by layer.

    With a `cache` list, each hidden layer's pre-activation tangents (B, in, width), a'(h) and
    a''(h) are appended to it, for _mlp_curvature.
    """
    dtype = layers[0][0].dtype.type
    w0t, b0 = layers[0]
    h = g.add(g.matmul(x, g.weight(w0t)), g.weight(b0))
    tangents = g.weight(w0t)  # (in, width): broadcast over the batch by the first Mul
    for wt, b in layers[1:]:
        value, slope, *bend = _activation(g, h, activation, 1 if cache is None else 2, dtype)
        if cache is not None:
            cache.append((tangents, slope, bend[0]))
        tangents = g.mul(tangents, g.unsqueeze(slope, 1))  # (B, in, width)
        h = g.add(g.matmul(value, g.weight(wt)), g.weight(b))
        tangents = g.matmul(tangents, g.weight(wt))
    if len(layers) == 1:  # a linear map: J^T is the constant weight, broadcast to the batch
        zeros = g.mul(g.unsqueeze(g.sum(x, 1, keepdims=True), 2), g.const(0.0, dtype))
        tangents = g.add(zeros, tangents)
    return h, tangents


def _mlp_curvature(
    g: Graph, cache: list[tuple[str, str, str]], weights_t: list[NDArray[np.floating]], w: str
) -> str:
    """app.nn.MLP.forward_with_curvature's contraction: the Hessian of w . MLP(x) (B, in, in) as
    sum_l T_l diag(a''(h_l) adj_l) T_l^T, adjoints by one backward pass. weights_t: each layer
    after the first as W (out, in), the transpose of what _layers holds."""
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


def _normalize(g: Graph, v: str) -> tuple[str, str]:
    """(v / |v|, |v| (B, 1))."""
    norm = g.norm(v, keepdims=True)
    return g.div(v, norm), norm


def _tangent_basis(g: Graph, z: str, k: int, dtype: type) -> str:
    """B(z) (B, k, k - 1): the Householder construction of app.geometry.sphere_tangent_basis."""
    first = g.op(
        "Slice",
        z,
        g.const(np.array([0]), np.int64),
        g.const(np.array([1]), np.int64),
        g.const(np.array([1]), np.int64),
    )
    sign = g.where(
        g.op("GreaterOrEqual", first, g.const(0.0, dtype)), g.const(1.0, dtype), g.const(-1.0, dtype)
    )
    e1 = np.zeros(k, dtype=dtype)
    e1[0] = 1.0
    u = g.add(z, g.mul(sign, g.const(e1, dtype)))
    scale = g.div(g.const(2.0, dtype), g.sum(g.mul(u, u), 1, keepdims=True))
    tail = g.op(
        "Slice",
        u,
        g.const(np.array([1]), np.int64),
        g.const(np.array([k]), np.int64),
        g.const(np.array([1]), np.int64),
    )
    outer = g.mul(g.unsqueeze(g.mul(scale, u), 2), g.unsqueeze(tail, 1))  # (B, k, k-1)
    return g.sub(g.const(np.eye(k, dtype=dtype)[:, 1:], dtype), outer)


def _split_rows(g: Graph, rows: str, m: int) -> list[str]:
    """(B, m, n) -> m tensors (B, n)."""
    parts = g.ops("Split", [rows], m, axis=1) if m > 1 else [rows]
    return [g.squeeze(p, 1) for p in parts]


def _orthonormal_rows(g: Graph, rows: str, m: int) -> str:
    """CGS2 on the m rows (B, m, n) in float64: orthonormal rows (B, m, n) spanning the same space.

    Each row is orthogonalised twice against the previous ones, which keeps the basis orthonormal
    to working precision where one pass would not.
    """
    basis: list[str] = []
    tiny = g.const(1e-300, np.float64)
    for row in _split_rows(g, g.cast(rows, F64), m):
        a = row
        for _ in range(2):
            for q in basis:
                a = g.sub(a, g.mul(g.sum(g.mul(q, a), 1, keepdims=True), q))
        basis.append(g.div(a, g.op("Max", g.norm(a, keepdims=True), tiny)))
    return g.op("Concat", *[g.unsqueeze(q, 1) for q in basis], axis=1) if m > 1 else g.unsqueeze(basis[0], 1)


def _sum_log_singular_values(g: Graph, rows: str, m: int) -> str:
    """sum_i log s_i of the m x n matrices whose rows are `rows` (B, m, n), computed in float64.

    Modified Gram-Schmidt, right-looking: each unit row is removed from all the rows after it in
    one step on a (B, rows left, n) block. MGS's R is backward stable (Bjorck), so one pass
    resolves the small singular values as well as CGS2's two, with half the arithmetic and a
    third of the nodes; only its Q loses orthogonality, and no Q is needed here.
    """
    block = g.cast(rows, F64)  # (B, r, n), r = rows not yet factored
    floor, tiny = g.const(SINGULAR_VALUE_FLOOR, np.float64), g.const(1e-300, np.float64)
    total = None
    for i in range(m):
        if i < m - 1:
            head, block = g.ops("Split", [block, g.const(np.array([1, m - i - 1]), np.int64)], 2, axis=1)
        else:
            head = block
        norm = g.op("Sqrt", g.sum(g.mul(head, head), 2, keepdims=True))  # (B, 1, 1)
        term = g.op("Log", g.op("Max", norm, floor))
        total = term if total is None else g.add(total, term)
        if i < m - 1:
            q = g.div(head, g.op("Max", norm, tiny))  # (B, 1, n)
            block = g.sub(block, g.mul(g.sum(g.mul(block, q), 2, keepdims=True), q))
    assert total is not None
    return g.op("Squeeze", total, g.const(np.array([1, 2]), np.int64))


def _floored_cholesky(g: Graph, a: str, m: int) -> tuple[list[list[str]], str]:
    """app.scores.floored_cholesky unrolled: entries L[i][j] (B, 1), j <= i, of A (B, m, m) float64,
    and whether any pivot was floored (B,)."""
    entries = [g.ops("Split", [row], m, axis=1) if m > 1 else [row] for row in _split_rows(g, a, m)]
    floor = g.mul(
        g.op("Max", _frobenius(g, a), g.const(1e-300, np.float64)), g.const(PIVOT_FLOOR, np.float64)
    )
    L: list[list[str]] = [[""] * m for _ in range(m)]
    floored: str | None = None
    for i in range(m):
        for j in range(i + 1):
            total = entries[i][j]
            for k in range(j):
                total = g.sub(total, g.mul(L[i][k], L[j][k]))
            if i == j:
                below = g.op("Less", total, floor)
                floored = below if floored is None else g.op("Or", floored, below)
                L[i][j] = g.op("Sqrt", g.op("Max", total, floor))
            else:
                L[i][j] = g.div(total, L[j][j])
    assert floored is not None
    return L, g.squeeze(floored, 1)


def _frobenius(g: Graph, a: str) -> str:
    """(B, m, m) -> (B, 1) Frobenius norms."""
    return g.op("Sqrt", g.sum(g.sum(g.mul(a, a), 2), 1, keepdims=True))


def _cholesky_solve(g: Graph, L: list[list[str]], b: str, m: int) -> str:
    """(L L^T)^-1 b for b (B, m), by forward and back substitution."""
    rhs = g.ops("Split", [b], m, axis=1) if m > 1 else [b]
    y: list[str] = []
    for i in range(m):
        total = rhs[i]
        for k in range(i):
            total = g.sub(total, g.mul(L[i][k], y[k]))
        y.append(g.div(total, L[i][i]))
    solution: list[str] = [""] * m
    for i in reversed(range(m)):
        total = y[i]
        for k in range(i + 1, m):
            total = g.sub(total, g.mul(L[k][i], solution[k]))
        solution[i] = g.div(total, L[i][i])
    return g.op("Concat", *solution, axis=1) if m > 1 else solution[0]


def _log_prior(
    g: Graph, z: str, arch: Architecture, weights: dict[str, NDArray[np.float32]], dtype: type = np.float32
) -> str:
    k = arch.latent_dim
    if arch.prior == "normal":
        return g.sub(g.mul(g.sum(g.mul(z, z), 1), g.const(-0.5, dtype)), g.const(0.5 * k * LOG_2PI, dtype))
    components = _prior_components(g, z, arch, weights, dtype)[0]
    log_mean = g.op("ReduceLogSumExp", components, axes=[1], keepdims=0)
    return g.sub(log_mean, g.const(math.log(arch.components), dtype))


def _prior_components(
    g: Graph, z: str, arch: Architecture, weights: dict[str, NDArray[np.float32]], dtype: type
) -> tuple[str, str | None]:
    """Mixture components' log-densities c_j (B, K) and, for vamp, the scaled offsets (z - mu_j) / s_j^2."""
    k = arch.latent_dim
    locations = weights["derived.prior.locations"].astype(dtype)
    if arch.prior == "vamp":
        scales = weights["derived.prior.scales"].astype(np.float64)
        offsets = g.sub(g.unsqueeze(z, 1), g.const(locations, dtype))  # (B, K, k)
        u = g.div(offsets, g.const(scales, dtype))
        constant = -np.log(scales).sum(-1) - 0.5 * k * LOG_2PI  # (K,)
        components = g.add(g.mul(g.sum(g.mul(u, u), 2), g.const(-0.5, dtype)), g.const(constant, dtype))
        return components, g.div(offsets, g.const(scales**2, dtype))
    from scipy.special import ive

    kappa = weights["derived.prior.kappa"].astype(np.float64)
    v = 0.5 * k - 1
    # kappa is fixed once trained, so the vMF normaliser is a constant of the graph.
    log_normalizer = v * np.log(kappa) - 0.5 * k * LOG_2PI - (np.log(ive(v, kappa)) + kappa)
    cosines = g.matmul(z, g.const(locations.T, dtype))
    return g.add(g.mul(cosines, g.const(kappa, dtype)), g.const(log_normalizer, dtype)), None


def _prior_derivatives(
    g: Graph, z: str, arch: Architecture, weights: dict[str, NDArray[np.float32]]
) -> tuple[str, str, str]:
    """log p(z) (B,), gradient (B, k) and Hessian (B, k, k) in float64, as
    app.model.distributions' log_prob_derivatives: for a mixture with weights w = softmax(c),
    grad = sum_j w_j a_j, Hessian = sum_j w_j (C_j + a_j a_j^T) - grad grad^T."""
    k = arch.latent_dim
    if arch.prior == "normal":
        batch_eye = g.mul(g.unsqueeze(g.unsqueeze(g.sum(z, 1), 1), 2), g.const(0.0, np.float64))
        hessian = g.add(batch_eye, g.const(-np.eye(k), np.float64))
        return _log_prior(g, z, arch, weights, np.float64), g.op("Neg", z), hessian
    components, scaled_offsets = _prior_components(g, z, arch, weights, np.float64)
    w = g.op("Softmax", components, axis=1)  # (B, K)
    log_p = g.sub(
        g.op("ReduceLogSumExp", components, axes=[1], keepdims=0),
        g.const(math.log(arch.components), np.float64),
    )
    if scaled_offsets is not None:  # vamp: a_j = -(z - mu_j) / s_j^2, C_j = -diag(1 / s_j^2)
        gradients = g.op("Neg", scaled_offsets)  # (B, K, k)
    else:  # vmf: a_j = kappa_j mu_j, C_j = 0
        directions = weights["derived.prior.locations"].astype(np.float64)
        kappa = weights["derived.prior.kappa"].astype(np.float64)
        gradients = g.add(
            g.mul(g.unsqueeze(components, 2), g.const(0.0, np.float64)),
            g.const(kappa[:, None] * directions, np.float64),
        )
    weighted = g.mul(g.unsqueeze(w, 2), gradients)  # (B, K, k)
    gradient = g.sum(weighted, 1)  # (B, k)
    hessian = g.sub(
        g.matmul(g.transpose(weighted), gradients), g.mul(g.unsqueeze(gradient, 2), g.unsqueeze(gradient, 1))
    )
    if scaled_offsets is not None:
        inverse_variance = weights["derived.prior.scales"].astype(np.float64) ** -2  # (K, k)
        curvature = g.matmul(w, g.const(-inverse_variance, np.float64))  # (B, k)
        hessian = g.add(hessian, g.mul(g.unsqueeze(curvature, 1), g.const(np.eye(k), np.float64)))
    return log_p, gradient, hessian


def _closed_form(
    g: Graph, x: str, arch: Architecture, weights: dict[str, NDArray[np.float32]], method: str
) -> tuple[str, str, str]:
    """log_prior, log_volume (float32) and x_hat of one closed-form method, for standardised x (float32)."""
    k, m, sphere = arch.latent_dim, arch.intrinsic_dim, arch.geometry == "sphere"
    enc = _layers(weights, "encoder", arch.depth, np.float32)
    dec = _layers(weights, "decoder", arch.depth, np.float32)

    def encode(inputs: str) -> str:
        v = _mlp(g, inputs, enc, arch.activation)
        return _normalize(g, v)[0] if sphere else v

    def decoder_rows(z: str) -> tuple[str, str]:
        """f(z) and the rows of (J_f B)^T (B, m, d)."""
        x_hat, jt = _mlp_with_tangents(g, z, dec, arch.activation)  # J_f^T (B, k, d)
        if sphere:  # (J B)^T = B^T J^T
            jt = g.matmul(g.transpose(_tangent_basis(g, z, k, np.float32)), jt)
        return x_hat, jt

    if method == "likelihood":
        z = encode(x)
        x_hat, rows = decoder_rows(z)
        log_volume = g.op("Neg", _sum_log_singular_values(g, rows, m))
        return _log_prior(g, z, arch, weights), g.cast(log_volume, F32), x_hat
    if method == "encoder":
        x_hat, rows = decoder_rows(encode(x))
        tangent = _orthonormal_rows(g, rows, m)  # Q^T (B, m, d) float64
        v, jt = _mlp_with_tangents(g, x_hat, enc, arch.activation)  # J_v^T (B, d, k)
        restricted = g.matmul(tangent, g.cast(jt, F64))  # (J_v Q)^T (B, m, k)
        z = v
        if sphere:
            z, norm = _normalize(g, v)
            # B^T (I - z z^T) J_v Q / |v| = B^T J_v Q / |v|, since B^T z = 0
            basis = _tangent_basis(g, g.cast(z, F64), k, np.float64)
            restricted = g.div(g.matmul(restricted, basis), g.cast(g.unsqueeze(norm, 2), F64))  # (B, m, m)
        log_volume = _sum_log_singular_values(g, restricted, m)
        return _log_prior(g, z, arch, weights), g.cast(log_volume, F32), x_hat
    z = encode(x)
    zero = g.mul(g.sum(x, 1), g.const(0.0))
    log_prior = _log_prior(g, z, arch, weights) if method == "latent" else zero
    return log_prior, zero, _mlp(g, z, dec, arch.activation)


# The projection's loop-carried state, in this order (see _projection_step).
STATE = (
    "z",
    "damping",
    "growth",
    "done",
    "objective",
    "gradient",
    "hessian",
    "newton_hessian",
    "x_hat",
    "log_prior",
)


class _Projection:
    """app.scores.map_point and projected as graph pieces, all float64."""

    def __init__(self, arch: Architecture, weights: dict[str, NDArray[np.float32]], sigma2: float) -> None:
        self.arch, self.weights, self.sigma2 = arch, weights, sigma2
        self.k, self.m, self.sphere = arch.latent_dim, arch.intrinsic_dim, arch.geometry == "sphere"
        self.enc = _layers(weights, "encoder", arch.depth, np.float64)
        self.dec = _layers(weights, "decoder", arch.depth, np.float64)
        self.dec_weights = [np.ascontiguousarray(wt.T) for wt, _ in self.dec[1:]]

    def basis(self, g: Graph, z: str) -> str | None:
        return _tangent_basis(g, z, self.k, np.float64) if self.sphere else None

    def retract(self, g: Graph, v: str) -> str:
        return _normalize(g, v)[0] if self.sphere else v

    def linearise(self, g: Graph, x: str, z: str) -> dict[str, str]:
        """app.scores.linearise: objective, gradient and Gauss-Newton Hessian at z (B, k)."""
        cache: list[tuple[str, str, str]] = []
        x_hat, jt = _mlp_with_tangents(g, z, self.dec, self.arch.activation, cache)  # J_f^T (B, k, d)
        basis = self.basis(g, z)
        rows = g.matmul(g.transpose(basis), jt) if basis is not None else jt  # (B, m, d)
        log_p, prior_gradient, prior_hessian = _prior_derivatives(g, z, self.arch, self.weights)
        if basis is not None:  # Riemannian: B^T grad, B^T H B - (z . grad) I
            bending = g.mul(
                g.unsqueeze(g.unsqueeze(g.sum(g.mul(z, prior_gradient), 1), 1), 2),
                g.const(np.eye(self.m), np.float64),
            )
            prior_hessian = g.sub(g.matmul(g.matmul(g.transpose(basis), prior_hessian), basis), bending)
            prior_gradient = g.squeeze(g.matmul(g.transpose(basis), g.unsqueeze(prior_gradient, 2)), 2)
        residual = g.sub(x, x_hat)
        inverse_sigma2 = g.const(1.0 / self.sigma2, np.float64)
        data_gradient = g.squeeze(g.matmul(rows, g.unsqueeze(residual, 2)), 2)  # J^T r (B, m)
        data_curvature = g.mul(g.matmul(rows, g.transpose(rows)), inverse_sigma2)
        hessian = g.sub(data_curvature, prior_hessian)
        newton = hessian
        if self.arch.activation not in ("relu", "linear") and self.arch.depth > 0:
            # - Hess(r . f) / sigma2, r held fixed: Riemannian on the sphere, as for the prior
            bending = _mlp_curvature(g, cache, self.dec_weights, residual)  # (B, k, k)
            if basis is not None:
                pull = g.squeeze(g.matmul(jt, g.unsqueeze(residual, 2)), 2)  # J_f^T r (B, k)
                normal = g.mul(
                    g.unsqueeze(g.unsqueeze(g.sum(g.mul(z, pull), 1), 1), 2),
                    g.const(np.eye(self.m), np.float64),
                )
                bending = g.sub(g.matmul(g.matmul(g.transpose(basis), bending), basis), normal)
            newton = g.sub(hessian, g.mul(bending, inverse_sigma2))
        return {
            "objective": g.sub(
                g.mul(g.sum(g.mul(residual, residual), 1), g.const(0.5 / self.sigma2, np.float64)), log_p
            ),
            "gradient": g.sub(g.op("Neg", g.mul(data_gradient, inverse_sigma2)), prior_gradient),
            "hessian": hessian,
            "newton_hessian": newton,
            "x_hat": x_hat,
            "log_prior": log_p,
        }

    def step(self, g: Graph, state: dict[str, str]) -> tuple[str, str, str]:
        """The damped step in ambient latent coordinates (B, k), in tangent coordinates (B, m), and
        whether the damped Hessian was not positive definite (B,)."""
        eye = g.const(np.eye(self.m), np.float64)
        damped = g.add(state["newton_hessian"], g.mul(g.unsqueeze(g.unsqueeze(state["damping"], 1), 2), eye))
        L, indefinite = _floored_cholesky(g, damped, self.m)
        delta = g.op("Neg", _cholesky_solve(g, L, state["gradient"], self.m))
        basis = self.basis(g, state["z"])
        ambient = g.squeeze(g.matmul(basis, g.unsqueeze(delta, 2)), 2) if basis is not None else delta
        return ambient, delta, indefinite

    def converged(self, g: Graph, state: dict[str, str], ambient: str) -> str:
        bound = g.mul(
            g.add(g.const(1.0, np.float64), g.norm(state["z"])), g.const(PROJECTION_TOLERANCE, np.float64)
        )
        return g.op("Or", state["done"], g.op("LessOrEqual", g.norm(ambient), bound))

    def body(self, parent: Graph, x: str) -> Any:
        """The Loop body: one Levenberg-Marquardt step for every row not yet converged."""
        import onnx.helper as h

        g = Graph(parent)
        inputs = {name: g.name(f"in_{name}") for name in STATE}
        state = dict(inputs)
        ambient, delta, indefinite = self.step(g, state)
        done = self.converged(g, state, ambient)
        moved_to = self.retract(g, g.add(state["z"], ambient))
        trial = self.linearise(g, x, moved_to)
        trial["z"] = moved_to
        zero = g.const(0.0, np.float64)
        lam = state["damping"]
        predicted = g.mul(
            g.sum(g.mul(delta, g.sub(g.mul(g.unsqueeze(lam, 1), delta), state["gradient"])), 1),
            g.const(0.5, np.float64),
        )
        positive = g.op("Greater", predicted, zero)
        gain = g.div(
            g.sub(state["objective"], trial["objective"]),
            g.where(positive, predicted, g.const(1.0, np.float64)),
        )
        taken = g.op("And", g.op("And", positive, g.op("Greater", gain, zero)), g.op("Not", done))
        taken = g.op("And", taken, g.op("Not", indefinite))
        out = dict(state)
        for name in ("z", "objective", "gradient", "hessian", "newton_hessian", "x_hat", "log_prior"):
            rank = {"z": 2, "gradient": 2, "x_hat": 2, "hessian": 3, "newton_hessian": 3}.get(name, 1)
            mask = taken
            for axis in range(1, rank):
                mask = g.unsqueeze(mask, axis)
            out[name] = g.where(mask, trial[name], state[name])
        cube = g.op(
            "Pow",
            g.sub(g.mul(gain, g.const(2.0, np.float64)), g.const(1.0, np.float64)),
            g.const(3.0, np.float64),
        )
        shrink = g.op("Max", g.sub(g.const(1.0, np.float64), cube), g.const(1 / 3, np.float64))
        moved = g.where(taken, g.mul(lam, shrink), g.mul(lam, state["growth"]))
        out["damping"] = g.where(done, lam, moved)
        doubled = g.where(taken, g.const(2.0, np.float64), g.mul(state["growth"], g.const(2.0, np.float64)))
        out["growth"] = g.where(done, state["growth"], doubled)
        out["done"] = done
        remaining = g.op("ReduceMax", g.cast(g.op("Not", done), INT64), keepdims=0)
        outputs = [g.op("Identity", g.cast(remaining, BOOL))] + [
            g.op("Identity", out[name]) for name in STATE
        ]
        values = [
            h.make_tensor_value_info(g.name("iteration"), INT64, []),
            h.make_tensor_value_info(g.name("cond"), BOOL, []),
        ]
        types = {"done": BOOL}
        values += [h.make_tensor_value_info(inputs[name], types.get(name, F64), None) for name in STATE]
        returned = [h.make_tensor_value_info(outputs[0], BOOL, [])]
        returned += [
            h.make_tensor_value_info(o, types.get(name, F64), None)
            for o, name in zip(outputs[1:], STATE, strict=True)
        ]
        return h.make_graph(g.nodes, "levenberg_marquardt_step", values, returned, g.initializers)

    def emit(self, g: Graph, x: str, d: int) -> dict[str, str]:
        """The parts of app.scores.projected for standardised rows x (B, d) float64."""
        z = self.retract(g, _mlp(g, x, self.enc, self.arch.activation))
        state = self.linearise(g, x, z)
        state["z"] = z
        norm = g.squeeze(_frobenius(g, state["newton_hessian"]), 1)
        state["damping"] = g.mul(g.op("Max", norm, g.const(1e-300, np.float64)), g.const(1e-3, np.float64))
        state["growth"] = g.add(g.mul(state["damping"], g.const(0.0, np.float64)), g.const(2.0, np.float64))
        state["done"] = g.op("Less", state["damping"], g.const(0.0, np.float64))  # all false
        looped = g.ops(
            "Loop",
            [g.const(np.array(PROJECTION_STEPS), np.int64), g.const(np.array(True), np.bool_)]
            + [state[n] for n in STATE],
            len(STATE),
            body=self.body(g, x),
        )
        final = dict(zip(STATE, looped, strict=True))
        L, _ = _floored_cholesky(g, final["hessian"], self.m)
        log_det = g.mul(
            g.op("Concat", *[g.op("Log", L[i][i]) for i in range(self.m)], axis=1), g.const(2.0, np.float64)
        )
        log_volume = g.sub(
            g.const(0.5 * self.m * LOG_2PI, np.float64), g.mul(g.sum(log_det, 1), g.const(0.5, np.float64))
        )
        residual = g.sub(x, final["x_hat"])
        squared = g.sum(g.mul(residual, residual), 1)
        constant = 0.5 * d * (LOG_2PI + math.log(self.sigma2))
        log_residual = g.sub(
            g.mul(squared, g.const(-0.5 / self.sigma2, np.float64)), g.const(constant, np.float64)
        )
        return {
            "log_prior": final["log_prior"],
            "log_volume": log_volume,
            "log_residual": log_residual,
            "reconstruction_error": squared,
            "residual": residual,
        }


def build_graph(manifest: dict[str, Any], weights: dict[str, NDArray[np.float32]], method: str) -> bytes:
    """Serialized ONNX model: input raw rows x (B, d) float64, outputs OUTPUTS."""
    import onnx
    import onnx.helper as h

    check_method(method)
    arch = Architecture.from_dict(manifest["architecture"])
    d, sigma2 = arch.input_dim, float(manifest["noise"]["sigma2"])
    g = Graph()
    scaler = manifest["scaler"]
    standardised = g.div(
        g.sub("x", g.const(np.asarray(scaler["mean"]), np.float64)),
        g.const(np.asarray(scaler["scale"]), np.float64),
    )
    if method == "projected":
        values = _Projection(arch, weights, float(manifest["noise"]["sigma2_projected"])).emit(
            g, standardised, d
        )
        out_type = F64
    else:
        x = g.cast(standardised, F32)
        log_prior, log_volume, x_hat = _closed_form(g, x, arch, weights, method)
        residual = g.sub(x, x_hat)
        squared = g.sum(g.mul(residual, residual), 1)
        if method == "latent":
            log_residual = g.mul(squared, g.const(0.0))
        else:
            constant = 0.5 * d * (LOG_2PI + math.log(sigma2))
            log_residual = g.sub(g.mul(squared, g.const(-0.5 / sigma2)), g.const(constant))
        values = {
            "log_prior": log_prior,
            "log_volume": log_volume,
            "log_residual": log_residual,
            "reconstruction_error": squared,
            "residual": residual,
        }
        out_type = F32
    values["log_prob"] = g.add(g.add(values["log_prior"], values["log_volume"]), values["log_residual"])
    for name in OUTPUTS:
        g.nodes.append(h.make_node("Identity", [values[name]], [name]))
    outputs = [
        h.make_tensor_value_info(n, out_type, ["batch", d] if n == "residual" else ["batch"]) for n in OUTPUTS
    ]
    inputs = [h.make_tensor_value_info("x", F64, ["batch", d])]
    graph = h.make_graph(g.nodes, f"anomaly-scores-{method}", inputs, outputs, g.initializers)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="anomaly-scores")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
