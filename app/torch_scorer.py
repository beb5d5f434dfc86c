"""The PyTorch backend: any score method, on CPU or CUDA, with batched SVDs."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from app.bundle import METHODS, Bundle
from app.scorer import ScoreOutput, assemble, check_method
from app.scores import score


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    return device


class TorchScorer:
    backend = "torch"
    native_methods = METHODS

    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self.model = bundle.build_model(self.device)
        self.generative = self.model.generative()

    def score(
        self,
        x_raw: NDArray[np.floating],
        method: str | None = None,
        fpr: float | None = None,
        explain: bool = False,
    ) -> ScoreOutput:
        method = check_method(method, self.bundle)
        x = torch.as_tensor(self.bundle.scaler.transform(x_raw), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            parts = score(self.generative, x, method)
        names = ("log_prob", "log_prior", "log_volume", "log_residual", "reconstruction_error")
        arrays = {n: getattr(parts, n).double().cpu().numpy() for n in names}
        if explain:
            arrays["residual"] = (x - parts.x_hat).double().cpu().numpy()
        return assemble(self.bundle, method, fpr, arrays, explain)
