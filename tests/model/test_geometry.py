"""The latent manifold's tangent spaces and Riemannian derivatives against autodiff."""

import torch

from app.model.distributions import VonMisesFisherMixture
from app.model.geometry import riemannian_derivatives, sphere_tangent_basis

F64 = torch.float64


def test_sphere_derivatives_are_those_of_the_function_in_normal_coordinates():
    # h(t) = log p(exp_z(B t)), exp_z(v) = z cos|v| + v sin|v| / |v|: its gradient and Hessian at
    # t = 0, by autodiff through the exponential map, are the Riemannian ones in the basis B(z).
    torch.manual_seed(1)
    k = 4
    directions = torch.nn.functional.normalize(torch.randn(3, k, dtype=F64), dim=1)
    prior = VonMisesFisherMixture(directions, torch.tensor([2.0, 9.0, 30.0], dtype=F64))
    z = torch.nn.functional.normalize(torch.randn(20, k, dtype=F64), dim=1)
    basis = sphere_tangent_basis(z)

    def in_normal_coordinates(t, z_row, basis_row):
        v = basis_row @ t
        norm = torch.sqrt((v * v).sum() + 1e-300)
        # sin|v|/|v| by its series near 0, where autodiff of the quotient would divide 0 by 0
        sinc = 1 - norm**2 / 6 + norm**4 / 120
        point = z_row * torch.cos(norm) + v * sinc
        return prior.log_prob(point.unsqueeze(0))[0]

    origin = torch.zeros(k - 1, dtype=F64)
    want_gradient = torch.stack(
        [torch.func.grad(in_normal_coordinates)(origin, zr, br) for zr, br in zip(z, basis, strict=True)]
    )
    want_hessian = torch.stack(
        [torch.func.hessian(in_normal_coordinates)(origin, zr, br) for zr, br in zip(z, basis, strict=True)]
    )
    _, gradient, hessian = prior.log_prob_derivatives(z)
    got_gradient, got_hessian = riemannian_derivatives(gradient, hessian, z, basis)
    torch.testing.assert_close(got_gradient, want_gradient, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_hessian, want_hessian, rtol=1e-10, atol=1e-10)


def test_euclidean_derivatives_pass_through():
    g, h = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, 2, dtype=F64)
    got = riemannian_derivatives(g, h, torch.randn(3, 2, dtype=F64), None)
    assert got[0] is g and got[1] is h
