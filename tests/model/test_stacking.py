"""Members' graphs stacked along a leading axis (app.model.stacking): each member's slice of every
output is what its own graph computes, over every prior, geometry, activation, depth and manifold
size the exporter emits; what cannot be stacked is refused by name."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.model.methods import METHODS, OUTPUTS
from app.model.onnx_export import LOOP_METHOD, export_graph
from app.model.spec import PRIOR_GEOMETRY, Architecture
from app.model.stacking import NotStackable, stack, structure

from ..tolerances import float32_rtol
from .test_onnx_export import random_weights, small_architectures

CLOSED_FORM = [m for m in METHODS if m != LOOP_METHOD]
PARTS = ("log_prior", "log_volume", "log_residual")


def _weights(arch: Architecture, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights at the scale PyTorch initialises a layer (deviation 1 / sqrt(fan-in)), as a
    trained network's are: unit-deviation weights through several layers make Jacobians so
    ill-conditioned that float32 rounding alone moves the encoder's log volume by 1e-4."""
    weights = random_weights(arch, rng)
    for name, value in weights.items():
        if name.endswith(".weight"):
            weights[name] = (value / np.sqrt(value.shape[1])).astype(np.float32)
    return weights


def _member_graphs(arch: Architecture, method: str, members: int, seed: int) -> list[onnx.ModelProto]:
    """`members` graphs of `arch`, each with its own weights, scaler and noise."""
    rng = np.random.default_rng(seed)
    d = arch.input_dim
    return [
        export_graph(
            arch,
            _weights(arch, rng),
            method,
            mean=rng.standard_normal(d),
            scale=rng.uniform(0.5, 2.0, d),
            sigma2=float(rng.uniform(0.1, 1.0)),
            sigma2_projected=float(rng.uniform(0.1, 1.0)),
        ).model
        for _ in range(members)
    ]


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, session.run(None, {"x": x}), strict=True))


@pytest.mark.parametrize(("prior", "geometry"), list(PRIOR_GEOMETRY.items()))
def test_each_members_slice_of_the_stack_is_what_its_own_graph_computes(prior, geometry):
    x = np.random.default_rng(1).standard_normal((7, 5))
    for arch in small_architectures([(prior, geometry)]):
        # Both run the same float32 operations on the same numbers; the runtime may group them
        # into other kernels (a batched GEMM), so they agree within two float32 evaluations' bound.
        rtol = float32_rtol(arch)
        for method in CLOSED_FORM:
            graphs = _member_graphs(arch, method, 3, seed=arch.depth + 10 * arch.latent_dim)
            stacked = _run(stack(graphs), x)
            for j, graph in enumerate(graphs):
                own = _run(graph, x)
                scale = np.maximum(1.0, np.max([np.abs(own[p]) for p in PARTS], axis=0))
                for name in OUTPUTS:
                    where = (method, arch, j, name)
                    assert stacked[name].shape == (3, *own[name].shape), where
                    tolerance = rtol * (scale[:, None] if name == "residual" else scale)
                    if name == "reconstruction_error":
                        tolerance = rtol * np.maximum(1.0, np.abs(own[name]))
                    assert np.all(np.abs(stacked[name][j] - own[name]) <= tolerance), where


def test_a_stack_of_one_member_is_its_graph_with_a_member_axis():
    arch = Architecture(input_dim=5, latent_dim=2, hidden=4, depth=2, prior="vamp", components=2)
    (graph,) = _member_graphs(arch, "likelihood", 1, seed=3)
    x = np.random.default_rng(2).standard_normal((4, 5))
    stacked, own = _run(stack([graph]), x), _run(graph, x)
    for name in OUTPUTS:
        np.testing.assert_allclose(stacked[name][0], own[name], rtol=float32_rtol(arch), atol=0, err_msg=name)


def test_the_projection_is_not_stacked():
    arch = Architecture(input_dim=5, latent_dim=2, hidden=4, depth=2, prior="vamp", components=2)
    (graph,) = _member_graphs(arch, LOOP_METHOD, 1, seed=4)
    with pytest.raises(NotStackable, match="Loop node holds a subgraph"):
        stack([graph])


def test_graphs_of_two_architectures_are_not_stacked():
    small = Architecture(input_dim=5, latent_dim=2, hidden=4, depth=2, prior="vamp", components=2)
    wide = Architecture(input_dim=5, latent_dim=2, hidden=6, depth=2, prior="vamp", components=2)
    graphs = [
        _member_graphs(small, "likelihood", 1, seed=5)[0],
        _member_graphs(wide, "likelihood", 1, seed=5)[0],
    ]
    assert structure(graphs[0]) != structure(graphs[1])
    with pytest.raises(NotStackable, match="member 1's graph differs from member 0's"):
        stack(graphs)
    # Two members of one architecture differ in their weights only.
    a, b = _member_graphs(small, "likelihood", 2, seed=6)
    assert structure(a) == structure(b) and a.SerializeToString() != b.SerializeToString()
