"""The whole scoring computation of a bundle as one ONNX graph per score method.

Built directly from the bundle's numpy weights with onnx.helper, so export needs neither PyTorch
nor tracing, takes milliseconds, and the graph is exactly the mathematics of app/scores.py:

  raw rows -> scaler -> encoder -> decoder with its Jacobian by forward-mode tangents
  -> (sphere) tangent-space restriction -> log volume -> residual -> prior log-density -> parts

The networks run in float32. The log volume is computed in float64 by modified Gram-Schmidt on
the Jacobian's m rows: log|det R| = sum log s_i, with no Gram matrix J^T J whose determinant
would underflow or lose the small singular values. m is known at export time, so the
factorisation is unrolled. `projected` also needs an orthonormal basis of the tangent space, for
which it re-orthogonalises (CGS2).

Outputs of every graph: log_prob, log_prior, log_volume, log_residual, reconstruction_error (B,)
and residual (B, d), all float32. `projected` unrolls its Levenberg-Marquardt iterations (a fixed
PROJECTION_STEPS of them, damped normal equations solved by an unrolled float64 Cholesky).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.spec import Architecture

OPSET = 17
EXPORTED_METHODS = ("likelihood", "encoder", "reconstruction", "latent", "projected")
PROJECTION_STEPS = 30  # app.scores.projected's limit, run in full: a graph has no early exit
OUTPUTS = ("log_prob", "log_prior", "log_volume", "log_residual", "reconstruction_error", "residual")
SINGULAR_VALUE_FLOOR = 1e-12  # as app.scores
LOG_2PI = math.log(2 * math.pi)


class Graph:
    """A minimal builder: each method adds one node and returns its output's name."""

    def __init__(self) -> None:
        import onnx.helper as h

        self.h = h
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0
        # id of a weight array -> (the array, its initializer); holding the array keeps its id unique
        self.weights: dict[int, tuple[NDArray[Any], str]] = {}

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: NDArray[Any] | float, dtype: type = np.float32) -> str:
        from onnx import numpy_helper

        name = self.name("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, value: NDArray[Any]) -> str:
        """A constant used many times (unrolled iterations): one initializer per array object."""
        if id(value) not in self.weights:
            self.weights[id(value)] = (value, self.const(value))
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

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)


def _layers(weights: dict[str, NDArray[np.float32]], net: str, depth: int) -> list[tuple[NDArray, NDArray]]:
    """(W^T, b) per layer, transposed once so that every use shares one initializer."""
    return [
        (
            np.ascontiguousarray(weights[f"{net}.net.layers.{i}.weight"].T),
            weights[f"{net}.net.layers.{i}.bias"],
        )
        for i in range(depth + 1)
    ]


def _activation(g: Graph, h: str, name: str, with_slope: bool) -> tuple[str, str | None]:
    """a(h) and, when asked, a'(h), as app.nn's activations."""
    if name == "swish":
        s = g.op("Sigmoid", h)
        value = g.mul(h, s)
        if not with_slope:
            return value, None
        one = g.const(1.0)
        return value, g.mul(s, g.add(one, g.mul(h, g.sub(one, s))))
    if name == "tanh":
        t = g.op("Tanh", h)
        return t, (g.sub(g.const(1.0), g.mul(t, t)) if with_slope else None)
    if name == "relu":
        value = g.op("Relu", h)
        return value, (g.cast(g.op("Greater", h, g.const(0.0)), 1) if with_slope else None)
    if name == "softplus":
        return g.op("Softplus", h), (g.op("Sigmoid", h) if with_slope else None)
    return h, (g.op("Add", g.mul(h, g.const(0.0)), g.const(1.0)) if with_slope else None)


def _mlp(g: Graph, x: str, layers: list[tuple[NDArray, NDArray]], activation: str) -> str:
    for i, (wt, b) in enumerate(layers):
        x = g.add(g.matmul(x, g.weight(wt)), g.weight(b))
        if i < len(layers) - 1:
            x = _activation(g, x, activation, with_slope=False)[0]
    return x


def _mlp_with_tangents(
    g: Graph, x: str, layers: list[tuple[NDArray, NDArray]], activation: str
) -> tuple[str, str]:
    """Value (B, out) and transposed Jacobian T = J^T (B, in, out), carried forward layer by layer."""
    w0t, b0 = layers[0]
    h = g.add(g.matmul(x, g.weight(w0t)), g.weight(b0))
    tangents = g.weight(w0t)  # (in, width): broadcast over the batch by the first Mul
    for wt, b in layers[1:]:
        value, slope = _activation(g, h, activation, with_slope=True)
        tangents = g.mul(tangents, g.unsqueeze(slope, 1))  # (B, in, width)
        h = g.add(g.matmul(value, g.weight(wt)), g.weight(b))
        tangents = g.matmul(tangents, g.weight(wt))
    if len(layers) == 1:  # a linear map: J^T is the constant weight, broadcast to the batch
        tangents = g.add(g.mul(g.unsqueeze(g.sum(x, 1, keepdims=True), 2), g.const(0.0)), tangents)
    return h, tangents


def _normalize(g: Graph, v: str) -> tuple[str, str]:
    """(v / |v|, |v| (B, 1))."""
    norm = g.op("Sqrt", g.sum(g.mul(v, v), 1, keepdims=True))
    return g.div(v, norm), norm


def _tangent_basis(g: Graph, z: str, k: int) -> str:
    """B(z) (B, k, k - 1): the Householder construction of app.geometry.sphere_tangent_basis."""
    first = g.op(
        "Slice",
        z,
        g.const(np.array([0]), np.int64),
        g.const(np.array([1]), np.int64),
        g.const(np.array([1]), np.int64),
    )
    sign = g.op("Where", g.op("GreaterOrEqual", first, g.const(0.0)), g.const(1.0), g.const(-1.0))
    e1 = np.zeros(k, dtype=np.float32)
    e1[0] = 1.0
    u = g.add(z, g.mul(sign, g.const(e1)))
    scale = g.div(g.const(2.0), g.sum(g.mul(u, u), 1, keepdims=True))
    tail = g.op(
        "Slice",
        u,
        g.const(np.array([1]), np.int64),
        g.const(np.array([k]), np.int64),
        g.const(np.array([1]), np.int64),
    )
    outer = g.mul(g.unsqueeze(g.mul(scale, u), 2), g.unsqueeze(tail, 1))  # (B, k, k-1)
    return g.sub(g.const(np.eye(k, dtype=np.float32)[:, 1:]), outer)


def _orthogonalise(g: Graph, rows: str, m: int) -> tuple[str, list[str]]:
    """CGS2 on the m rows (B, m, n) in float64: (sum_i log r_ii (B,) float32, orthonormal rows).

    Each row is orthogonalised twice against the previous ones; the norms left are the diagonal
    of R in A^T = Q R, and |det R| is the product of the singular values.
    """
    rows64 = g.cast(rows, 11)  # float64
    parts = g.ops("Split", [rows64], m, axis=1) if m > 1 else [rows64]
    parts = [g.op("Squeeze", p, g.const(np.array([1]), np.int64)) for p in parts]  # (B, n) each
    basis: list[str] = []
    total = None
    floor = g.const(SINGULAR_VALUE_FLOOR, np.float64)
    for row in parts:
        a = row
        for _ in range(2):
            for q in basis:
                a = g.sub(a, g.mul(g.sum(g.mul(q, a), 1, keepdims=True), q))
        norm = g.op("Sqrt", g.sum(g.mul(a, a), 1, keepdims=True))  # (B, 1)
        basis.append(g.div(a, g.op("Max", norm, g.const(1e-300, np.float64))))
        term = g.op("Log", g.op("Max", norm, floor))
        total = term if total is None else g.add(total, term)
    assert total is not None
    return g.cast(g.op("Squeeze", total, g.const(np.array([1]), np.int64)), 1), basis


def _sum_log_singular_values(g: Graph, rows: str, m: int) -> str:
    """sum_i log s_i of the m x n matrices whose rows are `rows` (B, m, n), computed in float64.

    Modified Gram-Schmidt, right-looking: each unit row is removed from all the rows after it in
    one step on a (B, rows left, n) block. MGS's R is backward stable (Bjorck), so one pass
    resolves the small singular values as well as CGS2's two, with half the arithmetic and a
    third of the nodes; only its Q loses orthogonality, and no Q is needed here.
    """
    block = g.cast(rows, 11)  # (B, r, n) float64, r = rows not yet factored
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
    return g.cast(g.op("Squeeze", total, g.const(np.array([1, 2]), np.int64)), 1)


def _solve_spd(g: Graph, a: str, b: str, m: int) -> str:
    """Solve A x = b for symmetric positive definite A (B, m, m), b (B, m), float64, by an
    unrolled Cholesky factorisation: m is known at export time."""
    rows = g.ops("Split", [a], m, axis=1) if m > 1 else [a]
    entries = []
    for stacked in rows:
        row = g.op("Squeeze", stacked, g.const(np.array([1]), np.int64))  # (B, m)
        entries.append(g.ops("Split", [row], m, axis=1) if m > 1 else [row])  # (B, 1) each
    rhs = g.ops("Split", [b], m, axis=1) if m > 1 else [b]
    tiny = g.const(1e-300, np.float64)
    L: list[list[str]] = [[""] * m for _ in range(m)]
    for i in range(m):
        for j in range(i + 1):
            total = entries[i][j]
            for k in range(j):
                total = g.sub(total, g.mul(L[i][k], L[j][k]))
            L[i][j] = g.op("Sqrt", g.op("Max", total, tiny)) if i == j else g.div(total, L[j][j])
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


def _log_prior(g: Graph, z: str, arch: Architecture, weights: dict[str, NDArray[np.float32]]) -> str:
    k = arch.latent_dim
    if arch.prior == "normal":
        return g.sub(g.mul(g.sum(g.mul(z, z), 1), g.const(-0.5)), g.const(0.5 * k * LOG_2PI))
    K = arch.components
    locations = weights["derived.prior.locations"].astype(np.float32)
    if arch.prior == "vamp":
        scales = weights["derived.prior.scales"].astype(np.float64)
        u = g.div(g.sub(g.unsqueeze(z, 1), g.const(locations)), g.const(scales))  # (B, K, k)
        constant = -np.log(scales).sum(-1) - 0.5 * k * LOG_2PI  # (K,)
        components = g.add(g.mul(g.sum(g.mul(u, u), 2), g.const(-0.5)), g.const(constant))
    else:
        from scipy.special import ive

        kappa = weights["derived.prior.kappa"].astype(np.float64)
        v = 0.5 * k - 1
        # kappa is fixed once trained, so the vMF normaliser is a constant of the graph.
        log_normalizer = v * np.log(kappa) - 0.5 * k * LOG_2PI - (np.log(ive(v, kappa)) + kappa)
        components = g.add(g.mul(g.matmul(z, g.const(locations.T)), g.const(kappa)), g.const(log_normalizer))
    log_mean = g.op("ReduceLogSumExp", components, axes=[1], keepdims=0)
    return g.sub(log_mean, g.const(math.log(K)))


def _parts(
    g: Graph, x: str, arch: Architecture, weights: dict[str, NDArray[np.float32]], method: str
) -> tuple[str, str, str]:
    """log_prior, log_volume and x_hat of one method, for standardised rows x."""
    k, m, sphere = arch.latent_dim, arch.intrinsic_dim, arch.geometry == "sphere"
    enc, dec = _layers(weights, "encoder", arch.depth), _layers(weights, "decoder", arch.depth)

    def encode(inputs: str) -> str:
        v = _mlp(g, inputs, enc, arch.activation)
        return _normalize(g, v)[0] if sphere else v

    if method == "likelihood":
        z = encode(x)
        x_hat, jt = _mlp_with_tangents(g, z, dec, arch.activation)  # J_f^T (B, k, d)
        if sphere:  # (J B)^T = B^T J^T
            jt = g.matmul(g.op("Transpose", _tangent_basis(g, z, k), perm=[0, 2, 1]), jt)
        return (
            _log_prior(g, z, arch, weights),
            g.mul(_sum_log_singular_values(g, jt, m), g.const(-1.0)),
            x_hat,
        )
    if method == "encoder":
        x_hat = _mlp(g, encode(x), dec, arch.activation)
        v, jt = _mlp_with_tangents(g, x_hat, enc, arch.activation)  # J_v^T (B, d, k)
        z = v
        if sphere:
            z, norm = _normalize(g, v)
            # B^T (I - z z^T) J_v / |v| = B^T J_v / |v|, since B^T z = 0
            jt = g.div(g.matmul(jt, _tangent_basis(g, z, k)), g.unsqueeze(norm, 2))  # (B, d, k-1)
        rows = g.op("Transpose", jt, perm=[0, 2, 1])  # (B, m, d)
        return _log_prior(g, z, arch, weights), _sum_log_singular_values(g, rows, m), x_hat
    z = encode(x)
    zero = g.mul(g.sum(x, 1), g.const(0.0))
    log_prior = _log_prior(g, z, arch, weights) if method == "latent" else zero
    return log_prior, zero, _mlp(g, z, dec, arch.activation)


def _projected(
    g: Graph, x: str, arch: Architecture, weights: dict[str, NDArray[np.float32]], sigma2_normal: float
) -> dict[str, str]:
    """app.scores.projected as a graph: the same iteration, every step run."""
    d, k, m, sphere = arch.input_dim, arch.latent_dim, arch.intrinsic_dim, arch.geometry == "sphere"
    enc, dec = _layers(weights, "encoder", arch.depth), _layers(weights, "decoder", arch.depth)

    def retract(v: str) -> str:
        return _normalize(g, v)[0] if sphere else v

    def linearise(z: str) -> tuple[str, str, str, str | None]:
        """x_hat, Jacobian rows in tangent coordinates (B, m, d) float64, J^T J, tangent basis."""
        x_hat, jt = _mlp_with_tangents(g, z, dec, arch.activation)
        basis = _tangent_basis(g, z, k) if sphere else None
        rows = g.matmul(g.op("Transpose", basis, perm=[0, 2, 1]), jt) if basis is not None else jt
        rows64 = g.cast(rows, 11)
        return x_hat, rows64, g.matmul(rows64, g.op("Transpose", rows64, perm=[0, 2, 1])), basis

    def squared_error(x_hat: str) -> str:
        e = g.sub(x, x_hat)
        return g.sum(g.mul(e, e), 1)

    z = retract(_mlp(g, x, enc, arch.activation))
    x_hat, rows64, gram, basis = linearise(z)
    err = squared_error(x_hat)
    eye = g.const(np.eye(m), np.float64)
    diagonal = g.sum(g.mul(gram, eye), 2)  # (B, m)
    damping = g.mul(g.op("ReduceMax", diagonal, axes=[1], keepdims=1), g.const(1e-3, np.float64))  # (B, 1)
    for _ in range(PROJECTION_STEPS):
        r64 = g.cast(g.sub(x, x_hat), 11)
        gradient = g.op("Squeeze", g.matmul(rows64, g.unsqueeze(r64, 2)), g.const(np.array([2]), np.int64))
        delta = _solve_spd(g, g.add(gram, g.mul(g.unsqueeze(damping, 2), eye)), gradient, m)  # (B, m)
        step = g.cast(delta, 1)
        if basis is not None:
            step = g.op("Squeeze", g.matmul(basis, g.unsqueeze(step, 2)), g.const(np.array([2]), np.int64))
        z_new = retract(g.add(z, step))
        err_new = squared_error(_mlp(g, z_new, dec, arch.activation))
        better = g.op("Less", err_new, err)  # (B,)
        better_rows = g.unsqueeze(better, 1)
        z = g.op("Where", better_rows, z_new, z)
        err = g.op("Where", better, err_new, err)
        damping = g.op(
            "Where",
            better_rows,
            g.mul(damping, g.const(0.1, np.float64)),
            g.mul(damping, g.const(10.0, np.float64)),
        )
        x_hat, rows64, gram, basis = linearise(z)
    log_det, orthonormal = _orthogonalise(g, g.cast(rows64, 1), m)
    residual = g.sub(x, x_hat)
    normal = g.cast(residual, 11)
    for q in orthonormal:
        normal = g.sub(normal, g.mul(g.sum(g.mul(q, normal), 1, keepdims=True), q))
    squared_normal = g.cast(g.sum(g.mul(normal, normal), 1), 1)
    if d > m:
        constant = 0.5 * (d - m) * (LOG_2PI + math.log(sigma2_normal))
        log_residual = g.sub(g.mul(squared_normal, g.const(-0.5 / sigma2_normal)), g.const(constant))
    else:  # the normalising-flow case: no normal directions
        log_residual = g.mul(squared_normal, g.const(0.0))
    return {
        "log_prior": _log_prior(g, z, arch, weights),
        "log_volume": g.mul(log_det, g.const(-1.0)),
        "log_residual": log_residual,
        "reconstruction_error": g.sum(g.mul(residual, residual), 1),
        "residual": residual,
    }


def build_graph(manifest: dict[str, Any], weights: dict[str, NDArray[np.float32]], method: str) -> bytes:
    """Serialized ONNX model: input raw rows x (B, d) float32, outputs OUTPUTS."""
    import onnx
    import onnx.helper as h

    if method not in EXPORTED_METHODS:
        raise ValueError(f"method {method!r} has no ONNX graph; exported: {EXPORTED_METHODS}")
    arch = Architecture.from_dict(manifest["architecture"])
    d, sigma2 = arch.input_dim, float(manifest["noise"]["sigma2"])
    g = Graph()
    scaler = manifest["scaler"]
    x = g.div(g.sub("x", g.const(np.asarray(scaler["mean"]))), g.const(np.asarray(scaler["scale"])))
    if method == "projected":
        values = _projected(g, x, arch, weights, float(manifest["noise"]["sigma2_normal"]))
    else:
        log_prior, log_volume, x_hat = _parts(g, x, arch, weights, method)
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
    values["log_prob"] = g.add(g.add(values["log_prior"], values["log_volume"]), values["log_residual"])
    for name in OUTPUTS:
        g.nodes.append(h.make_node("Identity", [values[name]], [name]))
    outputs = [
        h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", d] if n == "residual" else ["batch"])
        for n in OUTPUTS
    ]
    inputs = [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", d])]
    graph = h.make_graph(g.nodes, f"anomaly-scores-{method}", inputs, outputs, g.initializers)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="anomaly-scores")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
