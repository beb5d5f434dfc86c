"""Batched analytic Jacobians against torch.func.jacfwd and central finite differences."""

import pytest
import torch

from app.model.geometry import sphere_tangent_basis
from app.model.manifold import Decoder, Encoder
from app.model.spec import Architecture

from .differences import central_differences


def _reference_jacobian(fn, x):
    return torch.func.vmap(torch.func.jacfwd(lambda row: fn(row.unsqueeze(0)).squeeze(0)))(x)


@pytest.mark.parametrize("geometry", ["euclidean", "sphere"])
@pytest.mark.parametrize("activation", ["swish", "tanh", "softplus"])
def test_encoder_and_decoder_jacobians_match_autodiff_and_finite_differences(geometry, activation):
    torch.manual_seed(0)
    prior = "vmf" if geometry == "sphere" else "normal"
    arch = Architecture(
        input_dim=7, latent_dim=3, hidden=16, depth=3, activation=activation, geometry=geometry, prior=prior
    )
    encoder, decoder = Encoder(arch).double(), Decoder(arch).double()
    x = torch.randn(1000, 7, dtype=torch.float64)
    z = encoder(x)

    for net, inputs in ((encoder, x), (decoder, z)):
        value, J = net.forward_with_jacobian(inputs)
        assert torch.allclose(value, net(inputs), atol=1e-14)
        # forward-mode autodiff is exact: agreement to rounding
        torch.testing.assert_close(J, _reference_jacobian(net, inputs), rtol=1e-10, atol=1e-12)
        # finite differences with h = 1e-6 carry O(h^2) truncation and O(eps/h) rounding error
        torch.testing.assert_close(J, central_differences(net, inputs), rtol=1e-6, atol=1e-7)


def test_relu_jacobian_matches_autodiff_away_from_kinks():
    torch.manual_seed(1)
    arch = Architecture(input_dim=5, latent_dim=2, hidden=8, depth=2, activation="relu")
    decoder = Decoder(arch).double()
    z = torch.randn(500, 2, dtype=torch.float64)
    _, J = decoder.forward_with_jacobian(z)
    torch.testing.assert_close(J, _reference_jacobian(decoder, z), rtol=1e-10, atol=1e-12)


def test_spherical_encoder_jacobian_lies_in_the_tangent_space():
    torch.manual_seed(2)
    arch = Architecture(input_dim=6, latent_dim=4, geometry="sphere", prior="vmf")
    encoder = Encoder(arch).double()
    z, J = encoder.forward_with_jacobian(torch.randn(200, 6, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.vector_norm(z, dim=-1), torch.ones(200, dtype=torch.float64))
    # z^T J = 0: moving the input cannot move z off the sphere to first order
    assert (z.unsqueeze(1) @ J).abs().max() < 1e-12


def test_tangent_basis_is_orthonormal_and_orthogonal_to_z():
    torch.manual_seed(3)
    for k in (2, 3, 8, 32):
        z = torch.randn(300, k, dtype=torch.float64)
        z[:5] = 0.0  # include points at the basis' sign switch and near +-e_1
        z[:5, 0] = torch.tensor([1.0, -1.0, 1e-12, -1e-12, 1.0])
        z[4, 1] = 1e-9
        z = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        B = sphere_tangent_basis(z)
        assert B.shape == (300, k, k - 1)
        eye = torch.eye(k - 1, dtype=torch.float64).expand(300, -1, -1)
        torch.testing.assert_close(B.transpose(1, 2) @ B, eye, rtol=0, atol=1e-12)
        assert (z.unsqueeze(1) @ B).abs().max() < 1e-12


def test_architecture_refuses_a_latent_larger_than_the_data():
    with pytest.raises(ValueError, match="exceeds the data size 8"):
        Architecture(input_dim=8, latent_dim=9)
    # on the sphere the intrinsic size is k - 1, so k = d + 1 is the square case and allowed
    Architecture(input_dim=8, latent_dim=9, geometry="sphere", prior="vmf")
    with pytest.raises(ValueError, match="density on the euclidean"):
        Architecture(input_dim=8, latent_dim=3, geometry="sphere", prior="normal")
