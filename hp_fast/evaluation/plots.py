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


def fit_title(fig, title: str, fontsize: float = 9):
    """Put ``title`` over the whole figure, wrapped into lines that fit its width: first at an
    average character width, then narrower until the drawn text fits (wide glyphs)."""
    import textwrap
    width = fig.get_figwidth() * fig.dpi * 0.96  # pixels, a small margin each side
    chars = max(12, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    text = fig.suptitle("\n".join(textwrap.wrap(title, chars)), fontsize=fontsize)
    renderer = fig.canvas.get_renderer()
    while chars > 8 and text.get_window_extent(renderer).width > width:
        chars = int(chars * 0.85)
        text.set_text("\n".join(textwrap.wrap(title, chars)))
    return text


def heatmap(scores: torch.Tensor, path, *, title: str = "", marked: Sequence[tuple[int, int]] = (),
            label: str = "score") -> Path:
    """Layers x heads heatmap of ``scores (L, H)``; ``marked`` heads get a box. A long ``title``
    is wrapped to the figure's width; constrained layout keeps it and the labels inside."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * H + 2), max(3.0, 0.22 * L + 1.2)),
                           layout="constrained")
    im = ax.imshow(scores.float().numpy(), aspect="auto", cmap="viridis", origin="lower")
    for layer, head in marked:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, label=label)
    if title:  # over the whole figure (axes and colorbar), so it can use the full width
        fit_title(fig, title)
    return _save(fig, path)


def edit_curves(ks: Sequence[int], series: dict[str, Sequence[float]], path, *,
                bands: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                errors: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                title: str = "", xlabel: str = "heads inverted (k)",
                ylabel: str = "accuracy / unedited") -> Path:
    """Metric vs k, one line per series; ``bands`` shades an interquartile range per series;
    ``errors`` draws (low, high) interval bars per series (e.g. bootstrap 95 % intervals)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, ys in series.items():
        line, = ax.plot(list(ks), list(ys), marker="o", label=name)
        if errors and name in errors:
            lo, hi = errors[name]
            y = [float(v) for v in ys]
            yerr = [[max(0.0, a - float(l)) for a, l in zip(y, lo)],
                    [max(0.0, float(h) - a) for a, h in zip(y, hi)]]
            ax.errorbar(list(ks), y, yerr=yerr, fmt="none", ecolor=line.get_color(), capsize=3, lw=1)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(list(ks), list(lo), list(hi), color=line.get_color(), alpha=0.2)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    if len(ks) <= 12:
        ax.set_xticks(list(ks))  # the ks that were run, not fractional ticks between them
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


def interval_points(labels: Sequence[str], series: dict[str, tuple[Sequence[float], Sequence[float],
                                                                  Sequence[float]]], path, *,
                    refs: dict[str, Sequence[float]] | None = None, title: str = "",
                    ylabel: str = "") -> Path:
    """One group per label; in each, a point with (low, high) interval bars per series
    (``series[name] = (values, lows, highs)``), side by side; ``refs`` draws horizontal ticks
    (e.g. the best random control) per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(labels) + 2.5), 3.8))
    n = max(1, len(series))
    width = 0.7 / n
    for j, (name, (vals, lo, hi)) in enumerate(series.items()):
        xs = [i - 0.35 + width * (j + 0.5) for i in range(len(labels))]
        y = [float(v) for v in vals]
        yerr = [[max(0.0, a - float(l)) if l == l else 0.0 for a, l in zip(y, lo)],
                [max(0.0, float(h) - a) if h == h else 0.0 for a, h in zip(y, hi)]]
        ax.errorbar(xs, y, yerr=yerr, fmt="o", capsize=3, ms=4, lw=1, label=name)
    for name, vals in (refs or {}).items():
        for i, v in enumerate(vals):
            ax.hlines(float(v), i - 0.4, i + 0.4, colors="gray", linestyles="--", lw=1,
                      label=name if i == 0 else None)
    ax.axhline(0.0, color="gray", lw=0.8, ls=":")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
