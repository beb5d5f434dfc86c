"""Amortised training time per candidate: stacked grid training against a plain one-model loop.

    .venv/bin/python benchmarks/train_grid.py [--steps 10000] [--candidates 16]

d = 30, k = 4, 3 hidden layers of 64, batch 100, CPU. The plain loop is the textbook PyTorch
training step of one WAE (its own forward, MMD, Adam); the grid trains `--candidates` models
(beta x kernel width) stacked in one run. Prints JSON; both are measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from app.model.manifold import ManifoldModel
from app.train.fit import fit_candidates, imq_mmd
from app.train.options import Candidate, FitOptions


def plain_loop(x: torch.Tensor, candidate: Candidate, steps: int) -> float:
    model = ManifoldModel(candidate.architecture(x.shape[1]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    width = torch.tensor([candidate.kernel_width])
    start = time.perf_counter()
    for _ in range(steps):
        xb = x[torch.randint(x.shape[0], (100,))]
        z = model.encoder(xb)
        y = model.prior_distribution().rsample(100)
        loss = ((model.decoder(z) - xb) ** 2).mean() + candidate.beta * imq_mmd(z[None], y[None], width)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--prior", default="vamp", choices=["vamp", "vmf", "normal"])
    args = parser.parse_args()
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((5000, 30))
    geometry = "sphere" if args.prior == "vmf" else "euclidean"
    grid = [
        Candidate(
            latent_dim=4,
            hidden=64,
            depth=3,
            geometry=geometry,
            prior=args.prior,
            components=4,
            beta=b,
            kernel_width=w,
        )
        for b in (0.01, 0.1, 1.0, 10.0)
        for w in (1.0, 0.1, 0.01, 0.001)
    ][: args.candidates]
    start = time.perf_counter()
    fit_candidates(x, grid, FitOptions(steps=args.steps, batch_size=100))
    stacked = time.perf_counter() - start
    plain = plain_loop(torch.as_tensor(x, dtype=torch.float32), grid[0], args.steps)
    print(
        json.dumps(
            {
                "benchmark": f"WAE training, d=30 k=4 3x64, batch 100, prior {args.prior}, CPU",
                "torch_threads": torch.get_num_threads(),
                "steps": args.steps,
                "candidates": len(grid),
                "stacked_grid_seconds": round(stacked, 1),
                "amortised_seconds_per_candidate": round(stacked / len(grid), 2),
                "plain_loop_seconds_per_model": round(plain, 1),
                "speedup_per_candidate": round(plain / (stacked / len(grid)), 1),
                "paper_grid_288_minutes_estimate": round(288 * stacked / len(grid) / 60, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
