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


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxScorer:
    backend = "onnx"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        graphs = bundle.manifest.get("onnx", {})
        if not graphs:
            raise BundleError(
                f"{bundle.path}: the bundle has no ONNX graphs; re-save it or use the torch backend"
            )
        options = _session_options()
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
