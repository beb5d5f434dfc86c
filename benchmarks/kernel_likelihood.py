"""Batched `likelihood` against the per-row loop a user would write, in one run. Prints JSON.

    .venv/bin/python benchmarks/kernel_likelihood.py [--batch 4096] [--naive-rows 300]

The naive loop is torch.autograd.functional.jacobian + torch.linalg.svdvals per row; the batched
path is the analytic forward-mode Jacobian and one batched SVD. d = 30, k = 4, 3 hidden layers of 64.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from app.model import ManifoldModel
from app.scores import likelihood
from app.spec import Architecture


def naive_likelihood(model: ManifoldModel, x: torch.Tensor) -> torch.Tensor:
    prior = model.prior_distribution()
    out = []
    for row in x:
        z = model.encoder(row.unsqueeze(0))
        x_hat = model.decoder(z)
        J = torch.autograd.functional.jacobian(lambda v: model.decoder(v.unsqueeze(0)).squeeze(0), z[0])
        log_volume = -torch.log(torch.linalg.svdvals(J)).sum()
        e = row - x_hat[0]
        log_residual = -0.5 * (e * e).sum() / model.sigma2 - 0.5 * e.numel() * math.log(
            2 * math.pi * model.sigma2
        )
        out.append(prior.log_prob(z)[0] + log_volume + log_residual)
    return torch.stack(out)


def rows_per_second(fn, rows: int, min_seconds: float = 1.0) -> float:
    fn()  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        fn()
        count += 1
    return rows * count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--naive-rows", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ManifoldModel(
        Architecture(input_dim=30, latent_dim=4, hidden=64, depth=3, prior="vamp", components=4)
    )
    model.eval()
    x = torch.randn(args.batch, 30)
    with torch.no_grad():
        generative = model.generative()
        batched = rows_per_second(lambda: likelihood(generative, x), args.batch)
        check = likelihood(generative, x[: args.naive_rows]).log_prob
    naive = rows_per_second(lambda: naive_likelihood(model, x[: args.naive_rows]), args.naive_rows)
    agreement = (naive_likelihood(model, x[: args.naive_rows]).detach() - check).abs().max().item()
    print(
        json.dumps(
            {
                "benchmark": "likelihood kernel, d=30 k=4 3x64, CPU float32",
                "torch_threads": torch.get_num_threads(),
                "batch": args.batch,
                "batched_rows_per_s": round(batched),
                "naive_loop_rows_per_s": round(naive, 1),
                "speedup": round(batched / naive, 1),
                "max_abs_difference": agreement,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
