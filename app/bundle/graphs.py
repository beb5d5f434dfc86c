"""A bundle's ONNX graphs are checked, not trusted: the service runs only what the exporter writes
from the bundle's own weights.

A graph file's SHA-256 in the manifest proves only that the file is the one the manifest names, and
whoever can write a bundle can write both. So each graph is checked at load and refused, with a
BundleError naming the method, the file and the first problem, unless:

  a. it parses as an ONNX model, keeps no tensor in an external file, and is at most MAX_GROWTH
     times the size of the graph the exporter builds for the bundle;
  b. every node, inside subgraphs too, is of the default domain and of an op type the exporter
     emits (app.model.onnx_export.GRAPH_OPS); no local functions; a Loop only at the top of the
     projected graph, with the constant trip count PROJECTION_STEPS;
  c. it has a scoring graph's signature: one input x, float64 (batch, d); the outputs OUTPUTS in
     that order, float32 (float64 for FLOAT64_METHODS), (batch,) each and (batch, d) for residual;
  d. it is, field by field, the graph app.model.onnx_export builds from the bundle's weights,
     scaler and noise: nodes, attributes, wiring, names, opset, signature, initializer names,
     dtypes and shapes, and initializer values bit for bit but for the constants the exporter
     computes (Graph.computed), which must agree within COMPUTED_RTOL.

d alone would suffice; a to c are checks of the file alone, which name the telling problems (an
unknown op, an unbounded loop, a wrong signature) before any comparison. onnxruntime is given the
rebuilt graph's bytes, which d found equal to the file's, so nothing in the file that this onnx
release cannot read (unknown fields) reaches the runtime.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message
from numpy.typing import NDArray
from onnx import numpy_helper

from app.bundle import ensemble
from app.bundle.format import Bundle, BundleError, EnsembleBundle
from app.model import stacking
from app.model.graph import Graph
from app.model.methods import FLOAT64_METHODS, OUTPUTS
from app.model.noise import whitening_factors
from app.model.onnx_export import GRAPH_OPS, LOOP_METHOD, ExportedGraph
from app.model.spec import PROJECTION_STEPS

# A graph equal to the rebuilt one serialises to about its size (another onnx release may encode a
# tensor's values differently, not more of them): a larger file is refused before it is parsed.
MAX_GROWTH = 2
# The computed constants are a few float64 operations around one logarithm, power or Bessel function
# of the bundle's values (log 2pi, log sigma2, log K, the mixture's log scales and inverse squared
# scales, the vMF normaliser). IEEE arithmetic rounds the same everywhere, and libm's log and pow and
# scipy's ive are within a few ulps (2.2e-16) of the truth, so two platforms or library versions
# agree to ~1e-14 of max(1, |value|), a sum of K logarithms cancelling to 0 included. Graphs written
# before this build computed the vMF normaliser by torch's series and Debye expansion, accurate to
# ~1e-9 relative (up to 3e-11 measured): 1e-9 accepts them. It is still 60 times below a float32
# score's rounding (6e-8), so no constant within it can change an answer that matters (the tests
# refuse 1e-6). A float32 constant may round to the neighbouring float32: one float32 ulp there.
COMPUTED_RTOL = 1e-9
DEFAULT_DOMAINS = ("", "ai.onnx")
TENSOR_VALUES = (
    "raw_data",
    "float_data",
    "double_data",
    "int32_data",
    "int64_data",
    "uint64_data",
    "string_data",
)
DTYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}
# A graph's name and signature are compared before its nodes: the most telling first difference.
COMPARED_FIRST = ("name", "input", "output")


def verified_graphs(bundle: Bundle) -> dict[str, bytes]:
    """The graph of each method of `bundle.graphs` as onnxruntime should load it, once the bundle's
    file is shown to be what the exporter builds from the bundle (a to d above); BundleError if not."""
    return {method: _verified(bundle, method, path) for method, path in bundle.graphs.items()}


# Part p's outputs in a merged graph: MEMBER_OUTPUT.format(index=p, name=output).
MEMBER_OUTPUT = "m{index}/{name}"


@dataclass(frozen=True)
class MergedGraph:
    """One method's graph that scores every member of a bundle in one call. outputs: the graph's,
    OUTPUTS for one model, app.bundle.ensemble.COMBINED_OUTPUTS (the members combined) for an
    ensemble; stack: the most members in one stack (1: none stacked), whose tensors grow with it."""

    data: bytes
    outputs: tuple[str, ...]
    stack: int = 1


def merged_graphs(bundle: Bundle) -> dict[str, MergedGraph]:
    """Per method, one graph that scores every member of an ensemble in one call and combines their
    scores (app.bundle.ensemble.emit). Members of one graph structure (one architecture) are stacked
    along a leading axis (app.model.stacking), so that a node runs once for all of them rather than
    once per member: a single row's answer costs a few node launches per architecture, not per
    member. The stacks, and any member whose graph cannot be stacked (the projection's Loop), stand
    side by side in the graph, their names prefixed "m<p>/", all reading the one input x. A plain
    bundle's graphs are its verified_graphs."""
    if not isinstance(bundle, EnsembleBundle):
        return {method: MergedGraph(data, OUTPUTS) for method, data in verified_graphs(bundle).items()}
    # The loader has checked that every member has graphs of the same methods.
    verified = [verified_graphs(member) for member in bundle.members]
    return {method: _merged(bundle, [g[method] for g in verified], method) for method in verified[0]}


def _merged(bundle: EnsembleBundle, graphs: list[bytes], method: str) -> MergedGraph:
    models = []
    for data in graphs:
        model = onnx.ModelProto()
        model.ParseFromString(data)
        models.append(model)
    groups: dict[bytes, list[int]] = {}
    for i, model in enumerate(models):
        groups.setdefault(stacking.structure(model), []).append(i)
    parts: list[onnx.ModelProto] = []
    where: dict[int, tuple[int, int | None]] = {}
    order: list[int] = []  # the members in the order of the parts' outputs
    for members in groups.values():
        order += members
        try:
            parts.append(stacking.stack([models[i] for i in members]))
            where.update({i: (len(parts) - 1, j) for j, i in enumerate(members)})
        except stacking.NotStackable:
            for i in members:
                parts.append(models[i])
                where[i] = (len(parts) - 1, None)
    for p, part in enumerate(parts):
        _prefix(part.graph, MEMBER_OUTPUT.format(index=p, name=""), keep="x")
    combined = Graph()
    stacks = {part for part, index in where.values() if index is not None}
    stacked = {name: _member_major(combined, len(parts), stacks, name, order) for name in OUTPUTS}
    outputs = ensemble.emit(
        combined,
        bundle.combination,
        method,
        stacked,
        [member.calibration for member in bundle.members],
        [whitening_factors(member.relative_variance) for member in bundle.members],
    )
    for name, tensor in outputs.items():  # the combination's results under their own names
        combined.nodes.append(onnx.helper.make_node("Identity", [tensor], [name]))
    first = parts[0]
    graph = onnx.helper.make_graph(
        [node for part in parts for node in part.graph.node] + combined.nodes,
        f"ensemble-{method}",
        list(first.graph.input),
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.DOUBLE, None) for name in outputs],
        [tensor for part in parts for tensor in part.graph.initializer] + combined.initializers,
    )
    merged = onnx.helper.make_model(graph, opset_imports=first.opset_import, ir_version=first.ir_version)
    stack = max((index + 1 for _, index in where.values() if index is not None), default=1)
    return MergedGraph(merged.SerializeToString(), tuple(outputs), stack)


def _member_major(g: Graph, parts: int, stacks: set[int], name: str, order: list[int]) -> str:
    """Output `name` of every member, (M, ...) in member order: the parts' outputs one after another
    (a stack's (members, ...); a lone member's (...) given a leading axis), then put in member order
    where the stacks grouped members out of it (`order`: the members in the parts' order)."""
    pieces = [MEMBER_OUTPUT.format(index=p, name=name) for p in range(parts)]
    pieces = [piece if p in stacks else g.unsqueeze(piece, 0) for p, piece in enumerate(pieces)]
    joined = g.op("Concat", *pieces, axis=0) if len(pieces) > 1 else pieces[0]
    if order == sorted(order):
        return joined
    position = np.argsort(order)  # member i's position in the parts' order
    return g.op("Gather", joined, g.const(position, np.int64), axis=0)


def _prefix(graph: onnx.GraphProto, prefix: str, keep: str) -> None:
    """Prefix every name in `graph` and its subgraphs but `keep`, in place. Unlike
    onnx.compose.add_prefix, this renames a subgraph's references to names of the graph around it
    (the projected graph's Loop body reads the outer weights), so that every reference resolves."""

    def name(value: str) -> str:
        return value if value in ("", keep) else prefix + value

    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        for value in values:
            value.name = name(value.name)
    for node in graph.node:
        node.name = name(node.name)
        node.input[:] = [name(v) for v in node.input]
        node.output[:] = [name(v) for v in node.output]
        for attribute in node.attribute:
            for sub in (attribute.g,) if attribute.HasField("g") else attribute.graphs:
                _prefix(sub, prefix, keep)


def _verified(bundle: Bundle, method: str, path: Path) -> bytes:
    expected = bundle.export_graph(method)
    serialized = expected.model.SerializeToString()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: the {method!r} graph cannot be read: {e}") from e
    problem = _problem(data, expected, len(serialized), method, bundle.architecture.input_dim)
    if problem is not None:
        raise BundleError(f"{path}: the {method!r} graph {problem}")
    return serialized


def _problem(data: bytes, expected: ExportedGraph, size: int, method: str, d: int) -> str | None:
    """The first thing wrong with the graph file `data`, or None."""
    if len(data) > MAX_GROWTH * size:
        return f"has {len(data)} bytes; the exporter writes {size} for this bundle"
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as e:
        return f"is not an ONNX model: {e}"
    for check in (_external_data, _ops, _signature):
        problem = check(model, method, d)
        if problem is not None:
            return problem
    difference = _difference(model, expected.model, "model", expected.computed)
    if difference is not None:
        return f"is not the graph the exporter builds from the bundle: {difference}"
    return None


def _messages(message: Message, path: str) -> Iterator[tuple[str, Message]]:
    """Every message inside `message`, itself included, with its path."""
    yield path, message
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if isinstance(value, Message):
            yield from _messages(value, f"{path}.{field.name}")
        else:
            for i, item in enumerate(value):
                yield from _messages(item, f"{path}.{field.name}[{i}]")


def _external_data(model: onnx.ModelProto, method: str, d: int) -> str | None:
    for where, tensor in _messages(model, "model"):
        if isinstance(tensor, onnx.TensorProto) and (
            tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data
        ):
            return f"keeps the values of {where} ({tensor.name!r}) in an external file"
    return None


def _ops(model: onnx.ModelProto, method: str, d: int) -> str | None:
    if model.functions:
        return f"defines functions ({model.functions[0].name!r}); the exporter writes none"
    for opset in model.opset_import:
        if opset.domain not in DEFAULT_DOMAINS:
            return (
                f"imports the operators of domain {opset.domain!r}; only the default ONNX domain is allowed"
            )
    for where, node in _messages(model, "model"):
        if not isinstance(node, onnx.NodeProto):
            continue
        if node.domain not in DEFAULT_DOMAINS:
            return (
                f"holds a node of domain {node.domain!r} ({where}); only the default ONNX domain is allowed"
            )
        if node.op_type not in GRAPH_OPS:
            return f"holds a {node.op_type!r} op ({where}), not one the exporter emits"
        if node.op_type == "Loop":
            problem = _loop(model, where, node, method)
            if problem is not None:
                return problem
    return None


def _loop(model: onnx.ModelProto, where: str, node: onnx.NodeProto, method: str) -> str | None:
    """The exporter's one Loop is the projection's: at the top of its graph, PROJECTION_STEPS trips."""
    if method != LOOP_METHOD or not where.startswith("model.graph.node[") or where.count(".node[") > 1:
        return f"holds a Loop ({where}); the exporter writes one only at the top of the {LOOP_METHOD!r} graph"
    trip = node.input[0] if node.input else ""
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    if trip not in constants:
        return f"holds a Loop ({where}) whose trip count {trip!r} is not a constant"
    try:
        count = numpy_helper.to_array(constants[trip])
    except (ValueError, TypeError) as e:
        return f"holds a Loop ({where}) whose trip count cannot be read: {e}"
    if count.dtype != np.int64 or count.shape != () or int(count) != PROJECTION_STEPS:
        steps = PROJECTION_STEPS
        return f"holds a Loop ({where}) of {count.tolist()} trips; the projection takes at most {steps}"
    return None


def _described(value: onnx.ValueInfoProto) -> tuple[str, list[str | int]]:
    """A graph input's or output's element type and dimensions (symbol or size; '?' if unknown)."""
    if not value.type.HasField("tensor_type"):
        return "not a tensor", []
    tensor = value.type.tensor_type
    dims: list[str | int] = [
        dim.dim_param if dim.HasField("dim_param") else dim.dim_value if dim.HasField("dim_value") else "?"
        for dim in tensor.shape.dim
    ]
    return DTYPE_NAMES.get(tensor.elem_type, f"type {tensor.elem_type}"), dims


def _signature(model: onnx.ModelProto, method: str, d: int) -> str | None:
    graph = model.graph
    names = [value.name for value in graph.input]
    if names != ["x"]:
        return f"takes the inputs {names}; a scoring graph takes one, 'x'"
    dtype, dims = _described(graph.input[0])
    batch = dims[0] if dims else None
    if dtype != "float64" or len(dims) != 2 or not isinstance(batch, str) or batch == "?" or dims[1] != d:
        return f"takes x as {dtype} {dims}; a scoring graph takes float64 rows [batch, {d}]"
    names = [value.name for value in graph.output]
    if names != list(OUTPUTS):
        return f"has the outputs {names}; a scoring graph has {list(OUTPUTS)}"
    wanted_dtype = "float64" if method in FLOAT64_METHODS else "float32"
    for value in graph.output:
        wanted = [batch, d] if value.name == "residual" else [batch]
        if _described(value) != (wanted_dtype, wanted):
            dtype, dims = _described(value)
            return (
                f"has the output {value.name} as {dtype} {dims}; a scoring graph has {wanted_dtype} {wanted}"
            )
    return None


def _difference(stored: Message, expected: Message, path: str, computed: frozenset[str]) -> str | None:
    """Where the message `stored` first differs from `expected`."""
    if isinstance(expected, onnx.TensorProto):
        assert isinstance(stored, onnx.TensorProto)
        return _tensor_difference(stored, expected, path, computed)
    return _fields_difference(stored, expected, path, computed)


def _fields_difference(
    stored: Message, expected: Message, path: str, computed: frozenset[str], skip: tuple[str, ...] = ()
) -> str | None:
    """_difference field by field, in field order, but for the fields `skip`."""
    ours = {field.name: value for field, value in expected.ListFields() if field.name not in skip}
    theirs = {field.name: value for field, value in stored.ListFields() if field.name not in skip}
    fields = expected.DESCRIPTOR.fields_by_name
    for name in sorted(
        ours.keys() | theirs.keys(), key=lambda n: (n not in COMPARED_FIRST, fields[n].number)
    ):
        where = f"{path}.{name}"
        if name not in theirs:
            return f"{where} is missing; the exporter writes {_shown(ours[name])}"
        if name not in ours:
            return f"{where} is {_shown(theirs[name])}; the exporter writes none"
        difference = _value_difference(theirs[name], ours[name], where, computed)
        if difference is not None:
            return difference
    return None


def _value_difference(stored: Any, expected: Any, where: str, computed: frozenset[str]) -> str | None:
    if isinstance(expected, Message):
        return _difference(stored, expected, where, computed)
    if isinstance(expected, str | bytes | int | float):  # a scalar field (enums are ints)
        return (
            None
            if stored == expected
            else f"{where} is {_shown(stored)}; the exporter writes {_shown(expected)}"
        )
    for i, (item, wanted) in enumerate(zip(stored, expected, strict=False)):  # a repeated field
        difference = _value_difference(item, wanted, f"{where}[{i}]", computed)
        if difference is not None:
            return difference
    if len(stored) != len(expected):
        return f"{where} has {len(stored)} entries; the exporter writes {len(expected)}"
    return None


def _tensor_difference(
    stored: onnx.TensorProto, expected: onnx.TensorProto, path: str, computed: frozenset[str]
) -> str | None:
    """Name, dtype, shape and the rest exactly; values bit for bit, or within COMPUTED_RTOL for a
    computed constant, whichever encoding the file chose for them."""
    where = f"{path} ({expected.name!r})"
    difference = _fields_difference(stored, expected, path, computed, skip=TENSOR_VALUES)
    if difference is not None:
        return difference
    try:
        theirs = numpy_helper.to_array(stored)
    except (ValueError, TypeError) as e:  # values that do not fill the shape
        return f"{where} cannot be read: {e}"
    ours = numpy_helper.to_array(expected)
    tolerance = tolerance_of(ours.dtype) if expected.name in computed else 0.0
    if ours.dtype.kind == "f":
        differs = theirs.view(f"u{ours.itemsize}") != ours.view(f"u{ours.itemsize}")
        if tolerance:
            differs &= ~_close(theirs, ours, tolerance)
    else:
        differs = theirs != ours
    if not differs.any():
        return None
    index = tuple(int(i) for i in np.argwhere(differs)[0])
    kind = f"a computed constant, compared within {tolerance:g}" if tolerance else "exactly"
    found, written = theirs[index].item(), ours[index].item()
    return f"{where} holds {found!r} at {list(index)}, the exporter writes {written!r} ({kind})"


def tolerance_of(dtype: np.dtype[Any]) -> float:
    """A computed constant's tolerance relative to max(1, |value|): COMPUTED_RTOL, or one ulp of float32."""
    return max(COMPUTED_RTOL, float(np.finfo(dtype).eps))


def _close(
    stored: NDArray[np.floating], expected: NDArray[np.floating], tolerance: float
) -> NDArray[np.bool_]:
    """Elementwise: within `tolerance` of max(1, |value|)."""
    a, b = stored.astype(np.float64), expected.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: not close, unless bit for bit equal
        return np.abs(a - b) <= tolerance * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))


def _shown(value: Any) -> str:
    if isinstance(value, Message):
        return f"a {type(value).__name__}"
    if isinstance(value, str | bytes | int | float):
        text = repr(value)
        return text if len(text) <= 80 else f"{text[:77]}..."
    return f"{len(value)} entries"
