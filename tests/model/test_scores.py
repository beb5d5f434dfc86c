"""Score functions against closed forms, quadrature and change of variables."""

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.func import stack_module_state

from app.model.distributions import GaussianMixture, StandardNormal, VonMisesFisherMixture
from app.model.manifold import FunctionMap, GenerativeModel, ManifoldModel
from app.model.scores import (
    SCORE_METHODS,
    STACKED_METHODS,
    encoder,
    likelihood,
    projected,
    score,
    stacked_score,
)
from app.model.spec import PRIOR_GEOMETRY, Architecture

from ..tolerances import float32_rtol
from .differences import central_differences

F64 = torch.float64


def _linear(A, b):
    return FunctionMap(lambda z: z @ A.T + b)


def _integral(model, points):
    """Sum of the projected density over grid points, in chunks that bound the memory."""
    return sum(torch.exp(projected(model, chunk).log_prob).sum().item() for chunk in points.split(200_000))


def _grid(x_range, y_range, step):
    xs = torch.arange(*x_range, step, dtype=F64)
    ys = torch.arange(*y_range, step, dtype=F64)
    X, Y = torch.meshgrid(xs, ys, indexing="ij")
    return torch.stack([X.reshape(-1), Y.reshape(-1)], dim=1), step * step


# Relative noise variances far from 1 and not normalised (sum log w != 0): the density must use them
# as stored.
RELATIVE_VARIANCE = (0.05, 1.0, 3.0, 0.5, 2.0, 0.25)


@pytest.mark.parametrize("relative_variance", [None, RELATIVE_VARIANCE])
def test_linear_decoder_likelihood_matches_closed_form(relative_variance):
    torch.manual_seed(0)
    d, k, sigma2 = 6, 3, 0.7
    A, b = torch.randn(d, k, dtype=F64), torch.randn(d, dtype=F64)
    C, c = torch.randn(k, d, dtype=F64), torch.randn(k, dtype=F64)  # any encoder
    model = GenerativeModel(
        _linear(A, b), StandardNormal(k, F64), "euclidean", sigma2, None, _linear(C, c), relative_variance
    )
    x = torch.randn(500, d, dtype=F64) * 2

    parts = likelihood(model, x)

    z = (x @ C.T + c).numpy()
    e = x.numpy() - (z @ A.numpy().T + b.numpy())
    log_prior = -0.5 * (z**2).sum(1) - 0.5 * k * math.log(2 * math.pi)
    log_volume = -0.5 * np.linalg.slogdet(A.numpy().T @ A.numpy())[1]
    variances = sigma2 * np.ones(d) if relative_variance is None else sigma2 * np.asarray(relative_variance)
    log_residual = scipy.stats.multivariate_normal(np.zeros(d), np.diag(variances)).logpdf(e)
    np.testing.assert_allclose(parts.log_prior.numpy(), log_prior, rtol=0, atol=1e-6)
    np.testing.assert_allclose(parts.log_volume.numpy(), np.full(500, log_volume), rtol=0, atol=1e-6)
    np.testing.assert_allclose(parts.log_residual.numpy(), log_residual, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        parts.log_prob.numpy(), log_prior + log_volume + log_residual, rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(parts.reconstruction_error.numpy(), (e**2).sum(1), rtol=1e-12)


def test_encoder_score_equals_likelihood_when_g_inverts_f_on_the_manifold():
    # eq. 8 == eq. 7 when g o f = id: g = A^+ (x - b) has singular values 1 / s_i(A)
    torch.manual_seed(1)
    d, k = 5, 2
    A, b = torch.randn(d, k, dtype=F64), torch.randn(d, dtype=F64)
    pinv = torch.linalg.pinv(A)
    model = GenerativeModel(
        _linear(A, b), StandardNormal(k, F64), "euclidean", 0.3, None, _linear(pinv, -pinv @ b)
    )
    x = torch.randn(200, d, dtype=F64)
    via_decoder, via_encoder = likelihood(model, x), encoder(model, x)
    torch.testing.assert_close(via_encoder.log_volume, via_decoder.log_volume, rtol=0, atol=1e-10)
    torch.testing.assert_close(via_encoder.log_prob, via_decoder.log_prob, rtol=0, atol=1e-10)


def test_encoder_volume_is_restricted_to_the_manifold_for_a_linear_pair():
    # f(z) = A z + b, g(x) = C x + c with C no inverse of A. g maps the manifold's tangent space
    # span(A) = span(Q), A = Q R, to R^k: |det(C Q)| = |det(C A)| / |det R|, det R^2 = det(A^T A).
    # The singular values of C over all of R^d also count directions normal to the manifold.
    torch.manual_seed(5)
    d, k = 6, 3
    A, b = torch.randn(d, k, dtype=F64), torch.randn(d, dtype=F64)
    C, c = torch.randn(k, d, dtype=F64), torch.randn(k, dtype=F64)
    model = GenerativeModel(_linear(A, b), StandardNormal(k, F64), "euclidean", 0.5, None, _linear(C, c))
    parts = encoder(model, torch.randn(40, d, dtype=F64))
    restricted = torch.linalg.slogdet(C @ A)[1] - 0.5 * torch.linalg.slogdet(A.T @ A)[1]
    unrestricted = torch.log(torch.linalg.svdvals(C)).sum()
    torch.testing.assert_close(parts.log_volume, restricted.expand(40), rtol=0, atol=1e-10)
    assert abs(restricted - unrestricted) > 0.1  # the case distinguishes the two


def test_encoder_volume_matches_finite_differences_on_a_curved_decoder():
    # At x' = f(z0), z0 = g(x): J_{g o f}(z0) = J_g(x') J_f(z0) = (J_g Q) R with J_f = Q R, so
    # log|det(J_g Q)| = log|det J_{g o f}(z0)| - log sqrt(det(J_f^T J_f)), both from central
    # differences of the maps alone.
    def f(z):
        return torch.stack(
            [
                z[:, 0],
                z[:, 1],
                torch.sin(z[:, 0]) * z[:, 1],
                z[:, 0] ** 2 - 0.5 * z[:, 1],
                torch.tanh(z.sum(1)),
            ],
            1,
        )

    def g(x):
        return torch.stack([x[:, 0] + 0.3 * torch.tanh(x[:, 2]), 0.8 * x[:, 1] - 0.2 * x[:, 3] * x[:, 4]], 1)

    model = GenerativeModel(FunctionMap(f), StandardNormal(2, F64), "euclidean", 0.5, None, FunctionMap(g))
    torch.manual_seed(6)
    x = torch.randn(30, 5, dtype=F64)
    parts = encoder(model, x)
    z0 = g(x)
    J_gf, J_f = central_differences(lambda z: g(f(z)), z0, 1e-5), central_differences(f, z0, 1e-5)
    expected = torch.linalg.slogdet(J_gf)[1] - 0.5 * torch.linalg.slogdet(J_f.transpose(1, 2) @ J_f)[1]
    torch.testing.assert_close(parts.log_volume, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("relative_variance", [None, RELATIVE_VARIANCE[:5]])
@pytest.mark.parametrize("prior", ["standard", "one gaussian"])
def test_projected_is_the_exact_marginal_of_a_linear_gaussian_model(prior, relative_variance):
    # x = A z + b + e, z ~ N(mu, S^2), e ~ N(0, sigma2 diag(w)): p(x) = N(b + A mu, A S^2 A^T +
    # sigma2 diag(w)). The log joint is quadratic in z, so the Laplace approximation is exact.
    torch.manual_seed(7)
    d, k, sigma2 = 5, 2, 0.4
    A, b = torch.randn(d, k, dtype=F64), torch.randn(d, dtype=F64)
    if prior == "standard":
        mu, scales, latent = torch.zeros(k, dtype=F64), torch.ones(k, dtype=F64), StandardNormal(k, F64)
    else:
        mu, scales = torch.randn(k, dtype=F64), torch.rand(k, dtype=F64) + 0.3
        latent = GaussianMixture(mu[None], scales[None])
    start = FunctionMap(lambda x: 0.1 * x[:, :k])  # a poor start: the MAP iteration must fix it
    model = GenerativeModel(_linear(A, b), latent, "euclidean", sigma2, None, start, relative_variance)
    x = torch.randn(300, d, dtype=F64) * 2
    parts = projected(model, x)
    w = torch.ones(d, dtype=F64) if relative_variance is None else torch.tensor(relative_variance, dtype=F64)
    covariance = A @ torch.diag(scales**2) @ A.T + sigma2 * torch.diag(w)
    exact = torch.distributions.MultivariateNormal(b + A @ mu, covariance).log_prob(x)
    assert bool(parts.converged.all())
    torch.testing.assert_close(parts.log_prob, exact, rtol=0, atol=1e-9)
    # the parts are the rows' own: x_hat = f(z*), and the reconstruction error its plain distance
    torch.testing.assert_close(parts.x_hat, parts.z @ A.T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        parts.reconstruction_error, ((x - parts.x_hat) ** 2).sum(1), rtol=1e-12, atol=0
    )


def test_projected_density_integrates_to_one_for_a_linear_decoder():
    a, b, sigma2 = torch.tensor([[1.2], [-0.9]], dtype=F64), torch.tensor([0.3, -0.2], dtype=F64), 0.3
    encoder_map = FunctionMap(lambda x: x[:, :1] * 0.5)
    model = GenerativeModel(_linear(a, b), StandardNormal(1, F64), "euclidean", sigma2, None, encoder_map)
    points, cell = _grid((-8, 8), (-8, 8), 0.02)
    density = torch.exp(projected(model, points).log_prob)
    assert density.sum().item() * cell == pytest.approx(1.0, abs=1e-3)


def test_projected_density_integrates_to_one_within_two_percent_for_a_curved_decoder():
    sigma2 = 0.05**2
    decoder = FunctionMap(lambda z: torch.cat([z, 0.5 * z**2], dim=1))  # a parabola, curvature up to 1
    model = GenerativeModel(
        decoder, StandardNormal(1, F64), "euclidean", sigma2, None, FunctionMap(lambda x: x[:, :1])
    )
    points, cell = _grid((-4.5, 4.5), (-0.6, 10.5), 0.01)
    assert _integral(model, points) * cell == pytest.approx(1.0, rel=0.02)


def test_projected_density_on_the_sphere_integrates_to_one_within_two_percent():
    # z on S^1 with a vMF prior, f a circle of radius 2 in the plane: the Laplace approximation uses
    # the Hessian in normal coordinates of the sphere, including the bending term.
    prior = VonMisesFisherMixture(torch.tensor([[0.6, 0.8]], dtype=F64), torch.tensor([3.0], dtype=F64))
    model = GenerativeModel(
        FunctionMap(lambda z: 2 * z),
        prior,
        "sphere",
        0.1**2,
        None,
        FunctionMap(lambda x: torch.nn.functional.normalize(x, dim=1)),
    )
    points, cell = _grid((-3, 3), (-3, 3), 0.01)
    assert _integral(model, points) * cell == pytest.approx(1.0, rel=0.02)


def test_projected_finds_a_stationary_point_of_the_map_objective_where_the_decoder_saturates():
    # A tanh decoder is flat far out: minimising |x - f(z)|^2 alone lets z drift without bound.
    # The prior keeps the MAP point finite; autodiff of the objective (an independent gradient)
    # vanishes there for every converged row.
    torch.manual_seed(8)
    arch = Architecture(input_dim=6, latent_dim=2, hidden=16, activation="tanh", prior="vamp", components=3)
    net = ManifoldModel(arch).double()
    with torch.no_grad():
        net.decoder.net.layers[0].weight.mul_(4.0)  # saturate
    model = dataclasses.replace(net.generative(), sigma2=0.05)
    x = torch.randn(200, 6, dtype=F64) * 4
    parts = projected(model, x)
    assert parts.converged.float().mean() > 0.99
    assert parts.z.abs().max() < 50

    def objective(z, row):
        e = row - model.decoder(z.unsqueeze(0))[0]
        return 0.5 * (e * e).sum() / 0.05 - model.prior.log_prob(z.unsqueeze(0))[0]

    gradients = torch.stack([torch.func.grad(objective)(z, row) for z, row in zip(parts.z, x, strict=True)])
    scale = 1 + torch.stack([objective(z, row) for z, row in zip(parts.z, x, strict=True)]).abs()
    converged = parts.converged
    assert (gradients[converged].norm(dim=1) / scale[converged]).max() < 1e-6


def test_square_case_is_the_change_of_variables_density_and_integrates_to_one():
    # f(z) = [2 z1 + 1, z2 exp(z1 / 4)], an invertible map of the plane with det J_f = 2 exp(z1 / 4)
    def f(z):
        return torch.stack([2 * z[:, 0] + 1, z[:, 1] * torch.exp(z[:, 0] / 4)], dim=1)

    def g(x):
        z1 = (x[:, 0] - 1) / 2
        return torch.stack([z1, x[:, 1] * torch.exp(-z1 / 4)], dim=1)

    model = GenerativeModel(FunctionMap(f), StandardNormal(2, F64), "euclidean", 1e-10, None, FunctionMap(g))
    points, cell = _grid((-12, 14), (-20, 20), 0.05)
    parts = likelihood(model, points)
    without_residual = parts.log_prior + parts.log_volume
    z = g(points)
    change_of_variables = -0.5 * (z**2).sum(1) - math.log(2 * math.pi) - math.log(2) - z[:, 0] / 4
    torch.testing.assert_close(without_residual, change_of_variables, rtol=0, atol=1e-10)
    assert parts.reconstruction_error.max().item() < 1e-20
    assert torch.exp(without_residual).sum().item() * cell == pytest.approx(1.0, abs=1e-3)
    # With no normal directions left, the marginal of projected tends to the change of variables as
    # the noise vanishes: log p(x) = log p(z*) - log|det J_f| + O(sigma2).
    torch.testing.assert_close(
        projected(model, points[:2000]).log_prob, change_of_variables[:2000], rtol=0, atol=1e-6
    )


def test_sphere_restriction_gives_the_arc_length_volume_on_s1():
    # f on S^1 in R^3; with z = (cos t, sin t), |df/dt| is the closed-form volume factor
    a, b, c = 1.5, 0.4, 2.0

    def f(z):
        return torch.stack([a * z[:, 0], b * z[:, 1], c * z[:, 0] * z[:, 1]], dim=1)

    t = torch.linspace(-3.1, 3.1, 301, dtype=F64)
    z = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    x = f(z)
    model = GenerativeModel(
        FunctionMap(f),
        VonMisesFisherMixture(torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([2.0], dtype=F64)),
        "sphere",
        0.1,
        None,
        FunctionMap(
            lambda x: torch.nn.functional.normalize(torch.stack([x[:, 0] / a, x[:, 1] / b], 1), dim=1)
        ),
    )
    speed = torch.sqrt((a * torch.sin(t)) ** 2 + (b * torch.cos(t)) ** 2 + (c * torch.cos(2 * t)) ** 2)
    parts = likelihood(model, x)
    torch.testing.assert_close(parts.log_volume, -torch.log(speed), rtol=0, atol=1e-10)
    torch.testing.assert_close(parts.z, z, rtol=0, atol=1e-12)


def test_gaussian_mixture_prior_enters_as_log_prior():
    torch.manual_seed(3)
    means, scales = torch.randn(3, 2, dtype=F64), torch.rand(3, 2, dtype=F64) + 0.5
    prior = GaussianMixture(means, scales)
    A = torch.randn(4, 2, dtype=F64)
    model = GenerativeModel(
        _linear(A, torch.zeros(4, dtype=F64)),
        prior,
        "euclidean",
        1.0,
        None,
        _linear(torch.linalg.pinv(A), torch.zeros(2, dtype=F64)),
    )
    x = torch.randn(50, 4, dtype=F64)
    parts = score(model, x, "latent")
    torch.testing.assert_close(parts.log_prob, prior.log_prob(x @ torch.linalg.pinv(A).T))


@pytest.mark.parametrize("method", sorted(SCORE_METHODS))
@pytest.mark.parametrize("geometry", ["euclidean", "sphere"])
def test_every_method_is_finite_and_its_parts_add_up_on_a_trained_shape_model(method, geometry):
    torch.manual_seed(4)
    prior = {"euclidean": "vamp", "sphere": "vmf"}[geometry]
    arch = Architecture(input_dim=9, latent_dim=3, hidden=16, geometry=geometry, prior=prior, components=4)
    net = ManifoldModel(arch)
    x = torch.randn(256, 9)
    with torch.no_grad():
        parts = score(net.generative(), x, method)
    assert parts.log_prob.dtype == torch.float32
    for value in (parts.log_prob, parts.log_prior, parts.log_volume, parts.log_residual):
        assert value.shape == (256,) and torch.isfinite(value).all()
    torch.testing.assert_close(parts.log_prob, parts.log_prior + parts.log_volume + parts.log_residual)
    # float32 networks against the same networks in float64
    with torch.no_grad():
        reference = score(net.double().generative(), x.double(), method)
    rtol = float32_rtol(arch)
    torch.testing.assert_close(parts.log_prob.double(), reference.log_prob, rtol=rtol, atol=rtol)


def test_degenerate_jacobian_gives_a_finite_floored_volume():
    A = torch.zeros(4, 2, dtype=F64)
    A[0, 0] = 1.0  # rank one: the second singular value is exactly zero
    model = GenerativeModel(
        _linear(A, torch.zeros(4, dtype=F64)),
        StandardNormal(2, F64),
        "euclidean",
        1.0,
        None,
        FunctionMap(lambda x: x[:, :2]),
    )
    parts = likelihood(model, torch.randn(10, 4, dtype=F64))
    assert torch.isfinite(parts.log_prob).all()
    torch.testing.assert_close(parts.log_volume, torch.full((10,), -math.log(1e-12), dtype=F64))


def test_refusals_name_the_problem():
    A = torch.randn(2, 3, dtype=F64)
    too_big = GenerativeModel(
        _linear(A, torch.zeros(2, dtype=F64)),
        StandardNormal(3, F64),
        "euclidean",
        1.0,
        None,
        FunctionMap(lambda x: torch.cat([x, x[:, :1]], 1)),
    )
    with pytest.raises(ValueError, match="latent size 3 exceeds the data size 2"):
        likelihood(too_big, torch.randn(4, 2, dtype=F64))
    with pytest.raises(ValueError, match="unknown score method 'nope'"):
        score(too_big, torch.randn(4, 2, dtype=F64), "nope")
    decoder_only = GenerativeModel(_linear(A, torch.zeros(2, dtype=F64)), StandardNormal(3, F64), "euclidean")
    with pytest.raises(ValueError, match="needs an encoder"):
        likelihood(decoder_only, torch.randn(4, 2, dtype=F64))


@pytest.mark.parametrize(("prior", "geometry"), list(PRIOR_GEOMETRY.items()))
def test_stacked_models_score_each_as_it_scores_alone(prior, geometry):
    """stacked_score runs C models' layers as batched products; each model's slice is its own
    score, within two float32 evaluations' bound (a batched product may round otherwise)."""
    torch.manual_seed(3)
    arch = Architecture(
        input_dim=6, latent_dim=3, hidden=8, depth=2, geometry=geometry, prior=prior, components=2
    )
    models = [ManifoldModel(arch).eval() for _ in range(3)]
    for i, model in enumerate(models):
        model.sigma2 = 0.2 + 0.3 * i
    models[1].relative_variance = (0.5, 2.0, 1.0, 0.1, 4.0, 1.5)  # the others isotropic
    params = {name: value.detach() for name, value in stack_module_state(models)[0].items()}
    x = torch.randn(40, 6)
    rtol = float32_rtol(arch)
    with torch.no_grad():
        for method in STACKED_METHODS:
            noises = [m.relative_variance for m in models]
            stacked = stacked_score(arch, params, [m.sigma2 for m in models], x, method, noises)
            for j, model in enumerate(models):
                alone = score(model.generative(), x, method)
                scale = torch.stack([alone.log_prior.abs(), alone.log_volume.abs(), alone.log_residual.abs()])
                scale = scale.amax(0).clamp(min=1.0)
                for name in ("log_prob", "log_prior", "log_volume", "log_residual", "residual_sq"):
                    difference = (getattr(stacked, name)[j] - getattr(alone, name)).abs()
                    assert bool((difference <= rtol * scale).all()), (method, j, name)
                torch.testing.assert_close(stacked.x_hat[j], alone.x_hat, rtol=rtol, atol=rtol)
    with pytest.raises(ValueError, match="'projected' is not scored stacked"):
        stacked_score(arch, params, [1.0] * 3, x, "projected")
