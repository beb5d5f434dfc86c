"""The paper's Fig. 1 toy problem: x = [z^2, z] + e, z ~ N(0.5, 0.15^2), e ~ N(0, 0.01 I).

With the true decoder f(z) = [z^2, z] and encoder g(x) = x_2 it shows where each score fails:
reconstruction error is blind along the manifold, the latent density is blind across it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.model.distributions import GaussianMixture
from app.model.manifold import FunctionMap, GenerativeModel

Z_MEAN, Z_STD, NOISE_VAR = 0.5, 0.15, 0.01


def decode(z: Tensor) -> Tensor:  # (B, 1) -> (B, 2)
    return torch.cat([z * z, z], dim=1)


def encode(x: Tensor) -> Tensor:  # (B, 2) -> (B, 1)
    return x[:, 1:]


def toy_model(dtype: torch.dtype = torch.float64) -> GenerativeModel:
    prior = GaussianMixture(torch.full((1, 1), Z_MEAN, dtype=dtype), torch.full((1, 1), Z_STD, dtype=dtype))
    return GenerativeModel(FunctionMap(decode), prior, "euclidean", NOISE_VAR, None, FunctionMap(encode))


def sample_normal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    z = Z_MEAN + Z_STD * torch.randn(n, 1, generator=generator, dtype=dtype)
    return decode(z) + NOISE_VAR**0.5 * torch.randn(n, 2, generator=generator, dtype=dtype)


def sample_on_manifold_far(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """Anomalies on the manifold where the prior has no mass (|z - 0.5| between 5 and 8 sd)."""
    offset = (5 + 3 * torch.rand(n, 1, generator=generator, dtype=dtype)) * Z_STD
    sign = torch.where(torch.rand(n, 1, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    z = Z_MEAN + sign * offset
    return decode(z) + NOISE_VAR**0.5 * torch.randn(n, 2, generator=generator, dtype=dtype)


def sample_off_manifold_near(
    n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Anomalies among the normal rows' latent values but pushed 5 to 8 noise sd off the manifold."""
    z = Z_MEAN + Z_STD * torch.randn(n, 1, generator=generator, dtype=dtype)
    offset = (5 + 3 * torch.rand(n, 1, generator=generator, dtype=dtype)) * NOISE_VAR**0.5
    sign = torch.where(torch.rand(n, 1, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    return decode(z) + torch.cat([sign * offset, torch.zeros_like(z)], dim=1)
