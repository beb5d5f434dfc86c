"""The PyTorch backend: every score method, on CPU or CUDA."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch.func import stack_module_state

from app.bundle.format import Bundle, members_of
from app.engine.scorer import MEMBER_ROWS, ScoreOutput, assemble_members, method_or_default
from app.model.device import resolve_device
from app.model.manifold import GenerativeModel
from app.model.methods import METHODS, OUTPUTS
from app.model.scores import STACKED_METHODS, ScoreParts, score, scoring_dtype, stacked_score
from app.model.spec import Architecture

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
        self.models = [m.build_model(self.device).with_dtype(DTYPES[dtype]) for m in members_of(bundle)]
        self.model = self.models[0]
        self._generative: dict[tuple[int, torch.dtype], GenerativeModel] = {}
        # An ensemble's members of one architecture are scored together, one batched kernel per layer
        # for all of them (app.model.scores.stacked_score), for the methods that allow it.
        groups: dict[Architecture, list[int]] = {}
        for i, model in enumerate(self.models):
            groups.setdefault(model.arch, []).append(i)
        self.groups = list(groups.values()) if len(self.models) > 1 else []
        self._stacks: dict[tuple[int, torch.dtype], dict[str, torch.Tensor]] = {}

    def stack(self, group: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The state of the members of self.groups[group], stacked along a leading axis."""
        if (group, dtype) not in self._stacks:
            models = [self.models[i].with_dtype(dtype) for i in self.groups[group]]
            params, _ = stack_module_state(models)  # type: ignore[arg-type]
            self._stacks[group, dtype] = {name: value.detach() for name, value in params.items()}
        return self._stacks[group, dtype]

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
        x = self._to_device(self.bundle.scaler.transform(x_model), dtype)
        if self.groups and method in STACKED_METHODS:
            members = self._stacked(x, method, dtype, explain)
        else:
            members = []
            for i in range(len(self.models)):
                with torch.no_grad():
                    parts = score(self.generative(method, i), x, method)
                members.append(_arrays([parts], None, x, explain))
        return assemble_members(self.bundle, method, fpr, members, explain, x.shape[0], mismatch)

    def _to_device(self, rows: NDArray[np.float64], dtype: torch.dtype) -> torch.Tensor:
        """The standardised rows on the scoring device in `dtype`, converted on the host first (a
        float32 copy moves half the bytes). To a GPU through page-locked memory, which torch's
        caching host allocator reuses from call to call: a direct DMA that can run asynchronously,
        where a copy from pageable memory is staged through a bounce buffer."""
        x = torch.from_numpy(np.ascontiguousarray(rows)).to(dtype)
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _stacked(
        self, x: torch.Tensor, method: str, dtype: torch.dtype, explain: bool
    ) -> list[dict[str, NDArray[np.float64]]]:
        members: dict[int, dict[str, NDArray[np.float64]]] = {}
        for group, indices in enumerate(self.groups):
            # a GPU wants the largest tensors; a CPU's caches want MEMBER_ROWS member rows at most
            rows = x.shape[0] if x.device.type == "cuda" else max(1, MEMBER_ROWS // len(indices))
            arch, sigma2 = self.models[indices[0]].arch, [self.models[i].sigma2 for i in indices]
            noises = [self.models[i].relative_variance for i in indices]
            with torch.no_grad():
                blocks = [
                    stacked_score(arch, self.stack(group, dtype), sigma2, block, method, noises)
                    for block in x.split(rows)
                ]
            members |= {i: _arrays(blocks, j, x, explain) for j, i in enumerate(indices)}
        return [members[i] for i in range(len(self.models))]


def _arrays(
    blocks: list[ScoreParts], member: int | None, x: torch.Tensor, explain: bool
) -> dict[str, NDArray[np.float64]]:
    """One member's outputs as numpy arrays from the row blocks of its (stacked, when `member` is
    its index along the leading axis) score parts."""

    def value(name: str) -> torch.Tensor:
        parts = [getattr(b, name) if member is None else getattr(b, name)[member] for b in blocks]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # One copy back to the host for all of them: on a GPU each copy waits for the device.
    names = OUTPUTS[:-1]
    together = torch.stack([value(n).to(torch.float64) for n in names]).cpu().numpy()
    arrays = dict(zip(names, together, strict=True))
    if explain:
        arrays["residual"] = (x - value("x_hat")).double().cpu().numpy()
    return arrays
