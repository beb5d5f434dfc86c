"""create_scorer: a scoring backend by name. The backends import lazily, so the onnx path (the
CPU default) never loads PyTorch."""

from __future__ import annotations

from app.bundle.format import Bundle
from app.engine.scorer import Scorer

BACKENDS = ("onnx", "torch")


def create_scorer(
    bundle: Bundle, backend: str = "onnx", device: str = "cpu", threads: int = 0, dtype: str = "float32"
) -> Scorer:
    """onnx: onnxruntime on CPU with `threads` per call (0: all cores); torch: PyTorch on `device`
    (cpu, cuda, or auto = cuda when present). dtype float64 (torch only) scores every method in
    float64, for reference computations; float32 is the product's precision."""
    if backend == "onnx":
        if dtype != "float32":
            raise ValueError(f"dtype {dtype!r} needs the torch backend: the onnx graphs are the product's")
        from app.engine.onnx_backend import OnnxScorer

        return OnnxScorer(bundle, threads)
    if backend == "torch":
        from app.engine.torch_backend import TorchScorer

        return TorchScorer(bundle, device, dtype)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
