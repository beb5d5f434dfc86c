"""The onnxruntime backend: the bundle's fused ONNX graphs on CPU, without PyTorch.

Bundles written before a method had a graph delegate it to the torch backend when PyTorch is
installed, and refuse it with a clear error otherwise.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.bundle import Bundle, BundleError
from app.scorer import ScoreOutput, Scorer, assemble, check_method


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Waiting threads sleep instead of spinning: in a server they would burn the cores that the
        # event loop and the other scoring calls need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxScorer:
    """threads: intra-op threads per call; 0 lets onnxruntime use every core (one caller at a time)."""

    backend = "onnx"

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        self.bundle = bundle
        graphs = bundle.manifest.get("onnx", {})
        if not graphs:
            raise BundleError(
                f"{bundle.path}: the bundle has no ONNX graphs; re-save it or use the torch backend"
            )
        options = _session_options(threads)
        self.sessions = {
            method: ort.InferenceSession(
                (bundle.path / file).read_bytes(), options, providers=["CPUExecutionProvider"]
            )
            for method, file in graphs.items()
        }
        self.native_methods = tuple(self.sessions)
        self.outputs = [o.name for o in next(iter(self.sessions.values())).get_outputs()]
        self._fallback: Scorer | None = None

    def _torch(self) -> Scorer:
        if self._fallback is None:
            try:
                from app.torch_scorer import TorchScorer
            except ImportError as e:
                raise ValueError(
                    "the 'projected' method runs on the torch backend, and PyTorch is not installed here"
                ) from e
            self._fallback = TorchScorer(self.bundle, "cpu")
        return self._fallback

    def score(
        self,
        x_raw: NDArray[np.floating],
        method: str | None = None,
        fpr: float | None = None,
        explain: bool = False,
    ) -> ScoreOutput:
        method = check_method(method, self.bundle)
        session = self.sessions.get(method)
        if session is None:
            return self._torch().score(x_raw, method, fpr, explain)
        results = session.run(None, {"x": np.ascontiguousarray(x_raw, dtype=np.float32)})
        return assemble(self.bundle, method, fpr, dict(zip(self.outputs, results, strict=True)), explain)
