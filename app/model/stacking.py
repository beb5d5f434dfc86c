"""Several networks of one architecture as one graph: each member's scoring graph, stacked along a
new leading axis (issue 16: an ensemble's members in batched matmuls, not side by side).

Members of one architecture have graphs that differ in their weights only: the same nodes, names
and shapes (app.model.onnx_export builds them by one recipe). So the stacked graph is the first
member's, rewritten:
  - a constant whose values differ between members becomes their stack, (M, ...), shaped so that it
    broadcasts against the tensor it meets as the member's own did against the same tensor with a
    batch of members in front: (M, 1, ..., 1, *shape), as many ones as that tensor has more axes;
    a constant all members share stays as it is and broadcasts unchanged;
  - a tensor computed from a stacked one carries the member axis first, so every axis an op names
    (attribute or axes input) moves one place right when it counts from the front, and stays
    when it counts from the back;
  - a matmul of an (M, B, k, n) tensor by a stacked weight (M, n, p) is reshaped to (M, B k, n) and
    back around it, so that each member's product stays one GEMM, as it is in the member's graph,
    rather than B products of k rows.
Inputs: x (B, d) as the members' graphs take it. Outputs: each member output with the member axis
first: (M, B), and (M, B, d) for residual. Each member's values are its own graph's up to float
rounding: the same operations on the same numbers, grouped by the runtime into other kernels.

Graphs with a Loop (the projection) are not stacked: its rows leave the loop as they converge, each
member's at its own step. NotStackable names what cannot be stacked; the caller keeps such
members' graphs side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx.helper as h
from numpy.typing import NDArray
from onnx import numpy_helper

# Ops that see no axis: elementwise, broadcasting, or MatMul (whose axes are the last two).
ELEMENTWISE = frozenset(
    {
        "Abs", "Add", "And", "Cast", "Div", "Exp", "Greater", "GreaterOrEqual", "Identity", "Less",
        "LessOrEqual", "Log", "MatMul", "Max", "Mul", "Neg", "Not", "Or", "Pow", "Relu", "Sigmoid",
        "Softplus", "Sqrt", "Sub", "Tanh", "Where",
    }
)  # fmt: skip
# Ops that name axes: in an attribute (Concat, Split, Softmax, Gather, ReduceLogSumExp, ReduceMax in
# opset 17) or in an input (its position).
AXIS_ATTRIBUTE = {"Concat": "axis", "Split": "axis", "Softmax": "axis", "Gather": "axis"}
AXES_ATTRIBUTE = frozenset({"ReduceLogSumExp", "ReduceMax"})
AXES_INPUT = {"ReduceSum": 1, "Unsqueeze": 1, "Squeeze": 1, "Slice": 3}
# Attribute defaults where the attribute may be left out (opset 17).
DEFAULT_AXIS = {"Concat": 0, "Split": 0, "Softmax": -1, "Gather": 0}  # Concat's axis is required


class NotStackable(ValueError):
    """The graphs cannot be stacked; the message says why."""


def structure(model: onnx.ModelProto) -> bytes:
    """What must be equal for two graphs to stack: everything but the initializers' values."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        dims, dtype, name = list(tensor.dims), tensor.data_type, tensor.name
        tensor.Clear()
        tensor.name, tensor.data_type = name, dtype
        tensor.dims.extend(dims)
    return copy.SerializeToString()


def stack(models: Sequence[onnx.ModelProto]) -> onnx.ModelProto:
    """The members' graphs `models` (one structure, see the module's docstring) as one graph whose
    outputs have the member axis first."""
    if not models:
        raise NotStackable("no graphs to stack")
    first = models[0]
    key = structure(first)
    for i, model in enumerate(models[1:], 1):
        if structure(model) != key:
            raise NotStackable(f"member {i}'s graph differs from member 0's in more than its weights")
    return _Stacker(first, [model.graph.initializer for model in models]).model()


def _int_axes(values: NDArray[np.int64]) -> NDArray[np.int64]:
    return np.where(values >= 0, values + 1, values).astype(np.int64)


class _Stacker:
    def __init__(self, first: onnx.ModelProto, initializers: Sequence[Sequence[onnx.TensorProto]]) -> None:
        self.first = first
        self.members = len(initializers)
        try:
            graph = onnx.shape_inference.infer_shapes(first, strict_mode=True).graph
        except onnx.shape_inference.InferenceError as e:
            raise NotStackable(f"the member graph's shapes cannot be inferred: {e}") from e
        self.ranks: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        for value in (*graph.input, *graph.value_info, *graph.output):
            dims = value.type.tensor_type.shape.dim
            self.ranks[value.name] = len(dims)
            self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        values = [{t.name: numpy_helper.to_array(t) for t in tensors} for tensors in initializers]
        self.shared: dict[str, NDArray[np.generic]] = {}
        self.per_member: dict[str, NDArray[np.generic]] = {}  # (M, *shape)
        for name, value in values[0].items():
            others = [v[name] for v in values[1:]]
            if all(np.array_equal(value, o) and value.dtype == o.dtype for o in others):
                self.shared[name] = value
            else:
                self.per_member[name] = np.stack([value, *others])
            self.ranks[name] = value.ndim
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, NDArray[np.generic]] = dict(self.shared)
        self.stacked: set[str] = set()
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"stack/{hint}_{self.count}"

    def constant(self, value: NDArray[np.generic], hint: str) -> str:
        name = self.name(hint)
        self.constants[name] = value
        return name

    def member_constant(self, name: str, rank: int) -> str:
        """The stacked constant `name`, broadcasting against a tensor of `rank` axes per member."""
        key = f"{name}@{rank}"
        if key not in self.constants:
            value = self.per_member[name]
            ones = max(rank - (value.ndim - 1), 0)
            self.constants[key] = value.reshape(value.shape[:1] + (1,) * ones + value.shape[1:])
        return key

    def model(self) -> onnx.ModelProto:
        graph = self.first.graph
        for node in graph.node:
            self.rewrite(node)
        writers = {out: node for node in self.nodes for out in node.output}
        outputs = []
        for value in graph.output:
            name, elem = value.name, value.type.tensor_type.elem_type
            shape = self.shapes[name]
            if name not in self.stacked:
                # A value no member's weights touch (latent's log volume, a multiple of 0): every
                # member's, by adding a zero of the member axis.
                internal, writer = self.name("shared"), writers[name]
                writer.output[list(writer.output).index(name)] = internal
                dtype = h.tensor_dtype_to_np_dtype(elem)
                zero = self.constant(np.zeros((self.members,) + (1,) * len(shape), dtype=dtype), "zero")
                self.nodes.append(h.make_node("Add", [internal, zero], [name]))
            dims = ["members", "batch", *shape[1:]]
            outputs.append(h.make_tensor_value_info(name, elem, dims))
        used = {name for node in self.nodes for name in node.input}
        constants = [
            numpy_helper.from_array(np.ascontiguousarray(v), n)
            for n, v in self.constants.items()
            if n in used
        ]
        stacked = h.make_graph(self.nodes, graph.name, list(graph.input), outputs, constants)
        model = h.make_model(stacked, opset_imports=self.first.opset_import, ir_version=self.first.ir_version)
        onnx.checker.check_model(model)
        return model

    def rewrite(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if any(a.HasField("g") or a.graphs for a in node.attribute):
            raise NotStackable(f"a {op} node holds a subgraph; its iterations differ per member")
        out_rank = self.ranks.get(node.output[0])
        inputs = list(node.input)
        for i, name in enumerate(inputs):
            if name in self.per_member:
                # inputs of broadcasting ops meet tensors of the output's rank; others (an
                # Unsqueeze's or Transpose's data) are the stack itself, their axes moved below
                rank = out_rank if op in ELEMENTWISE else self.ranks[name]
                if rank is None:
                    raise NotStackable(f"the rank of {node.output[0]!r} ({op}) is unknown")
                inputs[i] = self.member_constant(name, rank)
                self.stacked.add(inputs[i])
        is_stacked = any(name in self.stacked for name in inputs)
        attributes = {a.name: h.get_attribute_value(a) for a in node.attribute}
        if not is_stacked:
            self.nodes.append(h.make_node(op, inputs, list(node.output), name=node.name, **attributes))
            return
        if op == "MatMul" and self.matmul(node, inputs):
            return
        self.move_axes(node, inputs, attributes)
        self.nodes.append(h.make_node(op, inputs, list(node.output), name=node.name, **attributes))
        self.stacked.update(node.output)

    def move_axes(self, node: onnx.NodeProto, inputs: list[str], attributes: dict[str, Any]) -> None:
        """The axes `node` names, in `inputs` or `attributes` (both rewritten in place), for tensors
        with the member axis in front."""
        op = node.op_type
        if op in AXIS_ATTRIBUTE:
            if op in ("Gather", "Split") and inputs[0] not in self.stacked:
                raise NotStackable(f"a {op} of a shared tensor by a member's indices")
            if op == "Concat" and not all(name in self.stacked for name in inputs):
                raise NotStackable("a Concat of shared and member tensors")
            axis = attributes.get(AXIS_ATTRIBUTE[op], DEFAULT_AXIS[op])
            attributes[AXIS_ATTRIBUTE[op]] = axis + 1 if axis >= 0 else axis
        elif op in AXES_ATTRIBUTE:
            if "axes" not in attributes:
                raise NotStackable(f"a {op} over every axis")
            attributes["axes"] = [a + 1 if a >= 0 else a for a in attributes["axes"]]
        elif op in AXES_INPUT:
            position = AXES_INPUT[op]
            if len(inputs) <= position or inputs[position] not in self.shared:
                raise NotStackable(f"a {op} whose axes are not a constant input")
            inputs[position] = self.constant(_int_axes(self.shared[inputs[position]]), "axes")
        elif op == "Transpose":
            rank = self.ranks[node.input[0]]
            perm = attributes.get("perm", list(reversed(range(rank))))
            attributes["perm"] = [0] + [p + 1 for p in perm]
        elif op not in ELEMENTWISE:
            raise NotStackable(f"no rule stacks a {op} node")

    def matmul(self, node: onnx.NodeProto, inputs: list[str]) -> bool:
        """A (M, B, k, n) tensor times a member's weight (n, p): one GEMM per member, as in the
        member's graph, through (M, B k, n). False where the plain broadcast applies."""
        left, right = node.input
        weight = self.per_member.get(right)
        if weight is None or weight.ndim != 3 or left not in self.stacked or self.ranks[left] < 3:
            return False
        static = self.shapes[node.output[0]][1:]
        if any(d is None for d in static):
            return False
        flat, product = self.name("flat"), self.name("product")
        into = self.constant(np.array([0, -1, weight.shape[1]], dtype=np.int64), "shape")
        back = self.constant(np.array([0, -1, *static], dtype=np.int64), "shape")
        self.nodes.append(h.make_node("Reshape", [inputs[0], into], [flat]))
        self.nodes.append(h.make_node("MatMul", [flat, self.member_constant(right, 2)], [product]))
        self.nodes.append(h.make_node("Reshape", [product, back], list(node.output)))
        self.stacked.update(node.output)
        return True
