"""Redraw the paper's Fig. 1: three scores of the toy problem x = [z^2, z] + e over the plane.

    .venv/bin/python benchmarks/fig1_toy.py [--out docs/fig1_toy.png]

Panels: (a) reconstruction error as a density, (b) the latent density p(g(x)), (c) the likelihood
(eq. 7), each with the training samples and both kinds of anomaly overlaid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from app.model.scores import score
from app.model.toy import sample_normal, sample_off_manifold_near, sample_on_manifold_far, toy_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/fig1_toy.png"))
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    normal, far, off = sample_normal(300, g), sample_on_manifold_far(40, g), sample_off_manifold_near(40, g)
    x1 = torch.linspace(-0.4, 3.0, 340, dtype=torch.float64)
    x2 = torch.linspace(-0.8, 1.8, 260, dtype=torch.float64)
    X1, X2 = torch.meshgrid(x1, x2, indexing="xy")
    grid = torch.stack([X1.reshape(-1), X2.reshape(-1)], dim=1)
    model = toy_model()
    panels = [
        ("(a) reconstruction error", "reconstruction"),
        ("(b) latent p(g(x))", "latent"),
        ("(c) likelihood, eq. 7", "likelihood"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    for ax, (title, method) in zip(axes, panels, strict=True):
        log_p = score(model, grid, method).log_prob.reshape(X1.shape)
        image = ax.contourf(X1, X2, torch.clamp(log_p - log_p.max(), min=-30), levels=30, cmap="viridis")
        ax.scatter(normal[:, 0], normal[:, 1], s=4, c="white", label="normal")
        ax.scatter(far[:, 0], far[:, 1], s=10, c="red", marker="x", label="on manifold, far")
        ax.scatter(off[:, 0], off[:, 1], s=10, c="orange", marker="+", label="off manifold, near")
        ax.set(title=title, xlabel="x1", ylabel="x2", xlim=(-0.4, 3.0), ylim=(-0.8, 1.8))
        fig.colorbar(image, ax=ax, label="log density (relative)")
    axes[0].legend(loc="lower right", fontsize=8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
