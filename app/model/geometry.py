"""Latent geometry: the tangent space of the latent manifold at a point, in torch and as ONNX nodes.

For the Euclidean latent space the tangent space is R^k itself. On the unit sphere S^(k-1) it is
{v : v . z = 0}, of dimension k - 1; the change of variables onto the data manifold must use that
space (method notes, departure 2), so every Jacobian of the decoder is restricted to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from app.model.graph import Graph
from app.model.spec import Geometry

# torch is imported only inside the functions that compute with it, so that the serving install,
# which has no torch, can build and verify graphs with the emitters (app.bundle.graphs).
if TYPE_CHECKING:
    from torch import Tensor


def sphere_tangent_basis(z: Tensor) -> Tensor:
    """Orthonormal basis of the tangent space of S^(k-1) at unit vectors z.

    z: (B, k) -> (B, k, k - 1), columns orthonormal and orthogonal to z.

    The Householder reflection H = I - 2 u u^T / |u|^2 with u = z + s e_1, s = sign(z_1), maps e_1
    to -s z; H is orthogonal, so its other columns span z's orthogonal complement. Choosing the
    sign of z_1 keeps |u| >= 1, so there is no cancellation anywhere on the sphere.
    """
    import torch

    k = z.shape[-1]
    sign = torch.where(z[..., :1] >= 0, 1.0, -1.0).to(z.dtype)
    u = z.clone()
    u[..., :1] = u[..., :1] + sign
    # Columns 2..k of H: e_j - 2 u u_j / |u|^2 for j >= 2.
    scale = 2.0 / (u * u).sum(-1, keepdim=True)  # (B, 1)
    eye = torch.eye(k, dtype=z.dtype, device=z.device)[:, 1:]  # (k, k-1)
    return eye - (scale * u).unsqueeze(-1) * u[..., 1:].unsqueeze(1)


def tangent_basis(z: Tensor, geometry: Geometry) -> Tensor | None:
    """(B, k) -> (B, k, m) orthonormal tangent basis, or None for Euclidean (the identity)."""
    return sphere_tangent_basis(z) if geometry == "sphere" else None


def restrict_to_tangent(J: Tensor, z: Tensor, geometry: Geometry) -> Tensor:
    """Decoder Jacobian in intrinsic coordinates: J (B, d, k) -> J B(z) (B, d, m)."""
    basis = tangent_basis(z, geometry)
    return J if basis is None else J @ basis


def retract(z: Tensor, geometry: Geometry) -> Tensor:
    """Map a point moved along the tangent space back onto the latent manifold."""
    import torch

    return z / torch.linalg.vector_norm(z, dim=-1, keepdim=True) if geometry == "sphere" else z


def riemannian_derivatives(
    gradient: Tensor, hessian: Tensor, z: Tensor, basis: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradient (B, k) and Hessian (B, k, k) of a function on R^k -> those of its restriction to the
    latent manifold at z, in the coordinates of `basis` (B, k, m): (B, m), (B, m, m).

    On the sphere the Hessian in normal coordinates (the exponential map z cos|v| + v sin|v| / |v|)
    is B^T H B - (z . grad) I: the second term is the bending of great circles, along which the
    ambient gradient's normal component acts.
    """
    import torch

    if basis is None:
        return gradient, hessian
    tangent_gradient = (basis.transpose(1, 2) @ gradient.unsqueeze(-1)).squeeze(-1)
    bending = (z * gradient).sum(-1)[:, None, None] * torch.eye(
        basis.shape[-1], dtype=z.dtype, device=z.device
    )
    return tangent_gradient, basis.transpose(1, 2) @ hessian @ basis - bending


# --- as ONNX nodes ---------------------------------------------------------------------------------


def emit_normalize(g: Graph, v: str) -> tuple[str, str]:
    """(v / |v|, |v| (B, 1))."""
    norm = g.norm(v, keepdims=True)
    return g.div(v, norm), norm


def emit_tangent_basis(g: Graph, z: str, k: int, dtype: type) -> str:
    """B(z) (B, k, k - 1): the Householder construction of sphere_tangent_basis above."""
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


def emit_bending(g: Graph, z: str, gradient: str, m: int) -> str:
    """(z . gradient) I_m (B, m, m): riemannian_derivatives' bending term, for z, gradient (B, k)."""
    dot = g.unsqueeze(g.unsqueeze(g.sum(g.mul(z, gradient), 1), 1), 2)
    return g.mul(dot, g.const(np.eye(m), np.float64))


def emit_riemannian_hessian(g: Graph, z: str, gradient: str, hessian: str, basis: str, m: int) -> str:
    """B^T H B - (z . grad) I (B, m, m) from ambient gradient (B, k) and Hessian (B, k, k)."""
    return g.sub(g.matmul(g.matmul(g.transpose(basis), hessian), basis), emit_bending(g, z, gradient, m))
