"""Scoring kernels side by side, in one run: rows/s of `likelihood` at several batch sizes. Prints JSON.

    .venv/bin/python benchmarks/kernel.py [--batches 1 64 1024 16384] [--seconds 1.0] [--repeats 3]
        [--ensemble default]

With --ensemble GRID ('default', the grid `anomaly-scores train` fits with no options, or a JSON
file of lists as `train --grid` takes), also the ensemble of that grid's candidates at d = 30, each a
freshly initialised network of its architecture: the onnx backend's one call for all members, the
same members scored by M calls of single-model scorers, one model of `train --grid none`'s
architecture, and the ratio of the ensemble's time per row to that one model's; the floating-
point operations of their matrix products per row (from the graphs' shapes), the rate the
ensemble's products reach, and the rate of one large float32 GEMM on this machine, with the
ensemble's rows/s if every product ran at that rate: a ceiling for any kernel on these cores.

d = 30, k = 4, 3 hidden layers of 64 (a freshly initialised model: speed does not depend on the
weights). Paths: the per-row loop a user would write (autograd jacobian + svdvals), torch.func
(vmap of jacfwd + batched svdvals), the torch backend (analytic forward-mode Jacobian, batched
SVD) and the onnx backend (the bundle's fused graph in onnxruntime), each on the same rows.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from app.bundle.ensemble import FISHER_TAIL, every_term
from app.bundle.format import save_bundle, save_ensemble
from app.bundle.graphs import verified_graphs
from app.bundle.scaler import Scaler
from app.engine.onnx_backend import OnnxScorer
from app.engine.torch_backend import TorchScorer
from app.model.manifold import ManifoldModel
from app.model.methods import METHODS
from app.model.spec import Architecture
from app.train.options import GRIDS, Candidate, expand_grid


def fitted_noise_shape() -> tuple[float, ...]:
    """Relative noise variances as `train` fits them by default (docs/bundle.md 2.4), so the graphs
    timed whiten the residual as served bundles' do; their values do not change the cost."""
    return tuple(float(w) for w in np.random.default_rng(1).uniform(0.5, 2.0, 30))


def naive(model: ManifoldModel, x: torch.Tensor) -> torch.Tensor:
    prior, out = model.prior_distribution(), []
    for row in x:
        z = model.encoder(row[None])
        J = torch.autograd.functional.jacobian(lambda v: model.decoder(v[None])[0], z[0])
        e = row - model.decoder(z)[0]
        log_residual = -0.5 * (e @ e) / model.sigma2 - 0.5 * e.numel() * math.log(2 * math.pi * model.sigma2)
        out.append(prior.log_prob(z)[0] - torch.log(torch.linalg.svdvals(J)).sum() + log_residual)
    return torch.stack(out)


def with_torch_func(model: ManifoldModel, x: torch.Tensor) -> torch.Tensor:
    z = model.encoder(x)
    J = torch.func.vmap(torch.func.jacfwd(lambda v: model.decoder(v[None])[0]))(z)
    e = x - model.decoder(z)
    log_residual = -0.5 * (e * e).sum(-1) / model.sigma2 - 0.5 * x.shape[1] * math.log(
        2 * math.pi * model.sigma2
    )
    return model.prior_distribution().log_prob(z) - torch.log(torch.linalg.svdvals(J)).sum(-1) + log_residual


def rows_per_second(fn: Callable[[], object], rows: int, seconds: float, repeats: int) -> float:
    """The best of `repeats` timings of at least `seconds` each (as timeit takes the minimum): on
    a shared machine, noise from other tenants only ever slows a run down."""
    fn()
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or count < 3:
            fn()
            count += 1
        best = max(best, rows * count / elapsed)
    return best


def matmul_flops_per_row(graph: bytes) -> float:
    """Floating-point operations of the matrix products of one row in the ONNX graph `graph`
    (2 per multiply-add; every other node is elementwise and cheaper), from its inferred shapes."""
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(graph))
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)
    }
    shapes |= {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type == "MatMul":
            inner = shapes[node.input[0]][-1]
            per_row = [d for d in shapes[node.output[0]] if d is not None]  # the batch is the unknown
            total += 2.0 * inner * math.prod(per_row)
    return total


def gemm_flops_per_second(seconds: float, repeats: int) -> float:
    """What this machine's BLAS reaches on one large float32 product, on every core numpy's BLAS
    uses: a ceiling that small, thin products (64 wide) approach but do not reach."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    return rows_per_second(lambda: a @ a, 2 * 2048**3, seconds, repeats)


def members_figures(
    args: argparse.Namespace, train: np.ndarray, calibration: dict[str, np.ndarray], tmp: Path
) -> dict[str, object]:
    """rows/s of the ensemble of a grid's candidates against one model and M separate calls."""
    grid = GRIDS[args.ensemble] if args.ensemble in GRIDS else json.loads(Path(args.ensemble).read_text())
    candidates = expand_grid(grid, 30)
    models = [ManifoldModel(c.architecture(30)).eval() for c in candidates]
    single = ManifoldModel(Candidate().architecture(30)).eval()
    for model in (single, *models):
        model.relative_variance = fitted_noise_shape()
    bundle = save_ensemble(
        tmp / "ensemble",
        models=models,
        # Placeholder reference values of every term the default combination ranks: the ranking's
        # cost is the same whatever they are.
        references=[{t: calibration[t.split(".")[0]] for t in every_term(FISHER_TAIL)}] * len(models),
        hyper_parameters=[{}] * len(models),
        name="bench-ensemble",
        features=[f"f{i}" for i in range(30)],
        scaler=Scaler(np.zeros(30), np.ones(30)),
        calibration_scores=calibration,
        fprs=(0.1,),
        default_fpr=0.1,
    )
    ensemble = OnnxScorer(bundle)
    # Each member alone is a single-model bundle of the same network: M of them is the ensemble
    # without one call; `one` is what `train --grid none` would serve instead.
    one, *members = [
        OnnxScorer(
            save_bundle(
                tmp / f"member-{i}",
                model=model,
                name=f"bench-member-{i}",
                features=[f"f{j}" for j in range(30)],
                scaler=Scaler(np.zeros(30), np.ones(30)),
                calibration_scores=calibration,
                fprs=(0.1,),
                default_fpr=0.1,
            )
        )
        for i, model in enumerate([single, *models])
    ]
    flops = {
        "one_model": matmul_flops_per_row(verified_graphs(one.bundle)["likelihood"]),
        "ensemble": sum(matmul_flops_per_row(verified_graphs(m)["likelihood"]) for m in ensemble.members),
    }
    gemm = gemm_flops_per_second(args.seconds, args.repeats)
    by_batch: dict[str, dict[str, float]] = {}
    for batch in args.batches:
        x = train[np.arange(batch) % len(train)]
        alone = rows_per_second(lambda x=x: one.score(x, "likelihood"), batch, args.seconds, args.repeats)
        merged = rows_per_second(
            lambda x=x: ensemble.score(x, "likelihood"), batch, args.seconds, args.repeats
        )
        separate = rows_per_second(
            lambda x=x: [m.score(x, "likelihood") for m in members], batch, args.seconds, args.repeats
        )
        by_batch[str(batch)] = {
            "one_model": round(alone),
            "ensemble_one_call": round(merged),
            "members_separate_calls": round(separate),
            "ensemble_time_over_one_model": round(alone / merged, 2),
            "ensemble_matmul_gflop_per_s": round(merged * flops["ensemble"] / 1e9, 1),
        }
    return {
        "grid": args.ensemble,
        "members": [
            {k: v for k, v in c.to_dict().items() if k in ("latent_dim", "hidden", "beta", "kernel_width")}
            for c in candidates
        ],
        "one_model": {"latent_dim": single.arch.latent_dim, "hidden": single.arch.hidden},
        "matmul_flop_per_row": {k: round(v) for k, v in flops.items()},
        "ensemble_over_one_model_flop": round(flops["ensemble"] / flops["one_model"], 2),
        "large_gemm_gflop_per_s": round(gemm / 1e9, 1),
        # rows/s if every product ran at the large GEMM's rate and nothing else cost anything
        "ensemble_rows_per_s_at_large_gemm_rate": round(gemm / flops["ensemble"]),
        "rows_per_second_by_batch": by_batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024, 16384])
    parser.add_argument("--seconds", type=float, default=1.0, help="per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure; the best is reported")
    parser.add_argument("--naive-rows", type=int, default=200, help="the naive loop is timed on this many")
    parser.add_argument(
        "--ensemble", help="also time the ensemble of this grid: 'default' or a JSON file of lists"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    arch = Architecture(input_dim=30, latent_dim=4, hidden=64, depth=3, prior="vamp", components=4)
    model = ManifoldModel(arch).eval()
    model.relative_variance = fitted_noise_shape()
    rng = np.random.default_rng(0)
    train = rng.standard_normal((2000, 30))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        calibration = {m: np.sort(rng.standard_normal(200)) for m in METHODS}
        bundle = save_bundle(
            Path(tmp) / "b",
            model=model,
            name="bench",
            features=[f"f{i}" for i in range(30)],
            scaler=Scaler(np.zeros(30), np.ones(30)),
            calibration_scores=calibration,
            fprs=(0.1,),
            default_fpr=0.1,
        )
        onnx_scorer, torch_scorer = OnnxScorer(bundle), TorchScorer(bundle)
        results: dict[str, dict[str, float]] = {}
        for batch in args.batches:
            x = train[np.arange(batch) % len(train)]
            xt = torch.tensor(x, dtype=torch.float32)
            entry = {
                "torch_func": rows_per_second(
                    lambda xt=xt: with_torch_func(model, xt), batch, args.seconds, args.repeats
                ),
                "torch_backend": rows_per_second(
                    lambda x=x: torch_scorer.score(x, "likelihood"), batch, args.seconds, args.repeats
                ),
                "onnx_backend": rows_per_second(
                    lambda x=x: onnx_scorer.score(x, "likelihood"), batch, args.seconds, args.repeats
                ),
            }
            results[str(batch)] = {k: round(v) for k, v in entry.items()}
        ensemble = members_figures(args, train, calibration, Path(tmp)) if args.ensemble else None
        rows = min(args.naive_rows, len(train))
        xt = torch.tensor(train[:rows], dtype=torch.float32)
    naive_rate = rows_per_second(lambda: naive(model, xt), rows, args.seconds, args.repeats)
    for entry in results.values():
        entry["naive_loop"] = round(naive_rate, 1)
        entry["onnx_over_naive"] = round(entry["onnx_backend"] / naive_rate, 1)
        entry["torch_backend_over_naive"] = round(entry["torch_backend"] / naive_rate, 1)
    print(
        json.dumps(
            {
                "benchmark": "likelihood scoring kernels, d=30 k=4 3x64, float32, CPU",
                "torch_threads": torch.get_num_threads(),
                "onnx_row_blocks_up_to": onnx_scorer.threads,
                "figure": f"best of {args.repeats} timings of at least {args.seconds} s",
                "rows_per_second_by_batch": results,
                **({"ensemble": ensemble} if ensemble else {}),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
