"""Latent geometry: the tangent space of the latent manifold at a point.

For the Euclidean latent space the tangent space is R^k itself. On the unit sphere S^(k-1) it is
{v : v . z = 0}, of dimension k - 1; the change of variables onto the data manifold must use that
space (method notes, departure 2), so every Jacobian of the decoder is restricted to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.model.spec import Geometry


def sphere_tangent_basis(z: Tensor) -> Tensor:
    """Orthonormal basis of the tangent space of S^(k-1) at unit vectors z.

    z: (B, k) -> (B, k, k - 1), columns orthonormal and orthogonal to z.

    The Householder reflection H = I - 2 u u^T / |u|^2 with u = z + s e_1, s = sign(z_1), maps e_1
    to -s z; H is orthogonal, so its other columns span z's orthogonal complement. Choosing the
    sign of z_1 keeps |u| >= 1, so there is no cancellation anywhere on the sphere.
    """
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
    if basis is None:
        return gradient, hessian
    tangent_gradient = (basis.transpose(1, 2) @ gradient.unsqueeze(-1)).squeeze(-1)
    bending = (z * gradient).sum(-1)[:, None, None] * torch.eye(
        basis.shape[-1], dtype=z.dtype, device=z.device
    )
    return tangent_gradient, basis.transpose(1, 2) @ hessian @ basis - bending
