"""Head gains: the user's forms ({(layer, head): gain}, a tensor) normalized to one tensor.

A gain of 1 leaves a head unedited, 0 removes its write, -1 flips it (docs/method.md section 5).
"""
from __future__ import annotations

from typing import Mapping, Union

import torch

Gains = Union[Mapping[tuple[int, int], float], torch.Tensor]


def gains_tensor(gains: Gains, num_layers: int, num_heads: int) -> torch.Tensor:
    """Normalize gains to float32 (L, H) or per-row (B, L, H) on the CPU; 1 = unedited."""
    if isinstance(gains, torch.Tensor):
        g = gains.detach().float().cpu()
        if g.shape[-2:] != (num_layers, num_heads) or g.dim() not in (2, 3):
            raise ValueError(f"gains tensor must be (layers, heads)=({num_layers}, {num_heads}) or "
                             f"(batch, {num_layers}, {num_heads}); got {tuple(g.shape)}")
    else:
        g = torch.ones(num_layers, num_heads)  # (L, H)
        for key, value in dict(gains).items():
            try:
                layer, head = (int(x) for x in key)
            except (TypeError, ValueError):
                raise ValueError(f"gain key {key!r} is not a (layer, head) pair") from None
            if not (0 <= layer < num_layers and 0 <= head < num_heads):
                raise ValueError(f"head ({layer}, {head}) does not exist: the model has "
                                 f"{num_layers} layers x {num_heads} heads (0-based)")
            g[layer, head] = float(value)
    if not torch.isfinite(g).all():
        raise ValueError("gains must be finite numbers")
    return g


def uniform_gains(heads, alpha: float) -> dict[tuple[int, int], float]:
    """{(layer, head): alpha} for a list of heads."""
    return {(int(l), int(h)): float(alpha) for l, h in heads}


__all__ = ["Gains", "gains_tensor", "uniform_gains"]
