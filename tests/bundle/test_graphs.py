"""Graph verification at load: a bundle's ONNX graphs are run only if they are what the exporter
builds from the bundle's own weights. Every tampered bundle below has its file hashes and manifest
version recomputed, as whoever can write a bundle can do, so only the verification can refuse it."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf.message import Message
from onnx import helper, numpy_helper
from safetensors.numpy import load_file, save_file

from app.bundle.format import WEIGHTS, BundleError, load_bundle
from app.bundle.graphs import tolerance_of, verified_graphs
from app.model.methods import METHODS, OUTPUTS

from ..conftest import replace_bundle_file

DEFAULT = Path("models/default")
D = 30  # the shipped model's features


@pytest.fixture()
def bundle(tmp_path) -> Path:
    """A copy of the shipped model to tamper with."""
    target = tmp_path / "bundle"
    shutil.copytree(DEFAULT, target)
    return target


def graph(root: Path, method: str) -> onnx.ModelProto:
    return onnx.load_from_string((root / f"scoring-{method}.onnx").read_bytes())


def save_graph(root: Path, method: str, model: onnx.ModelProto) -> None:
    replace_bundle_file(root, f"scoring-{method}.onnx", model.SerializeToString())


def refused(root: Path, match: str) -> None:
    bundle = load_bundle(root)  # the hashes and the version hold: only the graphs' check refuses it
    with pytest.raises(BundleError, match=match):
        verified_graphs(bundle)


def output_node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if list(node.output) == [name])


def test_the_shipped_model_and_the_tiny_bundle_pass(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    graphs = verified_graphs(bundle)
    assert list(graphs) == list(METHODS)
    for method, data in graphs.items():  # written here, so bit for bit the files
        assert data == bundle.graphs[method].read_bytes()
    # Written on another CPU: a computed constant (Graph.computed) may round differently in its last
    # bit, which is what COMPUTED_RTOL is for; the shipped projected graph's -1/scale^2 of the prior
    # did, on an AMD EPYC without AVX-512. Everything else is the file's, no value further than 1e-12.
    bundle = load_bundle(DEFAULT)
    graphs = verified_graphs(bundle)
    assert list(graphs) == list(METHODS)
    for method, data in graphs.items():
        rebuilt, stored = onnx.load_from_string(data), onnx.load(bundle.graphs[method])
        ours, theirs = list(_tensors(rebuilt)), list(_tensors(stored))
        assert [t.name for t in ours] == [t.name for t in theirs], method
        for a, b in zip(ours, theirs, strict=True):
            values_a, values_b = numpy_helper.to_array(a), numpy_helper.to_array(b)
            assert values_a.dtype == values_b.dtype, (method, a.name)
            np.testing.assert_allclose(values_a, values_b, rtol=1e-12, atol=0, err_msg=f"{method} {a.name}")
            a.ClearField("raw_data"), b.ClearField("raw_data")
        assert rebuilt.SerializeToString() == stored.SerializeToString(), method  # all but the values


def _tensors(message):  # type: ignore[no-untyped-def]
    """Every TensorProto inside an ONNX message (initializers, Constant attributes, Loop bodies)."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in [value] if isinstance(value, Message) else value:
            if isinstance(item, onnx.TensorProto):
                yield item
            else:
                yield from _tensors(item)


def test_another_methods_graph_is_refused(bundle):
    replace_bundle_file(bundle, "scoring-likelihood.onnx", (bundle / "scoring-latent.onnx").read_bytes())
    refused(
        bundle,
        r"scoring-likelihood\.onnx: the 'likelihood' graph is not the graph the exporter builds from the "
        r"bundle: model\.graph\.name is 'anomaly-scores-latent'; "
        r"the exporter writes 'anomaly-scores-likelihood'",
    )


def test_a_constant_graph_is_refused(bundle):
    # Right signature, right ops: every row scores the same, as normal as can be.
    constant = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    nodes = [
        helper.make_node("Mul", ["x", "zero"], ["zeros"]),
        helper.make_node("ReduceSum", ["zeros", "axis"], ["row"], keepdims=0),
        helper.make_node("Cast", ["row"], ["row32"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Add", ["row32", "high"], ["log_prob"]),
        helper.make_node("Cast", ["zeros"], ["residual"], to=onnx.TensorProto.FLOAT),
    ] + [helper.make_node("Identity", ["row32"], [name]) for name in OUTPUTS[1:-1]]
    outputs = [
        helper.make_tensor_value_info(
            n, onnx.TensorProto.FLOAT, ["batch", D] if n == "residual" else ["batch"]
        )
        for n in OUTPUTS
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "anomaly-scores-likelihood",
            [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, ["batch", D])],
            outputs,
            [constant("zero", 0.0), constant("axis", [1]), constant("high", np.float32(1e3))],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="anomaly-scores",
    )
    model.ir_version = 8
    scores = ort.InferenceSession(model.SerializeToString()).run(["log_prob"], {"x": np.ones((3, D))})[0]
    assert scores.tolist() == [1e3] * 3  # it would run
    save_graph(bundle, "likelihood", model)
    refused(
        bundle, r"'likelihood' graph is not the graph the exporter builds from the bundle: model\.graph\."
    )


def test_a_graph_returning_one_row_less_is_refused(bundle):
    model = graph(bundle, "likelihood")
    output_node(model, "log_prob").output[0] = "all_rows"
    model.graph.initializer.extend(
        numpy_helper.from_array(np.array([value]), name) for name, value in (("one", 1), ("end", 2**62))
    )
    model.graph.node.append(helper.make_node("Slice", ["all_rows", "one", "end"], ["log_prob"]))
    scores = ort.InferenceSession(model.SerializeToString()).run(["log_prob"], {"x": np.ones((4, D))})[0]
    assert scores.shape == (3,)  # it would run, and drop the first row
    save_graph(bundle, "likelihood", model)
    refused(
        bundle,
        r"'likelihood' graph is not the graph the exporter builds from the bundle: "
        r"model\.graph\.node\[\d+\]\.output\[0\] is 'all_rows'; the exporter writes 'log_prob'",
    )


def test_a_loop_of_a_trillion_trips_is_refused(bundle):
    model = graph(bundle, "projected")
    loop = next(node for node in model.graph.node if node.op_type == "Loop")
    trips = next(tensor for tensor in model.graph.initializer if tensor.name == loop.input[0])
    trips.CopyFrom(numpy_helper.from_array(np.array(10**12), trips.name))
    save_graph(bundle, "projected", model)
    refused(bundle, r"'projected' graph holds a Loop \(model\.graph\.node\[\d+\]\) of 1000000000000 trips")


def test_a_loop_outside_the_projected_graph_is_refused(bundle):
    model = graph(bundle, "latent")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["again"])],
        "spin",
        [
            helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("again", onnx.TensorProto.BOOL, [])],
    )
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "forever"))
    model.graph.node.insert(0, helper.make_node("Loop", ["", "forever"], [], body=body))
    save_graph(bundle, "latent", model)
    refused(bundle, r"'latent' graph holds a Loop \(model\.graph\.node\[0\]\); the exporter writes one only")


def test_a_changed_weight_is_refused_as_the_unchanged_graphs_no_longer_match(bundle):
    weights = load_file(bundle / WEIGHTS)
    weights["decoder.net.layers.3.bias"][0] += 0.25
    save_file(weights, bundle / WEIGHTS)
    replace_bundle_file(bundle, WEIGHTS, (bundle / WEIGHTS).read_bytes())
    refused(
        bundle,
        r"'likelihood' graph is not the graph the exporter builds from the bundle: "
        r"model\.graph\.initializer\[\d+\] \('c_\d+'\) holds \S+ at \[0\], "
        r"the exporter writes \S+ \(exactly\)",
    )


def test_an_op_the_exporter_never_emits_is_refused(bundle):
    model = graph(bundle, "likelihood")
    output_node(model, "log_prob").output[0] = "clean"
    model.graph.node.extend(
        [
            helper.make_node("RandomUniformLike", ["clean"], ["noise"]),
            helper.make_node("Add", ["clean", "noise"], ["log_prob"]),
        ]
    )
    save_graph(bundle, "likelihood", model)
    refused(
        bundle, r"'likelihood' graph holds a 'RandomUniformLike' op \(model\.graph\.node\[\d+\]\), not one"
    )


def test_a_node_of_a_custom_domain_is_refused(bundle):
    model = graph(bundle, "likelihood")
    output_node(model, "log_prob").domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    save_graph(bundle, "likelihood", model)
    refused(bundle, r"'likelihood' graph imports the operators of domain 'com.example'; only the default")
    model.opset_import.pop()
    save_graph(bundle, "likelihood", model)
    refused(bundle, r"'likelihood' graph holds a node of domain 'com.example' \(model\.graph\.node\[\d+\]\)")


def test_what_is_not_an_onnx_model_is_refused(bundle):
    replace_bundle_file(bundle, "scoring-encoder.onnx", b"not an onnx model")
    refused(bundle, r"'encoder' graph is not an ONNX model")
    model = graph(DEFAULT, "encoder")
    written = len((DEFAULT / "scoring-encoder.onnx").read_bytes())  # the exporter's own graph
    model.doc_string = "x" * 2 * len(model.SerializeToString())
    save_graph(bundle, "encoder", model)
    refused(bundle, rf"'encoder' graph has \d+ bytes; the exporter writes {written} for this bundle")


def test_values_in_an_external_file_are_refused(bundle):
    model = graph(bundle, "encoder")
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.append(onnx.StringStringEntryProto(key="location", value="/etc/passwd"))
    save_graph(bundle, "encoder", model)
    refused(
        bundle, r"'encoder' graph keeps the values of model\.graph\.initializer\[0\] \('c_1'\) in an external"
    )


def test_a_graph_without_a_scoring_signature_is_refused(bundle):
    model = graph(bundle, "likelihood")
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    save_graph(bundle, "likelihood", model)
    refused(bundle, r"takes x as float32 \['batch', 30\]; a scoring graph takes float64 rows \[batch, 30\]")
    model = graph(DEFAULT, "projected")
    model.graph.output[5].type.tensor_type.shape.dim.pop()
    save_graph(bundle, "projected", model)
    replace_bundle_file(bundle, "scoring-likelihood.onnx", (DEFAULT / "scoring-likelihood.onnx").read_bytes())
    refused(
        bundle,
        r"'projected' graph has the output residual as float64 \['batch'\]; .* float64 \['batch', 30\]",
    )


def computed_constant(root: Path, method: str, dtype: type) -> str:
    """The name of a top-level initializer of `dtype` that the exporter computes."""
    model = graph(root, method)
    computed = load_bundle(root).export_graph(method).computed
    return next(
        t.name
        for t in model.graph.initializer
        if t.name in computed and numpy_helper.to_array(t).dtype == dtype
    )


def perturbed(root: Path, method: str, name: str, change) -> None:
    model = graph(DEFAULT, method)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor)), name))
    save_graph(root, method, model)


@pytest.mark.parametrize(("method", "dtype"), [("projected", np.float64), ("likelihood", np.float32)])
def test_a_computed_constant_may_differ_in_its_last_place_and_no_more(bundle, method, dtype):
    name = computed_constant(bundle, method, dtype)
    perturbed(bundle, method, name, lambda v: np.nextafter(v, np.inf, dtype=dtype))
    verified_graphs(load_bundle(bundle))
    perturbed(bundle, method, name, lambda v: (v * (1 + 1e-6)).astype(dtype))
    tolerance = {np.float64: "1e-09", np.float32: "1.19209e-07"}[dtype]  # float32: one ulp of 1
    assert f"{tolerance_of(np.dtype(dtype)):g}" == tolerance
    refused(bundle, rf"\('{name}'\) holds .* \(a computed constant, compared within {tolerance}\)")


def test_a_copied_value_must_agree_bit_for_bit(bundle):
    model = graph(bundle, "projected")
    computed = load_bundle(bundle).export_graph("projected").computed
    name = next(t.name for t in model.graph.initializer if t.name not in computed and t.dims)
    perturbed(bundle, "projected", name, lambda v: np.nextafter(v, np.inf, dtype=v.dtype))
    refused(bundle, rf"\('{name}'\) holds .* \(exactly\)")
