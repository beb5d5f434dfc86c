"""Scoring raw rows with a bundle: standardise, score, threshold, p-values. Torch backend.

The outputs are plain numpy arrays in input row order, shared by the command line and the service.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from app.bundle import METHODS, Bundle, Threshold
from app.scores import score


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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    return device


class TorchScorer:
    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self.model = bundle.build_model(self.device)
        self.generative = self.model.generative()
        self.scaler = bundle.scaler

    def score(
        self,
        x_raw: NDArray[np.floating],
        method: str | None = None,
        fpr: float | None = None,
        explain: bool = False,
    ) -> ScoreOutput:
        method = method or self.bundle.default_method
        if method not in METHODS:
            raise ValueError(f"unknown score method {method!r}; choose one of {list(METHODS)}")
        threshold = self.bundle.threshold(method, self.bundle.default_fpr if fpr is None else fpr)
        x = torch.as_tensor(self.scaler.transform(x_raw), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            parts = score(self.generative, x, method)

        def numpy(t: torch.Tensor) -> NDArray[np.float64]:
            return t.double().cpu().numpy()

        log_likelihood = numpy(parts.log_prob)
        share = None
        if explain:
            e2 = numpy((x - parts.x_hat) ** 2)
            share = e2 / np.maximum(e2.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        return ScoreOutput(
            method=method,
            threshold=threshold,
            score=-log_likelihood,
            log_likelihood=log_likelihood,
            log_prior=numpy(parts.log_prior),
            log_volume=numpy(parts.log_volume),
            log_residual=numpy(parts.log_residual),
            reconstruction_error=numpy(parts.reconstruction_error),
            p_value=self.bundle.p_values(method, -log_likelihood),
            is_anomaly=-log_likelihood > threshold.value,
            residual_share=share,
        )
