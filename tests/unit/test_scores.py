"""Score functions against closed forms, quadrature and change of variables."""

import math

import numpy as np
import pytest
import torch

from app.distributions import GaussianMixture, StandardNormal, VonMisesFisherMixture
from app.model import FunctionMap, GenerativeModel, ManifoldModel
from app.scores import SCORE_METHODS, encoder, likelihood, projected, score
from app.spec import Architecture

F64 = torch.float64


def _linear(A, b):
    return FunctionMap(lambda z: z @ A.T + b)


def _grid(x_range, y_range, step):
    xs = torch.arange(*x_range, step, dtype=F64)
    ys = torch.arange(*y_range, step, dtype=F64)
    X, Y = torch.meshgrid(xs, ys, indexing="ij")
    return torch.stack([X.reshape(-1), Y.reshape(-1)], dim=1), step * step


def test_linear_decoder_likelihood_matches_closed_form():
    torch.manual_seed(0)
    d, k, sigma2 = 6, 3, 0.7
    A, b = torch.randn(d, k, dtype=F64), torch.randn(d, dtype=F64)
    C, c = torch.randn(k, d, dtype=F64), torch.randn(k, dtype=F64)  # any encoder
    model = GenerativeModel(_linear(A, b), StandardNormal(k, F64), "euclidean", sigma2, None, _linear(C, c))
    x = torch.randn(500, d, dtype=F64) * 2

    parts = likelihood(model, x)

    z = (x @ C.T + c).numpy()
    e = x.numpy() - (z @ A.numpy().T + b.numpy())
    log_prior = -0.5 * (z**2).sum(1) - 0.5 * k * math.log(2 * math.pi)
    log_volume = -0.5 * np.linalg.slogdet(A.numpy().T @ A.numpy())[1]
    log_residual = -0.5 * (e**2).sum(1) / sigma2 - 0.5 * d * math.log(2 * math.pi * sigma2)
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


def test_projected_density_integrates_to_one_for_a_linear_decoder():
    a, b, sigma2 = torch.tensor([[1.2], [-0.9]], dtype=F64), torch.tensor([0.3, -0.2], dtype=F64), 0.3
    encoder_map = FunctionMap(lambda x: x[:, :1] * 0.5)  # a poor start: the projection must fix it
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
    total = sum(torch.exp(projected(model, chunk).log_prob).sum().item() for chunk in points.split(200_000))
    assert total * cell == pytest.approx(1.0, rel=0.02)


def test_projected_without_an_encoder_finds_the_projection_from_prior_starts():
    torch.manual_seed(2)
    sigma2 = 0.01
    decoder = FunctionMap(lambda z: torch.cat([torch.cos(2 * z), torch.sin(2 * z), 0.3 * z], dim=1))
    with_encoder = GenerativeModel(
        decoder, StandardNormal(1, F64), "euclidean", sigma2, None, FunctionMap(lambda x: x[:, 2:] / 0.3)
    )
    without = GenerativeModel(decoder, StandardNormal(1, F64), "euclidean", sigma2)
    z = 0.7 * torch.randn(300, 1, dtype=F64)  # where the prior's starts can reach every basin
    x = decoder(z) + 0.02 * torch.randn(300, 3, dtype=F64)
    torch.testing.assert_close(
        projected(without, x, steps=12, starts=16).log_prob,
        projected(with_encoder, x).log_prob,
        rtol=0,
        atol=1e-6,
    )


def test_square_case_is_the_change_of_variables_density_and_integrates_to_one():
    # f(z) = [2 z1 + 1, z2 exp(z1 / 4)], an invertible map of the plane with det J_f = 2 exp(z1 / 4)
    def f(z):
        return torch.stack([2 * z[:, 0] + 1, z[:, 1] * torch.exp(z[:, 0] / 4)], dim=1)

    def g(x):
        z1 = (x[:, 0] - 1) / 2
        return torch.stack([z1, x[:, 1] * torch.exp(-z1 / 4)], dim=1)

    model = GenerativeModel(FunctionMap(f), StandardNormal(2, F64), "euclidean", 1.0, None, FunctionMap(g))
    points, cell = _grid((-12, 14), (-20, 20), 0.05)
    parts = likelihood(model, points)
    without_residual = parts.log_prior + parts.log_volume
    z = g(points)
    change_of_variables = -0.5 * (z**2).sum(1) - math.log(2 * math.pi) - math.log(2) - z[:, 0] / 4
    torch.testing.assert_close(without_residual, change_of_variables, rtol=0, atol=1e-10)
    assert parts.reconstruction_error.max().item() < 1e-20
    assert torch.exp(without_residual).sum().item() * cell == pytest.approx(1.0, abs=1e-3)
    # projected has no normal directions left: its density is the change of variables too
    torch.testing.assert_close(
        projected(model, points[:2000]).log_prob, change_of_variables[:2000], rtol=0, atol=1e-8
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
    torch.testing.assert_close(projected(model, x).log_volume, -torch.log(speed), rtol=0, atol=1e-8)


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
    if method == "projected":
        # The projection is a non-convex minimisation: on an untrained network, rows far from the
        # manifold have several local minima and rounding may pick another one, so precisions are
        # compared only for the closed-form scores.
        return
    with torch.no_grad():
        reference = score(net.double().generative(), x.double(), method)
    torch.testing.assert_close(parts.log_prob.double(), reference.log_prob, rtol=1e-4, atol=1e-3)


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
