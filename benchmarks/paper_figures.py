"""Redraw the paper's Fig. 2 and Fig. 3 from the output folders of `anomaly-scores evaluate`.

    .venv/bin/python benchmarks/paper_figures.py fig2 docs/results/loda [--out docs/fig2_auc.png]
    .venv/bin/python benchmarks/paper_figures.py fig3 docs/results/latent-sweep [--out docs/fig3_latent.png]

Fig. 2: test AUC per dataset over the splits, `likelihood` (red) against `reconstruction` (blue),
with hyper-parameters chosen by supervised selection (top) and unsupervised selection (bottom);
Isolation Forest's mean AUC as a black tick. Fig. 3: test AUC against the latent size on one
dataset, over splits and hyper-parameters (every candidate of the grid, no selection).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

COLOURS = {"reconstruction": "tab:blue", "likelihood": "tab:red"}


def paired_boxes(ax: plt.Axes, groups: list[str], values: dict[str, list[np.ndarray]]) -> None:
    """Side-by-side box plots: one pair of boxes per group, one colour per score."""
    for offset, (score, series) in zip((-0.18, 0.18), values.items(), strict=True):
        boxes = ax.boxplot(
            series,
            positions=np.arange(len(groups)) + offset,
            widths=0.32,
            patch_artist=True,
            showfliers=True,
            medianprops={"color": "black"},
        )
        for patch in boxes["boxes"]:
            patch.set_facecolor(COLOURS[score])
            patch.set_alpha(0.6)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("test AUC")
    ax.grid(axis="y", alpha=0.3)


def fig2(results: Path, out: Path) -> None:
    chosen = pd.read_csv(results / "selections.csv")
    baselines = pd.read_csv(results / "baselines.csv")
    datasets = list(dict.fromkeys(chosen["dataset"]))
    fig, axes = plt.subplots(2, 1, figsize=(13, 8), sharex=True, constrained_layout=True)
    for ax, selection in zip(axes, ("supervised", "unsupervised"), strict=True):
        part = chosen[chosen["selection"] == selection]
        values = {
            score: [
                part[(part["dataset"] == ds) & (part["score"] == score)]["test_auc"].to_numpy()
                for ds in datasets
            ]
            for score in ("reconstruction", "likelihood")
        }
        paired_boxes(ax, datasets, values)
        forest = [baselines[baselines["dataset"] == ds]["iforest"].mean() for ds in datasets]
        ax.scatter(np.arange(len(datasets)), forest, marker="_", s=400, color="black", zorder=3)
        ax.set_title(f"{selection} selection")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in COLOURS.values()]
    handles.append(plt.Line2D([], [], color="black", marker="_", linestyle="", markersize=20))
    fig.legend(handles, [*COLOURS, "Isolation Forest (mean)"], loc="outside upper center", ncol=3)
    axes[1].tick_params(axis="x", rotation=25)
    fig.savefig(out, dpi=110)


def fig3(results: Path, out: Path) -> None:
    candidates = pd.read_csv(results / "candidates.csv")
    sizes = sorted(candidates["latent_dim"].unique())
    values = {
        score: [candidates[candidates["latent_dim"] == k][f"test_auc_{score}"].to_numpy() for k in sizes]
        for score in ("reconstruction", "likelihood")
    }
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    paired_boxes(ax, [str(k) for k in sizes], values)
    ax.set_xlabel("latent size")
    ax.set_title(f"{candidates['dataset'].iloc[0]}: every candidate and split")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in COLOURS.values()]
    fig.legend(handles, list(COLOURS), loc="outside upper center", ncol=2)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=["fig2", "fig3"])
    parser.add_argument("results", type=Path, help="an output folder of anomaly-scores evaluate")
    parser.add_argument("--out", type=Path, help="PNG (default docs/fig2_auc.png or docs/fig3_latent.png)")
    args = parser.parse_args()
    default = {"fig2": Path("docs/fig2_auc.png"), "fig3": Path("docs/fig3_latent.png")}[args.figure]
    {"fig2": fig2, "fig3": fig3}[args.figure](args.results, args.out or default)


if __name__ == "__main__":
    main()
