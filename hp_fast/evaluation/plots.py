"""Plots people would rather look at than read: score heatmaps and edit curves (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def heatmap(scores: torch.Tensor, path, *, title: str = "", marked: Sequence[tuple[int, int]] = (),
            label: str = "score") -> Path:
    """Layers x heads heatmap of ``scores (L, H)``; ``marked`` heads get a box."""
    plt = _pyplot()
    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(max(3.5, 0.35 * H + 2), max(3.0, 0.22 * L + 1.2)))
    im = ax.imshow(scores.float().numpy(), aspect="auto", cmap="viridis", origin="lower")
    for layer, head in marked:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return _save(fig, path)


def edit_curves(ks: Sequence[int], series: dict[str, Sequence[float]], path, *,
                bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                title: str = "", xlabel: str = "heads inverted (k)",
                ylabel: str = "accuracy / unedited") -> Path:
    """Metric vs k, one line per series; ``bands`` shades an interquartile range per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, ys in series.items():
        line, = ax.plot(list(ks), list(ys), marker="o", label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(list(ks), list(lo), list(hi), color=line.get_color(), alpha=0.2)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
