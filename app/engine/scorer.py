"""Scoring raw rows with a bundle: the backends' common output, thresholds, p-values and choice.

Torch-free: the onnx backend (the CPU default) never imports PyTorch, so a CPU deployment can
leave it out. Outputs are plain numpy arrays in input row order, shared by the command line and
the service.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from app.bundle.format import METHODS, Bundle, Threshold

BACKENDS = ("onnx", "torch")


@dataclass(frozen=True)
class ScoreOutput:
    method: str
    threshold: Threshold
    score: NDArray[np.float64]  # -log_likelihood: higher = more anomalous
    log_likelihood: NDArray[np.float64]
    log_prior: NDArray[np.float64]
    log_volume: NDArray[np.float64]
    log_residual: NDArray[np.float64]
    reconstruction_error: NDArray[np.float64]  # |x - x'|^2 in standardised units
    p_value: NDArray[np.float64]
    is_anomaly: NDArray[np.bool_]
    residual_share: NDArray[np.float64] | None  # (n, d): each feature's share of the squared residual

    def rows(self, start: int, stop: int) -> ScoreOutput:
        """The same output restricted to rows start..stop-1 (for a coalesced batch's requests)."""
        part = slice(start, stop)
        return replace(
            self,
            score=self.score[part],
            log_likelihood=self.log_likelihood[part],
            log_prior=self.log_prior[part],
            log_volume=self.log_volume[part],
            log_residual=self.log_residual[part],
            reconstruction_error=self.reconstruction_error[part],
            p_value=self.p_value[part],
            is_anomaly=self.is_anomaly[part],
            residual_share=None if self.residual_share is None else self.residual_share[part],
        )

    def columns(self) -> dict[str, NDArray[np.generic]]:
        """The per-row columns of `anomaly-scores score`, in their documented order."""
        return {
            "score": self.score,
            "log_likelihood": self.log_likelihood,
            "log_prior": self.log_prior,
            "log_volume": self.log_volume,
            "log_residual": self.log_residual,
            "reconstruction_error": self.reconstruction_error,
            "p_value": self.p_value,
            "is_anomaly": self.is_anomaly,
        }


class Scorer(Protocol):
    bundle: Bundle
    backend: str
    native_methods: tuple[str, ...]  # scored by this backend itself, without delegating

    def score(
        self,
        x_raw: NDArray[np.floating],
        method: str | None = None,
        fpr: float | None = None,
        explain: bool = False,
    ) -> ScoreOutput: ...


def check_method(method: str | None, bundle: Bundle) -> str:
    method = method or bundle.default_method
    if method not in METHODS:
        raise ValueError(f"unknown score method {method!r}; choose one of {list(METHODS)}")
    return method


def assemble(
    bundle: Bundle,
    method: str,
    fpr: float | None,
    parts: dict[str, NDArray[np.floating]],
    explain: bool,
) -> ScoreOutput:
    """Turn a backend's parts (log_prob, log_prior, log_volume, log_residual, reconstruction_error,
    residual) into scores, p-values and flags at the threshold of `fpr` (default: the bundle's)."""
    threshold = bundle.threshold(method, bundle.default_fpr if fpr is None else fpr)
    log_likelihood = np.asarray(parts["log_prob"], dtype=np.float64)
    share = None
    if explain:
        e2 = np.asarray(parts["residual"], dtype=np.float64) ** 2
        share = e2 / np.maximum(e2.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return ScoreOutput(
        method=method,
        threshold=threshold,
        score=-log_likelihood,
        log_likelihood=log_likelihood,
        log_prior=np.asarray(parts["log_prior"], dtype=np.float64),
        log_volume=np.asarray(parts["log_volume"], dtype=np.float64),
        log_residual=np.asarray(parts["log_residual"], dtype=np.float64),
        reconstruction_error=np.asarray(parts["reconstruction_error"], dtype=np.float64),
        p_value=bundle.p_values(method, -log_likelihood),
        is_anomaly=-log_likelihood > threshold.value,
        residual_share=share,
    )


def create_scorer(
    bundle: Bundle, backend: str = "onnx", device: str = "cpu", threads: int = 0, dtype: str = "float32"
) -> Scorer:
    """onnx: onnxruntime on CPU with `threads` per call (0: all cores); torch: PyTorch on `device`
    (cpu, cuda, or auto = cuda when present). dtype float64 (torch only) scores every method in
    float64, for reference computations; float32 is the product's precision."""
    if backend == "onnx":
        if dtype != "float32":
            raise ValueError(
                f"dtype {dtype!r} needs the torch backend: the onnx graphs are the product's float32"
            )
        from app.engine.onnx_backend import OnnxScorer

        return OnnxScorer(bundle, threads)
    if backend == "torch":
        from app.engine.torch_backend import TorchScorer

        return TorchScorer(bundle, device, dtype)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
