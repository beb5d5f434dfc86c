"""The torch backend on CUDA at batch 65 536: rows/s and agreement with the CPU. Prints JSON.

    .venv/bin/python benchmarks/gpu.py [--batch 65536] [--repeats 5]

One short script to run whenever an NVIDIA GPU is at hand. It scores the same rows on the GPU and
on the CPU with every method (batched Jacobians, batched SVDs, the projection's batched solves)
for three models: the shipped default bundle, the issue's benchmark shape (d = 30, k = 4, 3 x 64,
Euclidean latent, vamp prior) and the same shape on the sphere with a vMF prior. It reports rows/s
on each device and the largest relative difference of the scores, max |gpu - cpu| / max(1, |cpu|).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app.bundle.format import Bundle, load_bundle, save_bundle
from app.bundle.scaler import Scaler
from app.engine.torch_backend import TorchScorer
from app.model.manifold import ManifoldModel
from app.model.methods import METHODS
from app.model.spec import Architecture


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(scorer: TorchScorer, x: np.ndarray, method: str, repeats: int) -> tuple[float, np.ndarray]:
    scorer.score(x[:1024], method)  # warm-up: kernels, cuBLAS and cuSOLVER handles
    synchronize(scorer.device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = scorer.score(x, method)
    synchronize(scorer.device)
    return x.shape[0] * repeats / (time.perf_counter() - start), out.score


def spec_bundle(directory: Path, geometry: str, prior: str) -> Bundle:
    torch.manual_seed(0)
    arch = Architecture(
        input_dim=30, latent_dim=4, hidden=64, depth=3, geometry=geometry, prior=prior, components=4
    )
    rng = np.random.default_rng(0)
    return save_bundle(
        directory / f"{geometry}-{prior}",
        model=ManifoldModel(arch).eval(),
        name=f"bench-{geometry}-{prior}",
        features=[f"f{i}" for i in range(30)],
        scaler=Scaler(np.zeros(30), np.ones(30)),
        calibration_scores={m: np.sort(rng.standard_normal(200)) for m in METHODS},
        fprs=(0.1,),
        default_fpr=0.1,
    )


def measure(bundle: Bundle, batch: int, repeats: int) -> dict[str, object]:
    x = bundle.sample_rows(batch)
    gpu, cpu = TorchScorer(bundle, "cuda"), TorchScorer(bundle, "cpu")
    report: dict[str, object] = {"architecture": dataclasses.asdict(bundle.architecture)}
    for method in METHODS:
        gpu_rate, gpu_scores = timed(gpu, x, method, repeats)
        cpu_rate, cpu_scores = timed(cpu, x, method, 1)
        difference = np.abs(gpu_scores - cpu_scores) / np.maximum(1.0, np.abs(cpu_scores))
        report[method] = {
            "gpu_rows_per_s": round(gpu_rate),
            "cpu_rows_per_s": round(cpu_rate),
            "gpu_over_cpu": round(gpu_rate / cpu_rate, 1),
            "max_relative_difference": float(difference.max()),
            "median_relative_difference": float(np.median(difference)),
            "finite": bool(np.isfinite(gpu_scores).all()),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs an NVIDIA GPU")
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "batch": args.batch,
    }
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {
            "default_bundle": load_bundle(args.model),
            "d30_k4_euclidean_vamp": spec_bundle(Path(tmp), "euclidean", "vamp"),
            "d30_k4_sphere_vmf": spec_bundle(Path(tmp), "sphere", "vmf"),
        }
        for name, bundle in bundles.items():
            report[name] = measure(bundle, args.batch, args.repeats)
            print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
