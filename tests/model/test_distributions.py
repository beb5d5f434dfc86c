"""Latent densities against scipy, torch.distributions and direct computations."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from app.model.distributions import (
    GaussianMixture,
    StandardNormal,
    VonMisesFisherMixture,
    log_bessel_iv,
    numpy_vmf_log_normalizer,
    sample_vmf,
    vmf_log_normalizer,
    vmf_mean_resultant_length,
)


def _unit(rows, k, seed):
    g = np.random.default_rng(seed)
    v = g.standard_normal((rows, k))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_log_bessel_matches_scipy_over_the_whole_supported_range():
    # concentrations 1e-3 .. 1e4 and latent sizes 2 .. 32: orders v = k/2 - 1 from 0 to 15
    kappa = np.logspace(-3, 4, 141)
    for k in range(2, 33):
        v = k / 2 - 1
        expected = np.log(special.ive(v, kappa)) + kappa
        got = log_bessel_iv(v, torch.tensor(kappa, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_vmf_normalizer_tends_to_the_uniform_density_and_has_the_right_derivative():
    for k in (2, 3, 5, 16, 32):
        tiny = vmf_log_normalizer(torch.tensor([1e-12], dtype=torch.float64), k).item()
        area = math.log(2) + (k / 2) * math.log(math.pi) - math.lgamma(k / 2)
        assert tiny == pytest.approx(-area, abs=1e-9)
        # d/dkappa log C_k(kappa) = -A_k(kappa), with A_k from scipy's Bessel ratio
        kappa = torch.tensor(
            [1e-3, 0.3, 7.0, 49.9, 50.1, 300.0, 1e4], dtype=torch.float64, requires_grad=True
        )
        vmf_log_normalizer(kappa, k).sum().backward()
        kd = kappa.detach().numpy()
        ratio = special.ive(k / 2, kd) / special.ive(k / 2 - 1, kd)
        np.testing.assert_allclose(kappa.grad.numpy(), -ratio, rtol=1e-8, atol=1e-12)


def test_the_graphs_torch_free_normaliser_matches_torchs():
    # The difference is the torch series/Debye expansion's error, ~1e-9 relative by its construction
    # (2.5e-11 at most measured here, at kappa = 50 where the expansion takes over): the tolerance is
    # that bound, relative to max(1, |log C|). Concentrations 0 .. 3e4, both sides of each branch
    # switch (1 here, 50 there) included.
    kappa = np.concatenate([[0.0, 1e-300], np.logspace(-8, 4.5, 251), [1 - 1e-12, 1.0, 49.99, 50.0, 50.01]])
    for k in range(2, 33):
        want = vmf_log_normalizer(torch.tensor(kappa), k).numpy()
        np.testing.assert_allclose(numpy_vmf_log_normalizer(kappa, k), want, rtol=1e-9, atol=1e-9)


def test_the_graphs_normaliser_is_exact_to_rounding_on_the_two_sphere():
    # k = 3 has the closed form C = kappa / (4 pi sinh kappa), here without cancellation: the
    # normaliser is then exact to a few ulps on both branches (the series below kappa = 1).
    kappa = np.logspace(-8, 4, 241)
    log_sinh = np.where(
        kappa < 1, np.log(np.sinh(np.minimum(kappa, 1))), kappa + np.log1p(-np.exp(-2 * kappa)) - math.log(2)
    )
    exact = np.log(kappa) - math.log(4 * math.pi) - log_sinh
    error = np.abs(numpy_vmf_log_normalizer(kappa, 3) - exact) / np.maximum(1.0, np.abs(exact))
    assert error.max() < 1e-14


@pytest.mark.parametrize("k", [3, 5, 16])
@pytest.mark.parametrize("kappa", [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])
def test_vmf_log_density_matches_scipy(k, kappa):
    mu = _unit(1, k, seed=k)[0]
    # points both near the mean direction and spread over the sphere
    z = np.vstack([_unit(200, k, seed=1), mu + 0.01 * _unit(50, k, seed=2)])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    expected = stats.vonmises_fisher(mu, kappa).logpdf(z)
    mixture = VonMisesFisherMixture(torch.tensor(mu[None]), torch.tensor([kappa], dtype=torch.float64))
    got = mixture.log_prob(torch.tensor(z)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-8)


def test_vmf_mixture_log_prob_is_the_log_mean_of_its_components():
    k, K = 5, 4
    mus = _unit(K, k, seed=3)
    kappas = np.array([0.5, 4.0, 40.0, 400.0])
    z = _unit(300, k, seed=4)
    dens = np.stack([stats.vonmises_fisher(m, c).logpdf(z) for m, c in zip(mus, kappas, strict=True)], 1)
    expected = special.logsumexp(dens, axis=1) - math.log(K)
    mixture = VonMisesFisherMixture(torch.tensor(mus), torch.tensor(kappas))
    np.testing.assert_allclose(mixture.log_prob(torch.tensor(z)).numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", [2, 3, 5, 16])
@pytest.mark.parametrize("kappa", [0.01, 1.0, 10.0, 1000.0])
def test_wood_sampler_has_the_right_mean_resultant_length(k, kappa):
    torch.manual_seed(k)
    n = 40_000
    mu = torch.tensor(_unit(1, k, seed=5), dtype=torch.float64).expand(n, -1)
    samples = sample_vmf(mu, torch.full((n,), kappa, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.vector_norm(samples, dim=-1), torch.ones(n, dtype=torch.float64))
    projection = samples @ mu[0]
    expected = vmf_mean_resultant_length(torch.tensor(kappa, dtype=torch.float64), k).item()
    expected_scipy = special.ive(k / 2, kappa) / special.ive(k / 2 - 1, kappa)
    assert expected == pytest.approx(expected_scipy, rel=1e-9)
    standard_error = projection.std().item() / math.sqrt(n)
    assert abs(projection.mean().item() - expected) < 3 * standard_error
    # the resultant vector points along mu: its component orthogonal to mu is noise only
    orthogonal = samples.mean(0) - projection.mean() * mu[0]
    assert torch.linalg.vector_norm(orthogonal).item() < 5 * math.sqrt((1 - expected**2) / n) + 1e-12


def test_wood_sampler_matches_scipy_in_distribution():
    torch.manual_seed(7)
    k, kappa, n = 4, 3.0, 20_000
    mu = _unit(1, k, seed=8)[0]
    ours = sample_vmf(torch.tensor(mu).expand(n, -1), torch.full((n,), kappa, dtype=torch.float64))
    theirs = stats.vonmises_fisher(mu, kappa).rvs(n, random_state=np.random.default_rng(9))
    result = stats.ks_2samp(ours.numpy() @ mu, theirs @ mu)
    assert result.pvalue > 1e-3
    # the tangent part too: projections on other directions, partly along mu and not at all
    other = _unit(2, k, seed=10)
    orthogonal = other[1] - (other[1] @ mu) * mu
    for v in (other[0], orthogonal / np.linalg.norm(orthogonal)):
        assert stats.ks_2samp(ours.numpy() @ v, theirs @ v).pvalue > 1e-3


def test_vmf_sampling_is_differentiable_in_direction_and_concentration():
    torch.manual_seed(10)
    mu = torch.tensor(_unit(4, 3, seed=11), requires_grad=True)
    kappa = torch.tensor([1.0, 5.0, 20.0, 80.0], dtype=torch.float64, requires_grad=True)
    mixture = VonMisesFisherMixture(mu, kappa)
    mixture.rsample(256).sum().backward()
    assert torch.isfinite(mu.grad).all() and mu.grad.abs().sum() > 0
    assert torch.isfinite(kappa.grad).all() and kappa.grad.abs().sum() > 0


def test_gaussian_mixture_matches_torch_mixture_same_family():
    torch.manual_seed(12)
    K, k = 5, 3
    means = torch.randn(K, k, dtype=torch.float64)
    scales = torch.rand(K, k, dtype=torch.float64) + 0.2
    ours = GaussianMixture(means, scales)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.full((K,), 1.0 / K, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(means, scales), 1),
    )
    z = torch.randn(400, k, dtype=torch.float64) * 2
    torch.testing.assert_close(ours.log_prob(z), reference.log_prob(z), rtol=1e-12, atol=1e-12)
    # samples have the mixture's mean and covariance
    samples = ours.rsample(100_000)
    torch.testing.assert_close(samples.mean(0), means.mean(0), rtol=0, atol=0.03)
    covariance = torch.diag_embed(scales**2).mean(0) + torch.cov(means.T, correction=0)
    torch.testing.assert_close(torch.cov(samples.T), covariance, rtol=0, atol=0.05)


def test_standard_normal_matches_scipy():
    z = torch.randn(100, 4, dtype=torch.float64)
    expected = stats.multivariate_normal(np.zeros(4), np.eye(4)).logpdf(z.numpy())
    got = StandardNormal(4, dtype=torch.float64).log_prob(z).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def _autodiff_derivatives(distribution, z):
    one = lambda row: distribution.log_prob(row.unsqueeze(0))[0]  # noqa: E731
    gradient = torch.func.vmap(torch.func.grad(one))(z)
    hessian = torch.func.vmap(torch.func.hessian(one))(z)
    return distribution.log_prob(z), gradient, hessian


@pytest.mark.parametrize("kind", ["standard", "gaussian mixture", "vmf mixture"])
def test_log_prob_derivatives_equal_autodiff(kind):
    # The closed forms (mixture weights times component gradients, minus the outer product of the
    # mean gradient) against torch.func's gradient and Hessian of log_prob itself.
    torch.manual_seed(0)
    k = 4
    if kind == "standard":
        distribution = StandardNormal(k, torch.float64)
        z = torch.randn(50, k, dtype=torch.float64)
    elif kind == "gaussian mixture":
        distribution = GaussianMixture(
            torch.randn(5, k, dtype=torch.float64), torch.rand(5, k, dtype=torch.float64) + 0.2
        )
        z = torch.randn(50, k, dtype=torch.float64)
    else:
        directions = torch.nn.functional.normalize(torch.randn(5, k, dtype=torch.float64), dim=1)
        distribution = VonMisesFisherMixture(directions, torch.rand(5, dtype=torch.float64) * 40 + 0.5)
        z = torch.nn.functional.normalize(torch.randn(50, k, dtype=torch.float64), dim=1)
    for got, want in zip(
        distribution.log_prob_derivatives(z), _autodiff_derivatives(distribution, z), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
