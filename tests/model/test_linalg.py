"""The torch factorisations without LAPACK (issue 20): modified Gram-Schmidt's sum of log singular
values against matrices of known singular values and float64 svdvals, over 1e-6 .. 1e3; CGS2's
basis against LAPACK's QR. Tolerances from the arithmetic: MGS's R is the exact R of A + dA with
|dA| <= c m n u |A| (Bjorck), and Weyl's bound moves each singular value by at most |dA|, so
log s_i moves by at most m n u |A| / s_i (c taken as 1; float64 u = 2^-53)."""

import math

import pytest
import torch

from app.model.linalg import orthonormal_columns, sum_log_singular_values

U = 2.0**-53


def with_singular_values(batch: int, d: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """(batch, d, m) matrices U diag(s) V^T with random orthonormal U (d x m) and V (m x m)."""
    generator = torch.Generator().manual_seed(seed)
    m = s.numel()
    left = torch.linalg.qr(torch.randn(batch, d, m, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(batch, m, m, generator=generator, dtype=torch.float64)).Q
    return left @ torch.diag_embed(s.expand(batch, m)) @ right.transpose(1, 2)


@pytest.mark.parametrize(("d", "m"), [(30, 4), (20, 8), (6, 6), (3, 1)])
def test_mgs_resolves_singular_values_from_1e_6_to_1e3(d, m):
    s = torch.logspace(-6, 3, m, dtype=torch.float64) if m > 1 else torch.tensor([1e-6], dtype=torch.float64)
    A = with_singular_values(64, d, s, seed=d * m)
    bound = (m * d * U * s.max() / s).sum().item()  # the bound above, summed over the m log terms
    got = sum_log_singular_values(A)
    exact = torch.log(s).sum()
    reference = torch.log(torch.linalg.svdvals(A)).sum(-1)
    # A itself is U diag(s) V^T rounded: its singular values are within the same bound of s.
    assert (got - exact).abs().max().item() <= 2 * bound
    assert (got - reference).abs().max().item() <= 2 * bound
    # The transpose has the same singular values: a wide matrix is factored by its rows.
    assert (sum_log_singular_values(A.transpose(1, 2)) - exact).abs().max().item() <= 2 * bound


def test_float32_jacobians_are_factored_in_float64_and_answered_in_float32():
    s = torch.tensor([1e-3, 1.0, 1e2], dtype=torch.float64)
    A = with_singular_values(8, 10, s, seed=1).float()
    got = sum_log_singular_values(A)
    assert got.dtype == torch.float32
    reference = torch.log(torch.linalg.svdvals(A.double())).sum(-1)
    # Both factor the same float64 copy of A; then the answer is rounded to float32 (2^-24 relative).
    bound = (3 * 10 * U * s.max() / s).sum().item() + 2.0**-24 * reference.abs().max().item()
    assert (got.double() - reference).abs().max().item() <= 2 * bound


def test_a_rank_deficient_matrix_floors_its_missing_direction():
    A = torch.zeros(2, 5, 3, dtype=torch.float64)
    A[:, 0, 0], A[:, 1, 2] = 2.0, 3.0  # the middle column is zero
    expected = math.log(2.0) + math.log(1e-12) + math.log(3.0)
    torch.testing.assert_close(sum_log_singular_values(A), torch.full((2,), expected, dtype=torch.float64))


@pytest.mark.parametrize(("d", "m"), [(30, 4), (8, 8)])
def test_cgs2_gives_the_orthonormal_basis_lapack_gives(d, m):
    A = with_singular_values(32, d, torch.logspace(-4, 2, m, dtype=torch.float64), seed=m)
    Q = orthonormal_columns(A)
    eye = torch.eye(m, dtype=torch.float64).expand(32, m, m)
    torch.testing.assert_close(Q.transpose(1, 2) @ Q, eye, rtol=0, atol=50 * d * U)
    # The same span as LAPACK's Q: the two bases differ by a diagonal of signs only, up to each
    # one's error in the weakest direction, of order d u cond(A) (cond = 1e6 here).
    lapack = torch.linalg.qr(A).Q
    torch.testing.assert_close((Q.transpose(1, 2) @ lapack).abs(), eye, rtol=0, atol=10 * d * U * 1e6)
