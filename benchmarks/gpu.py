"""The torch backend on CUDA at batch 65 536: rows/s and agreement with the CPU. Prints JSON.

    .venv/bin/python benchmarks/gpu.py [--model models/default] [--batch 65536]

One short script to run whenever an NVIDIA GPU is at hand: it scores the same rows on the GPU
and on the CPU (likelihood and encoder: batched Jacobians and batched SVDs) and reports rows/s
on each and the largest relative difference of the scores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from app.bundle import load_bundle
from app.torch_scorer import TorchScorer


def timed(scorer: TorchScorer, x: np.ndarray, method: str, repeats: int) -> tuple[float, np.ndarray]:
    scorer.score(x[:1024], method)  # warm-up: kernels, cuBLAS and cuSOLVER handles
    if scorer.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = scorer.score(x, method)
    if scorer.device.startswith("cuda"):
        torch.cuda.synchronize()
    return x.shape[0] * repeats / (time.perf_counter() - start), out.score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs an NVIDIA GPU")
    bundle = load_bundle(args.model)
    rng = np.random.default_rng(0)
    x = bundle.scaler.mean + rng.standard_normal((args.batch, len(bundle.features))) * bundle.scaler.scale
    gpu, cpu = TorchScorer(bundle, "cuda"), TorchScorer(bundle, "cpu")
    report: dict[str, object] = {"device": torch.cuda.get_device_name(0), "batch": args.batch}
    for method in ("likelihood", "encoder", "reconstruction"):
        gpu_rate, gpu_scores = timed(gpu, x, method, args.repeats)
        cpu_rate, cpu_scores = timed(cpu, x, method, 1)
        difference = np.max(np.abs(gpu_scores - cpu_scores) / np.maximum(1.0, np.abs(cpu_scores)))
        report[method] = {
            "gpu_rows_per_s": round(gpu_rate),
            "cpu_rows_per_s": round(cpu_rate),
            "max_relative_difference": float(difference),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
