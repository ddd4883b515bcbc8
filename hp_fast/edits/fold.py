"""Head gains folded into the W_O weights (zero cost at inference), with an exact undo.

For a fixed edit applied at every position and run many times; per-row gains and
position-selective edits need ``edit_heads`` (docs/method.md section 5).

Where the weights are:

* plain float weights (any device, models spread over devices included): the head's W_O
  columns are scaled in place;
* weights offloaded by accelerate (``device_map`` with "cpu" or "disk"): the edited matrix is
  written into the hook's weights map (``hp_fast.models.devices.offloaded_store``: for
  accelerate's loader, its in-memory state dict, which the next forward pass reads before
  the disk copy). The offload folder and the checkpoint files are never written; each edited
  layer's W_O is held in CPU memory until ``undo``, which restores the previous entry;
* quantized weights (bitsandbytes, GPTQ, AWQ, ...): refused with a ValueError before any
  change; ``edit_heads`` applies the same gains without touching any weight.

After folding, the weight each edited layer's forward pass will read is read back
(``module_weight``) and compared with the intended values; a mismatch undoes the fold and
raises, so a fold never silently leaves the model unedited.
"""
from __future__ import annotations

import torch

from ..models.adapters import get_adapter
from ..models.devices import offload_hook, offloaded_store
from ..models.weights import class_name, is_conv1d, module_weight, weight_format
from .gains import Gains, gains_tensor

_MISSING = object()
_REFUSAL = {"bnb-4bit": "4-bit bitsandbytes", "bnb-8bit": "8-bit bitsandbytes"}


def _scale_heads(w: torch.Tensor, heads: list[tuple[slice, float]], conv1d: bool) -> None:
    """In place: each head's block of W_O (columns; rows for Conv1D's (in, out)) times its gain."""
    for cols, gain in heads:
        if conv1d:
            w[cols, :] *= gain
        else:
            w[:, cols] *= gain


class _InPlace:
    """Undo of an in-place fold: the saved columns of one weight (Conv1D: rows)."""

    def __init__(self, weight: torch.Tensor, heads, conv1d: bool):
        self.weight, self.conv1d = weight, conv1d
        self.saved = [(cols, (weight[cols, :] if conv1d else weight[:, cols]).clone())
                      for cols, _ in heads]

    def undo(self) -> None:
        for cols, original in reversed(self.saved):
            if self.conv1d:
                self.weight[cols, :] = original
            else:
                self.weight[:, cols] = original


class _Replaced:
    """Undo of a fold into offload storage: the mapping entry as it was (or its absence)."""

    def __init__(self, store, key: str):
        self.store, self.key = store, key
        self.previous = store.get(key, _MISSING) if hasattr(store, "get") else _MISSING

    def undo(self) -> None:
        if self.previous is _MISSING:
            self.store.pop(self.key, None)
        else:
            self.store[self.key] = self.previous


class FoldHandle:
    """Undo handle of ``fold_head_gains``; also a context manager."""

    def __init__(self, saved: list):
        self._saved = saved  # [_InPlace | _Replaced], in the order they were applied

    @torch.no_grad()
    def undo(self) -> None:
        """Restore every edited W_O bit for bit (a second call does nothing)."""
        for entry in reversed(self._saved):
            entry.undo()
        self._saved = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def _refuse(module, layer: int, fmt: str) -> ValueError:
    what = _REFUSAL.get(fmt, f"quantized {class_name(module)}")
    return ValueError(f"fold_head_gains cannot edit {what} weights in place; use edit_heads "
                      "(zero weight change) or export from the unquantized checkpoint (W_O of "
                      f"layer {layer} is {class_name(module)})")


def _fold_layer(module, heads) -> object:
    """Apply one layer's head gains; returns its undo entry."""
    conv1d = is_conv1d(module)
    if weight_format(module) == "offloaded":
        store, key = offloaded_store(module)
        entry = _Replaced(store, key)
        edited = offload_hook(module).weights_map["weight"].clone()  # as stored: Conv1D (in, out)
        _scale_heads(edited, heads, conv1d)
        store[key] = edited
        return entry
    weight = module.weight
    entry = _InPlace(weight, heads, conv1d)
    _scale_heads(weight, heads, conv1d)
    return entry


def _expected(before: torch.Tensor, heads) -> list[torch.Tensor]:
    """The edited head columns of an (out, in) W_O, computed from its state before the fold."""
    out = []
    for cols, gain in heads:
        col = before[:, cols].clone()
        col *= gain
        out.append(col)
    return out


@torch.no_grad()
def fold_head_gains(model, gains: Gains) -> FoldHandle:
    """Multiply the W_O columns of each head by its gain; returns an undo handle.

    Only static (layers, heads) gains can be folded (not per-row gains). Float weights are
    edited in place, accelerate-offloaded ones through their offload storage, quantized ones
    are refused (module docstring).
    """
    ad = get_adapter(model)
    g = gains_tensor(gains, ad.num_layers, ad.num_heads)  # (L, H)
    if g.dim() != 2:
        raise ValueError("per-row gains cannot be folded into weights; use edit_heads")
    per_layer: dict[int, list[tuple[slice, float]]] = {}
    for layer, head in torch.nonzero(g != 1).tolist():
        cols = slice(head * ad.head_dim, (head + 1) * ad.head_dim)
        per_layer.setdefault(layer, []).append((cols, float(g[layer, head])))
    for layer in per_layer:  # every layer checked before any weight changes
        fmt = weight_format(ad.out_projs[layer])
        if fmt not in ("float", "offloaded"):
            raise _refuse(ad.out_projs[layer], layer, fmt)
    saved: list = []
    handle = FoldHandle(saved)
    try:
        for layer, heads in per_layer.items():
            module = ad.out_projs[layer]
            expected = _expected(module_weight(module), heads)
            saved.append(_fold_layer(module, heads))
            _check_visible(module, layer, heads, expected)
    except BaseException:
        handle.undo()
        raise
    return handle


def _check_visible(module, layer: int, heads, expected: list[torch.Tensor]) -> None:
    """The weight the next forward pass reads must hold the edited columns."""
    now = module_weight(module)  # (out, in)
    for (cols, _), want in zip(heads, expected):
        if not torch.equal(now[:, cols], want):
            raise RuntimeError(
                f"fold_head_gains: after folding, the W_O that layer {layer}'s forward pass reads "
                f"({class_name(module)}) does not hold the edited values, so the fold would have "
                "no effect; nothing was changed. Use edit_heads instead")


__all__ = ["FoldHandle", "fold_head_gains"]
