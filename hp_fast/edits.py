"""Head edits: multiply chosen query heads' writes by a gain (method.md §5).

Two ways, same math:
* ``edit_heads(model, gains)``: a context manager; scales the W_O input per head at run
  time (every position, prompt and generated, KV cache included); leaving the block
  restores the model exactly, also when the block raises. Per-row gains let one batch
  carry several edit configurations.
* ``fold_head_gains(model, gains)``: scales the W_O columns in place (zero cost at
  inference); returns a handle whose ``undo()`` restores the saved columns bit for bit.
  Use it for a fixed edit that you will run many times; use ``edit_heads`` for sweeps and
  batched configurations.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping, Union

import torch

from . import ops
from .adapters import ModelAdapter, get_adapter

Gains = Union[Mapping[tuple[int, int], float], torch.Tensor]


def gains_tensor(gains: Gains, num_layers: int, num_heads: int) -> torch.Tensor:
    """Normalize gains to float32 (L, H) or per-row (B, L, H); 1 = unedited."""
    if isinstance(gains, torch.Tensor):
        g = gains.detach().float().cpu()
        if g.shape[-2:] != (num_layers, num_heads) or g.dim() not in (2, 3):
            raise ValueError(f"gains tensor must be (layers, heads)=({num_layers}, {num_heads}) or "
                             f"(batch, {num_layers}, {num_heads}); got {tuple(g.shape)}")
    else:
        g = torch.ones(num_layers, num_heads)
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


def _layer_hook(layer_gain: torch.Tensor, ad: ModelAdapter):
    """Pre-hook on W_O: x (B, T, H*dh) -> x with each head's slice times its gain."""
    H, dh = ad.num_heads, ad.head_dim

    def hook(_module, args):
        x = args[0]
        B, T = x.shape[0], x.shape[1]
        g = layer_gain.to(x.device)
        if g.dim() == 2 and g.shape[0] != B:
            raise ValueError(f"per-row gains were given for {g.shape[0]} rows but the batch has {B}")
        y = ops.head_gain(x.view(B, T, H, dh), g, None, False)  # (B, T, H*dh)
        return (y,) + tuple(args[1:])
    return hook


@contextmanager
def edit_heads(model, gains: Gains):
    """Scale heads' writes inside the block; the model is restored on exit (also on errors).

    gains: {(layer, head): gain}, a (layers, heads) tensor, or a per-row
    (batch, layers, heads) tensor (row b of every batch gets gains[b]).
    """
    ad = get_adapter(model)
    g = gains_tensor(gains, ad.num_layers, ad.num_heads)
    edited = (g != 1).reshape(-1, ad.num_layers, ad.num_heads).any(0).any(-1)  # (L,)
    handles = []
    try:
        for layer in torch.nonzero(edited).flatten().tolist():
            layer_gain = g[layer] if g.dim() == 2 else g[:, layer]  # (H,) or (B, H)
            handles.append(ad.out_projs[layer].register_forward_pre_hook(_layer_hook(layer_gain, ad)))
        yield model
    finally:
        for h in handles:
            h.remove()


class FoldHandle:
    """Undo handle of ``fold_head_gains``; also a context manager."""

    def __init__(self, saved: list):
        self._saved = saved  # [(weight Parameter, index tensor or slice, original values)]

    @torch.no_grad()
    def undo(self) -> None:
        for weight, cols, original, conv1d in reversed(self._saved):
            if conv1d:
                weight[cols, :] = original
            else:
                weight[:, cols] = original
        self._saved = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


@torch.no_grad()
def fold_head_gains(model, gains: Gains) -> FoldHandle:
    """Multiply the W_O columns of each head by its gain, in place; returns an undo handle.

    Only static (layers, heads) gains can be folded (not per-row gains).
    """
    ad = get_adapter(model)
    g = gains_tensor(gains, ad.num_layers, ad.num_heads)
    if g.dim() != 2:
        raise ValueError("per-row gains cannot be folded into weights; use edit_heads")
    saved = []
    for layer, head in torch.nonzero(g != 1).tolist():
        weight = ad.out_projs[layer].weight
        cols = slice(head * ad.head_dim, (head + 1) * ad.head_dim)
        if ad.conv1d:  # Conv1D weight is (in, out): a head is a block of rows
            saved.append((weight, cols, weight[cols, :].clone(), True))
            weight[cols, :] *= g[layer, head].item()
        else:
            saved.append((weight, cols, weight[:, cols].clone(), False))
            weight[:, cols] *= g[layer, head].item()
    return FoldHandle(saved)


def count_heads(gains: Gains, num_layers: int, num_heads: int) -> int:
    g = gains_tensor(gains, num_layers, num_heads)
    return int((g != 1).reshape(-1, num_layers, num_heads).any(0).sum())


__all__ = ["edit_heads", "fold_head_gains", "gains_tensor", "uniform_gains", "FoldHandle",
           "count_heads"]
