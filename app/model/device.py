"""Which torch device to use: one rule for training and for the torch scoring backend."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """cpu, cuda[:n], or auto (cuda when present); refuses cuda where there is none."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    return device
