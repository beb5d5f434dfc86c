"""Tolerances between two computations of the same scores, derived from the arithmetic.

float32 networks: a dot product of length n accumulates rounding errors of independent sign, so
its relative error is below lambda sqrt(n) u with probability at least 1 - 2 exp(-lambda^2 / 2)
(Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
41(5), 2019), u = 2^-24. lambda = 4 leaves one chance in 1500 per dot product, and a score sums
thousands of them whose errors partly cancel. L layers in sequence add their relative errors to
first order; two implementations (other kernels, summation order, fused multiply-adds, another
CPU) each carry such an error. The result bounds the error relative to the largest part of a
score (log_prior, log_volume, log_residual), which the tests take as the scale.

float64 (the projection): the iteration stops once its next step is below 1e-8 (1 + |z|), so two
float64 implementations may stop one such step apart; log p(x) moves by at most that step times
its gradient in z, which the Laplace volume term bounds by about the curvature's relative change
per unit of z. 1e-7 relative covers gradients up to 10 per unit; rounding is far below.
"""

from __future__ import annotations

import math

from app.model.spec import Architecture

U32 = 2.0**-24
LAMBDA = 4.0
FLOAT64_PROJECTION_RTOL = 1e-7


def float32_rtol(arch: Architecture) -> float:
    """Relative tolerance between two float32 evaluations of a closed-form score of `arch`."""
    layers = 2 * (arch.depth + 1)  # encoder, then decoder (and its tangents, the same products)
    width = max(arch.hidden, arch.input_dim, arch.latent_dim)
    return 2 * LAMBDA * layers * math.sqrt(width) * U32
