"""A minimal ONNX graph builder, the one every concept of app.model emits its nodes with.

Torch-free: numpy arrays in, onnx.helper nodes out. Each method adds one node and returns its
output's name, so an emitter reads like the torch code it mirrors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

OPSET = 17
F32, F64 = 1, 11  # onnx.TensorProto.FLOAT, DOUBLE
BOOL, INT64 = 9, 7


def onnx_type(dtype: type) -> int:
    return F64 if dtype is np.float64 else F32


class Graph:
    """A minimal builder: each method adds one node and returns its output's name.

    A Loop body is a Graph with a parent: it shares the parent's name counter, and its weights
    are initializers of the parent, read from the outer scope.
    """

    def __init__(self, parent: Graph | None = None) -> None:
        import onnx.helper as h

        self.h = h
        self.parent = parent
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0
        # id of a weight array -> (the array, its initializer); holding the array keeps its id unique
        self.weights: dict[int, tuple[NDArray[Any], str]] = {}
        self.computed_names: set[str] = set()  # see computed(); the root graph's holds the Loop body's

    def name(self, hint: str) -> str:
        if self.parent is not None:
            return self.parent.name(hint)
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: NDArray[Any] | float, dtype: type = np.float32) -> str:
        from onnx import numpy_helper

        name = self.name("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def computed(self, value: NDArray[Any] | float, dtype: type = np.float32) -> str:
        """A constant the exporter computes with a logarithm, a power or a Bessel function, which
        another CPU or library version may round differently in the last place: app.bundle.graphs
        compares these within a tolerance, every other constant exactly."""
        name = self.const(value, dtype)
        root = self
        while root.parent is not None:
            root = root.parent
        root.computed_names.add(name)
        return name

    def weight(self, value: NDArray[Any]) -> str:
        """A constant used many times (unrolled or looped): one initializer per array object."""
        if self.parent is not None:
            return self.parent.weight(value)
        if id(value) not in self.weights:
            self.weights[id(value)] = (value, self.const(value, value.dtype.type))
        return self.weights[id(value)][1]

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(self.h.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], n_out: int, **attrs: Any) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, **attrs))
        return outs

    # Shorthands for the operations the scores need.
    def add(self, a: str, b: str) -> str:
        return self.op("Add", a, b)

    def sub(self, a: str, b: str) -> str:
        return self.op("Sub", a, b)

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", a, b)

    def div(self, a: str, b: str) -> str:
        return self.op("Div", a, b)

    def matmul(self, a: str, b: str) -> str:
        return self.op("MatMul", a, b)

    def sum(self, x: str, axis: int, keepdims: bool = False) -> str:
        return self.op("ReduceSum", x, self.const(np.array([axis]), np.int64), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", x, self.const(np.array([axis]), np.int64))

    def squeeze(self, x: str, axis: int) -> str:
        return self.op("Squeeze", x, self.const(np.array([axis]), np.int64))

    def transpose(self, x: str) -> str:
        """Swap the last two axes of a (B, p, q) tensor."""
        return self.op("Transpose", x, perm=[0, 2, 1])

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def where(self, condition: str, a: str, b: str) -> str:
        return self.op("Where", condition, a, b)

    def norm(self, v: str, keepdims: bool = False) -> str:
        """Euclidean norm over the last axis of (B, n)."""
        return self.op("Sqrt", self.sum(self.mul(v, v), 1, keepdims=keepdims))
