"""The factorisations the scores rest on, in torch and as ONNX nodes side by side.

A volume term is a sum of log singular values; the projection solves damped Newton systems and
takes a log-determinant; the encoder's volume needs an orthonormal basis of a tangent space. Torch
and the graphs run the same algorithms in float64: modified Gram-Schmidt for the volume, Gram-Schmidt
twice (CGS2) for the basis, an explicit floored Cholesky; the graphs unroll them (the matrix sizes
are known at export time), torch loops over the m vectors with batched tensor operations. No
LAPACK or cuSOLVER call: on a GPU a batched SVD or QR of many tiny matrices costs far more than
these few elementwise kernels, and the two paths agree to rounding, not to two algorithms' errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from app.model.graph import F64, Graph
from app.model.spec import PIVOT_FLOOR, SINGULAR_VALUE_FLOOR

# torch is imported only inside the functions that compute with it, so that the serving install,
# which has no torch, can build and verify graphs with the emitters (app.bundle.graphs).
if TYPE_CHECKING:
    from torch import Tensor


def sum_log_singular_values(J: Tensor) -> Tensor:
    """(B, p, q) -> (B,) sum of log singular values: sum_i log |R_ii| of the QR factorisation of the
    shorter side's vectors (J's columns when p >= q), each |R_ii| floored at SINGULAR_VALUE_FLOOR.

    For a d x m Jacobian of rank m this is log sqrt(det(J^T J)), the log of the m-volume
    stretching factor. Modified Gram-Schmidt, as emit_sum_log_singular_values: its R is backward
    stable (Bjorck), so singular values from 1e-6 to 1e3 keep their relative accuracy in float64.
    """
    import torch

    # In float64 even for float32 networks: small singular values of a graded Jacobian keep their
    # relative accuracy, and the result matches the exported graph's float64 factorisation.
    block = (J.transpose(-1, -2) if J.shape[-2] >= J.shape[-1] else J).double()  # (B, m, n), m <= n
    total = torch.zeros(block.shape[0], dtype=block.dtype, device=block.device)
    while block.shape[1]:
        head, block = block[:, :1], block[:, 1:]
        norm = torch.linalg.vector_norm(head, dim=2, keepdim=True)  # (B, 1, 1)
        total = total + torch.log(torch.clamp(norm[:, 0, 0], min=SINGULAR_VALUE_FLOOR))
        if block.shape[1]:
            q = head / torch.clamp(norm, min=1e-300)
            block = block - (block * q).sum(2, keepdim=True) * q
    return total.to(J.dtype)


def emit_sum_log_singular_values(g: Graph, rows: str, m: int) -> str:
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


def orthonormal_columns(A: Tensor) -> Tensor:
    """(B, d, m) of rank m -> (B, d, m) orthonormal columns spanning the same space: CGS2 on the
    columns, as emit_orthonormal_rows does on the rows of A^T."""
    import torch

    basis: list[Tensor] = []
    for column in A.unbind(2):  # (B, d) each
        a = column
        for _ in range(2):
            for q in basis:
                a = a - (q * a).sum(1, keepdim=True) * q
        basis.append(a / torch.clamp(torch.linalg.vector_norm(a, dim=1, keepdim=True), min=1e-300))
    return torch.stack(basis, dim=2)


def emit_split_rows(g: Graph, rows: str, m: int) -> list[str]:
    """(B, m, n) -> m tensors (B, n)."""
    parts = g.ops("Split", [rows], m, axis=1) if m > 1 else [rows]
    return [g.squeeze(p, 1) for p in parts]


def emit_orthonormal_rows(g: Graph, rows: str, m: int) -> str:
    """CGS2 on the m rows (B, m, n) in float64: orthonormal rows (B, m, n) spanning the same space.

    Each row is orthogonalised twice against the previous ones, which keeps the basis orthonormal
    to working precision where one pass would not.
    """
    basis: list[str] = []
    tiny = g.const(1e-300, np.float64)
    for row in emit_split_rows(g, g.cast(rows, F64), m):
        a = row
        for _ in range(2):
            for q in basis:
                a = g.sub(a, g.mul(g.sum(g.mul(q, a), 1, keepdims=True), q))
        basis.append(g.div(a, g.op("Max", g.norm(a, keepdims=True), tiny)))
    return g.op("Concat", *[g.unsqueeze(q, 1) for q in basis], axis=1) if m > 1 else g.unsqueeze(basis[0], 1)


def floored_cholesky(A: Tensor) -> tuple[Tensor, Tensor]:
    """(B, m, m) symmetric -> lower-triangular L (B, m, m) with L L^T = A where A is positive
    definite, and whether any pivot was floored (B,). Each pivot is at least PIVOT_FLOOR times the
    Frobenius norm of A (which no change of orthonormal basis alters), so an indefinite or singular
    A still gives a finite factor: the Gauss-Newton Hessian of a mixture prior can be indefinite
    between its components."""
    import torch

    m = A.shape[-1]
    floor = PIVOT_FLOOR * torch.linalg.matrix_norm(A).clamp(min=1e-300)  # (B,)
    L = torch.zeros_like(A)
    floored = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    for j in range(m):
        row = L[:, j, :j]
        pivot = A[:, j, j] - (row * row).sum(-1)
        floored |= pivot < floor
        L[:, j, j] = torch.sqrt(torch.maximum(pivot, floor))
        if j + 1 < m:
            below = A[:, j + 1 :, j] - (L[:, j + 1 :, :j] @ row.unsqueeze(-1)).squeeze(-1)
            L[:, j + 1 :, j] = below / L[:, j, j : j + 1]
    return L, floored


def emit_frobenius(g: Graph, a: str) -> str:
    """(B, m, m) -> (B, 1) Frobenius norms."""
    return g.op("Sqrt", g.sum(g.sum(g.mul(a, a), 2), 1, keepdims=True))


def emit_floored_cholesky(g: Graph, a: str, m: int) -> tuple[list[list[str]], str]:
    """floored_cholesky above, unrolled: entries L[i][j] (B, 1), j <= i, of A (B, m, m) float64,
    and whether any pivot was floored (B,)."""
    entries = [g.ops("Split", [row], m, axis=1) if m > 1 else [row] for row in emit_split_rows(g, a, m)]
    floor = g.mul(
        g.op("Max", emit_frobenius(g, a), g.const(1e-300, np.float64)), g.const(PIVOT_FLOOR, np.float64)
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


def cholesky_solve(L: Tensor, b: Tensor) -> Tensor:
    """L (B, m, m) lower-triangular, b (B, m, n) -> (L L^T)^-1 b."""
    import torch

    y = torch.linalg.solve_triangular(L, b, upper=False)
    return torch.linalg.solve_triangular(L.transpose(1, 2), y, upper=True)


def emit_cholesky_solve(g: Graph, L: list[list[str]], b: str, m: int) -> str:
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
