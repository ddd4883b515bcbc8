"""Shared trunk: batch rows that are identical below the first edited layer run once there.

When many edit configurations of the same prompts run as one batch (``generate_configs``),
the rows of one prompt differ only from the first edited layer ``L0`` on: below it the gains
are all 1, the tokens are the same, so hidden states and cached keys/values are the same too.
``shared_trunk(model, L0)`` makes each decoder layer below ``L0`` compute one representative
row per group of identical rows and copy the result to the others; its cache entries are
narrowed to the representatives for the call and widened back after it. Groups are tracked
from the token ids the model receives: rows start in one group when their prompt ids and
attention masks are equal, and split as soon as their generated tokens differ. The result is
the same computation on fewer rows (equal up to the float summation order that a different
batch size may bring); nothing else in the model changes.

Only plain dynamic key/value caches (full or sliding window layers) and text-only calls
(``input_ids``) are handled; anything else runs the layer unchanged on every row.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..models.adapters import VLM_MODEL_TYPES, get_adapter

_NEVER_SLICE = {"cache_position"}


class _Groups:
    """Row groups of the current call and the cache rows the trunk layers keep.

    ``key (B,)``: group id of each row (rows with equal ids have the same tokens so far);
    ``rep (u,)``: the first row of each group, ``inv (B,)`` = ``key``; both ``None`` when
    sharing is off for this call. Between calls a trunk layer's cache keeps one row per group
    of the call that wrote it (``layer_key[i]``); groups only ever split, so the next call
    takes each new group's rows from its old group, and ``restore`` widens every layer back to
    ``B`` rows (on leaving the block, or when another cache comes in)."""

    def __init__(self):
        self.key: Optional[torch.Tensor] = None
        self.inv: Optional[torch.Tensor] = None
        self.rep: Optional[torch.Tensor] = None
        self.cache = None
        self.layer_key: dict[int, torch.Tensor] = {}
        self.calls = 0
        self.rows_run = 0  # rows computed by trunk layers
        self.rows_seen = 0  # rows those layers were asked for

    def restore(self) -> None:
        """Widen every narrowed trunk-layer cache back to one row per batch row."""
        for i, key in self.layer_key.items():
            layer = _cache_layer(self.cache, i)
            if layer not in (None, "absent"):
                _take_rows(layer, key)
        self.layer_key = {}

    def update(self, input_ids: Optional[torch.Tensor], mask: Optional[torch.Tensor],
               cache) -> None:
        self.inv = self.rep = None
        fresh = cache is None or cache.get_seq_length() == 0
        if cache is not self.cache or fresh:
            self.restore()
            self.cache, self.key = cache, None
        if input_ids is None or input_ids.dim() != 2 or (mask is not None and mask.dim() != 2):
            self.restore()
            self.key = None
            return
        B = input_ids.shape[0]
        if self.key is None or self.key.shape[0] != B:  # first call: prompt ids and mask
            self.restore()
            parts = [input_ids] + ([mask.to(input_ids.dtype)] if mask is not None else [])
        else:  # later calls: the group so far and the new tokens
            parts = [self.key[:, None], input_ids]
        rows = torch.cat(parts, dim=1)  # (B, .)
        _, key = torch.unique(rows, dim=0, return_inverse=True)  # (B,) ids in 0 .. u-1
        self.key = key
        u = int(key.max()) + 1
        if u == B:
            return
        order = torch.arange(B, device=key.device)
        rep = torch.full((u,), B, dtype=torch.long, device=key.device)
        rep.scatter_reduce_(0, key, order, reduce="amin")  # (u,) first row of each group
        self.inv, self.rep = key, rep
        self.calls += 1


def _narrow(x: Any, rep: torch.Tensor, B: int) -> Any:
    """x with its batch rows narrowed to ``rep`` where x is a tensor (or tuple of tensors)
    whose first dimension is the batch."""
    if isinstance(x, torch.Tensor):
        return x[rep] if x.dim() >= 1 and x.shape[0] == B else x
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return type(x)(_narrow(t, rep, B) for t in x)
    return x


def _cache_layer(cache, index: int):
    """The cache layer object of decoder layer ``index`` when it is a plain dynamic one,
    "absent" when the call itself will create it, else None (the trunk is not shared then)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder wrappers (GPT-2)
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    if index >= len(layers):
        return "absent"
    layer = layers[index]
    return layer if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else None


def _take_rows(layer, rows: torch.Tensor) -> None:
    """Replace the layer's cached keys and values by their rows ``rows`` (an index tensor)."""
    if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
        layer.keys = layer.keys[rows]
        layer.values = layer.values[rows]


def _wrap(layer_module: nn.Module, index: int, groups: _Groups):
    original = layer_module.forward

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        cache = next((x for x in (*args, *kwargs.values()) if isinstance(x, Cache)), None)
        cl = _cache_layer(cache, index) if cache is not None else "absent"
        share = (groups.rep is not None and isinstance(hidden, torch.Tensor)
                 and hidden.shape[0] == groups.inv.shape[0] and cl is not None)
        if cache is not None and cache is not groups.cache:  # a cache made inside this call
            groups.restore()
            groups.cache = cache
        held = groups.layer_key.pop(index, None)  # this layer's cache holds one row per group
        if not share:
            if held is not None and cl not in (None, "absent"):
                _take_rows(cl, held)  # back to one row per batch row
            return original(*args, **kwargs)
        B, rep, inv = hidden.shape[0], groups.rep, groups.inv
        args = tuple(_narrow(a, rep, B) for a in args)
        kwargs = {k: (v if k in _NEVER_SLICE else _narrow(v, rep, B)) for k, v in kwargs.items()}
        if cl != "absent":  # rows of the new groups: from their old group, or the batch row
            _take_rows(cl, rep if held is None else held[rep])
        if cache is not None:  # from here on the layer's cache holds one row per new group,
            groups.layer_key[index] = inv  # also if the call below raises: restore() widens it
        out = original(*args, **kwargs)
        groups.rows_run += rep.numel()
        groups.rows_seen += B
        if isinstance(out, torch.Tensor):
            return out[inv]
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (out[0][inv],) + tuple(o[inv] if isinstance(o, torch.Tensor)
                                          and o.shape[0] == rep.numel() else o for o in out[1:])
        raise TypeError(f"shared_trunk: unexpected output type {type(out).__name__} from "
                        f"decoder layer {index}")

    return forward


def first_edited_layer(gains: torch.Tensor) -> int:
    """gains (C, L, H) or (L, H) -> the first layer where any gain differs from 1 (L if none)."""
    edited = (gains != 1).reshape(-1, gains.shape[-2], gains.shape[-1]).any(0).any(-1)  # (L,)
    hit = edited.nonzero()
    return int(hit[0, 0]) if hit.numel() else gains.shape[-2]


@contextmanager
def shared_trunk(model: nn.Module, upto: int, stats: Optional[dict] = None):
    """Inside the block, decoder layers ``0 .. upto-1`` of ``model`` run once per group of
    identical batch rows (see the module docstring). ``upto`` is the first edited layer of
    every row (``first_edited_layer``); 0 turns sharing off. VLM adapters are left alone.

    stats, when given, receives ``trunk_rows_run`` / ``trunk_rows_seen`` (rows the trunk
    layers computed vs were asked for) and ``trunk_calls`` (calls where sharing applied)."""
    ad = get_adapter(model)
    upto = min(int(upto), ad.num_layers)
    if upto <= 0 or ad.model_type in VLM_MODEL_TYPES:
        yield
        return
    groups = _Groups()

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("inputs_embeds") is not None or kwargs.get("pixel_values") is not None:
            ids = None
        cache = next((x for x in (*args, *kwargs.values()) if isinstance(x, Cache)), None)
        groups.update(ids, kwargs.get("attention_mask"), cache)

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    layers = ad.layers[:upto]
    try:
        for i, layer in enumerate(layers):
            layer.forward = _wrap(layer, i, groups)
        yield
    finally:
        groups.restore()
        handle.remove()
        for layer in layers:
            layer.__dict__.pop("forward", None)
        if stats is not None:
            stats.update(trunk_rows_run=groups.rows_run, trunk_rows_seen=groups.rows_seen,
                         trunk_calls=groups.calls)


__all__ = ["shared_trunk", "first_edited_layer"]
