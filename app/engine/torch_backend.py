"""The PyTorch backend: every score method, on CPU or CUDA."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from app.bundle.format import Bundle, members_of
from app.engine.scorer import ScoreOutput, assemble_members, method_or_default
from app.model.device import resolve_device
from app.model.manifold import GenerativeModel
from app.model.methods import METHODS, OUTPUTS
from app.model.scores import score, scoring_dtype

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchScorer:
    """dtype: float32, the product's precision (projected in float64 regardless, as the bundle's
    calibration was scored), or float64 for every method, for reference computations."""

    backend = "torch"
    methods = METHODS

    def __init__(self, bundle: Bundle, device: str = "cpu", dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
        self.bundle = bundle
        self.device = resolve_device(device)
        # An ensemble's members are scored one after another: members stacked into batched kernels
        # would launch one kernel per layer for all of them, and are not built yet.
        self.models = [m.build_model(self.device).with_dtype(DTYPES[dtype]) for m in members_of(bundle)]
        self.model = self.models[0]
        self._generative: dict[tuple[int, torch.dtype], GenerativeModel] = {}

    def generative(self, method: str, member: int = 0) -> GenerativeModel:
        model = self.models[member]
        dtype = scoring_dtype(method, model.dtype)
        if (member, dtype) not in self._generative:
            self._generative[member, dtype] = model.with_dtype(dtype).generative()
        return self._generative[member, dtype]

    def score(
        self,
        x_raw: NDArray[np.floating],
        method: str | None = None,
        fpr: float | None = None,
        explain: bool = False,
    ) -> ScoreOutput:
        method = method_or_default(method, self.bundle)
        dtype = scoring_dtype(method, self.model.dtype)
        x_model, mismatch = self.bundle.split_columns(x_raw)
        x = torch.as_tensor(self.bundle.scaler.transform(x_model), dtype=dtype, device=self.device)
        members = []
        for i in range(len(self.models)):
            with torch.no_grad():
                parts = score(self.generative(method, i), x, method)
            arrays = {n: getattr(parts, n).double().cpu().numpy() for n in OUTPUTS[:-1]}
            if explain:
                arrays["residual"] = (x - parts.x_hat).double().cpu().numpy()
            members.append(arrays)
        return assemble_members(self.bundle, method, fpr, members, explain, x.shape[0], mismatch)
