"""The torch backend on a GPU: rows/s per method and batch size, against the hardware's bounds,
and agreement with the CPU. Prints JSON.

    .venv/bin/python benchmarks/gpu.py [--device cuda] [--batches 1024,...,1048576] [--repeats 5]
                                       [--peak-tflops 60] [--link-gbps 64] [--quick]

One short script to run whenever an NVIDIA GPU is at hand (`--device cpu` runs the same logic here).
For three models (the shipped default bundle; the issue's shape, d = 30, k = 4, 3 x 64, Euclidean
latent and vamp prior; the same on the sphere with a vMF prior) and every method it reports, per
batch size:

- rows/s with the rows already on the device (`resident`), and from pinned host memory, the copy
  to the device included (`with_copy`);
- the estimated arithmetic per row (`flop_per_row`: the networks, the forward-mode Jacobian's k
  tangents, the Gram-Schmidt volume; none for `projected`, whose iteration count varies) and the
  fraction of --peak-tflops it reaches; the bytes copied per row (float32 rows) and the fraction of
  --link-gbps (a PCIe 5 x16 link carries about 64 GB/s) the copy uses;

and, at batch 65 536, the largest relative difference of the scores against the CPU,
max |device - cpu| / max(1, |cpu|).
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
from app.model.scores import score, scoring_dtype
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


def mlp_flop(n_in: int, hidden: int, depth: int, n_out: int) -> int:
    """Multiply-adds x 2 of one pass through depth hidden layers (depth + 1 linear maps)."""
    return 2 * (n_in * hidden + max(depth - 1, 0) * hidden * hidden + hidden * n_out)


def flop_per_row(bundle: Bundle, method: str) -> int | None:
    """The arithmetic of one row, by the algorithm: what the hardware must at least do."""
    a = bundle.architecture
    d, k, m = a.input_dim, a.latent_dim, a.intrinsic_dim
    encoder, decoder = mlp_flop(d, a.hidden, a.depth, k), mlp_flop(k, a.hidden, a.depth, d)
    prior = 4 * a.components * k
    volume = 2 * m * m * d  # modified Gram-Schmidt on m vectors of length d
    if method in ("reconstruction", "latent"):
        return encoder + decoder + (prior if method == "latent" else 0)
    if method == "likelihood":
        return encoder + (1 + k) * decoder + volume + prior + 2 * d
    if method == "encoder":  # decoder with k tangents, then the encoder at f(g(x)) with its tangents
        return encoder + (1 + k) * decoder + (1 + m) * encoder + 2 * volume + prior + 2 * d
    return None


def sweep(
    scorer: TorchScorer, batches: list[int], repeats: int, peak: float, link: float
) -> dict[str, object]:
    """rows/s of each method per batch, resident and with the host-to-device copy."""
    device = torch.device(scorer.device)
    bundle = scorer.bundle
    out: dict[str, object] = {}
    for method in METHODS:
        generative, dtype = scorer.generative(method), scoring_dtype(method, scorer.model.dtype)
        rows: dict[str, object] = {}
        for batch in batches:
            host = torch.from_numpy(bundle.scaler.transform(bundle.sample_rows(batch))).to(dtype)
            if device.type == "cuda":
                host = host.pin_memory()
            resident = host.to(device)
            with torch.no_grad():
                score(generative, resident[:1024], method)  # warm-up: kernels and handles
                synchronize(scorer.device)
                start = time.perf_counter()
                for _ in range(repeats):
                    score(generative, resident, method)
                synchronize(scorer.device)
                resident_rate = batch * repeats / (time.perf_counter() - start)
                start = time.perf_counter()
                for _ in range(repeats):
                    score(generative, host.to(device, non_blocking=True), method)
                synchronize(scorer.device)
                copy_rate = batch * repeats / (time.perf_counter() - start)
            flop, copied = flop_per_row(bundle, method), host.element_size() * host.shape[1]
            rows[str(batch)] = {
                "resident_rows_per_s": round(resident_rate),
                "with_copy_rows_per_s": round(copy_rate),
                "flop_per_row": flop,
                "fraction_of_peak": None if flop is None else resident_rate * flop / (peak * 1e12),
                "bytes_per_row": copied,
                "fraction_of_link": copy_rate * copied / (link * 1e9),
            }
        out[method] = rows
    return out


def measure(bundle: Bundle, device: str, batch: int, repeats: int) -> dict[str, object]:
    x = bundle.sample_rows(batch)
    gpu, cpu = TorchScorer(bundle, device), TorchScorer(bundle, "cpu")
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


BATCHES = [1024, 4096, 16_384, 65_536, 262_144, 1_048_576]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=65_536, help="the batch of the agreement check")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=60.0, help="the device's FP32 peak (H200: ~60)")
    parser.add_argument("--link-gbps", type=float, default=64.0, help="host-to-device GB/s (PCIe 5 x16: ~64)")
    parser.add_argument("--quick", action="store_true", help="the default bundle alone, batches to 16 384")
    parser.add_argument("--out", type=Path, help="also write the report to this JSON file")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on an NVIDIA GPU, or pass --device cpu to check the script")
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        batches = [b for b in batches if b <= 16_384]
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "batch": args.batch,
        "peak_tflops": args.peak_tflops,
        "link_gbps": args.link_gbps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {
            "default_bundle": load_bundle(args.model),
            "d30_k4_euclidean_vamp": spec_bundle(Path(tmp), "euclidean", "vamp"),
            "d30_k4_sphere_vmf": spec_bundle(Path(tmp), "sphere", "vmf"),
        }
        if args.quick:
            bundles = {"default_bundle": bundles["default_bundle"]}
        for name, bundle in bundles.items():
            scorer = TorchScorer(bundle, args.device)
            report[name] = measure(bundle, args.device, min(args.batch, max(batches)), args.repeats) | {
                "batches": sweep(scorer, batches, args.repeats, args.peak_tflops, args.link_gbps)
            }
            print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
