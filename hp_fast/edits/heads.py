"""Head edits: multiply chosen query heads' writes by a gain (method.md §5).

Two ways, same math:

* ``edit_heads(model, gains, positions=..., mode=...)``: a context manager; scales each
  edited head's slice of the W_O input at run time (prompt and decode steps, KV cache
  included); leaving the block restores the model exactly, also when the block raises.
  Two interchangeable paths compute it:
  - "attention" (hp_fast.attention): the gain is applied inside the attention call by the
    ``hp_fast::head_gain`` op while it writes the (B, T, H*dh) layout o_proj reads, the
    copy the model makes anyway (for sdpa it replaces transformers' transpose+contiguous);
  - "hook": a forward pre-hook on each edited W_O applies the same op to its input (one
    extra copy per edited layer); the reference twin, and the fallback for attention
    modules that do not go through transformers' attention registry.
  "auto" picks "attention" when every attention module calls the registry.
* ``fold_head_gains(model, gains)``: scales the W_O columns in place (zero cost at
  inference); returns a handle whose ``undo()`` restores the saved columns bit for bit.

Which to use:

* a fixed edit applied to every position that you will run many times: ``fold_head_gains``
  (no overhead at all; not for per-row gains or positions);
* sweeps over gains or head sets, several configurations in one batch (per-row gains of
  shape (batch, layers, heads), see ``hp_fast.batched``), or position-selective edits
  (``positions="prompt"``, ``"generated"``, or a bool mask such as the image tokens of a
  VLM prompt): ``edit_heads`` (attention path overhead: a few microseconds per edited
  layer per forward pass, see benchmarks/RESULTS.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping, Union

import torch

from transformers.cache_utils import Cache

from . import attention, ops
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


Positions = Union[str, torch.Tensor]
MODES = ("auto", "attention", "hook")
_POSITION_KINDS = ("all", "prompt", "generated")


class _PassTracker:
    """Which positions of the current forward pass an edit selects (``positions`` != "all").

    A forward pre-hook on the first decoder layer sees every pass: its hidden states give
    (B, T) and the KV cache (if any) the number of earlier positions. The first pass in the
    block, and every pass that starts on an empty cache (a new ``generate``), is a prompt
    pass: its positions are the prompt (so is a pass with another batch size than the
    prompt's, which cannot continue it). Later passes continue it at absolute positions
    [past, past + T), past = cached length (0 without a cache, e.g. ``use_cache=False``
    recomputing prompt + generated tokens). Prompt positions are those before the end of
    the prompt pass; generated positions the ones after.
    """

    def __init__(self, positions: Positions):
        self.kind = "mask" if isinstance(positions, torch.Tensor) else positions
        self.prompt_mask = positions if self.kind == "mask" else None  # (B, T_prompt) bool
        self.prompt_start = self.prompt_end = None  # absolute positions of the prompt pass
        self.shape = None                           # (B, T) of the current pass
        self.selection = None                       # None: all, False: none, (B, T) bool mask

    def on_pass(self, _module, args, kwargs):
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
        B, T = hidden.shape[0], hidden.shape[1]
        cache = next((v for v in list(args[1:]) + list(kwargs.values()) if isinstance(v, Cache)),
                     None)
        past = int(cache.get_seq_length()) if cache is not None else 0
        if self.prompt_end is None or (cache is not None and past == 0) or B != self.shape[0]:
            self._new_prompt(B, T, past)
        self.shape = (B, T)
        self.selection = self._select(B, past, past + T, hidden.device)

    def _new_prompt(self, B, T, past):
        if self.kind == "mask" and tuple(self.prompt_mask.shape) != (B, T):
            raise ValueError(f"positions mask has shape {tuple(self.prompt_mask.shape)} but the "
                             f"prompt pass is (batch, tokens) = ({B}, {T}); pass a bool mask "
                             "over the padded prompt (e.g. input_ids == image_token_id)")
        self.prompt_start, self.prompt_end = past, past + T

    def _select(self, B, start, end, device):
        p0, p1 = self.prompt_start, self.prompt_end
        if self.kind == "mask":
            if start >= p1:
                return False
            m = torch.zeros(B, end - start, dtype=torch.bool, device=device)   # (B, T)
            lo, hi = max(start, p0), min(end, p1)
            m[:, lo - start:hi - start] = self.prompt_mask[:, lo - p0:hi - p0].to(device)
            return m
        in_prompt = self.kind == "prompt"
        if end <= p1:                          # whole pass inside the prompt
            return None if in_prompt else False
        if start >= p1:                        # whole pass generated
            return False if in_prompt else None
        pos = torch.arange(start, end, device=device) < p1                     # (T,)
        return (pos if in_prompt else ~pos).expand(B, end - start)


class _LayerGain:
    """One layer's gains (H,) or (B, H), float32 on the layer's device, and its positions."""

    __slots__ = ("gains", "tracker")

    def __init__(self, gains: torch.Tensor, tracker: _PassTracker | None):
        self.gains = gains
        self.tracker = tracker

    def resolve(self, batch: int, tokens: int):
        """(gains, mask or None) for a call on (batch, tokens), or None if nothing is edited."""
        g = self.gains
        if g.dim() == 2 and g.shape[0] != batch:
            raise ValueError(f"per-row gains were given for {g.shape[0]} rows but the batch has "
                             f"{batch}; pass gains of shape (batch, layers, heads)")
        tracker = self.tracker
        if tracker is None:
            return g, None
        if tracker.shape != (batch, tokens):
            raise RuntimeError(f"hp_fast: an attention call on (batch, tokens) = ({batch}, "
                               f"{tokens}) does not match the forward pass {tracker.shape} seen by "
                               "the first decoder layer; use positions='all' for this model")
        sel = tracker.selection
        if sel is False:
            return None
        return g, sel


def _o_proj_hook(edit: _LayerGain, ad: ModelAdapter):
    """Pre-hook on W_O: x (B, T, H*dh) -> x with each head's slice times its gain."""
    H, dh = ad.num_heads, ad.head_dim

    def hook(_module, args):
        x = args[0]
        B, T = x.shape[0], x.shape[1]
        resolved = edit.resolve(B, T)
        if resolved is None:
            return None
        gains, mask = resolved
        y = ops.head_gain(x.view(B, T, H, dh), gains, mask, False)  # (B, T, H*dh)
        return (y,) + tuple(args[1:])
    return hook


def _check_positions(positions) -> None:
    if isinstance(positions, torch.Tensor):
        if positions.dtype != torch.bool or positions.dim() != 2:
            raise ValueError("positions as a tensor must be a bool (batch, prompt_tokens) mask, got "
                             f"{positions.dtype} of shape {tuple(positions.shape)}")
    elif positions not in _POSITION_KINDS:
        raise ValueError(f"positions must be one of {_POSITION_KINDS} or a bool (batch, "
                         f"prompt_tokens) tensor, got {positions!r}")


def edit_path(model, mode: str = "auto") -> str:
    """The path ``edit_heads(model, ..., mode=mode)`` takes: "attention" or "hook"."""
    return _edit_path(get_adapter(model), mode)


def _edit_path(ad: ModelAdapter, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "hook":
        return "hook"
    blocker = attention.registry_blocker(ad.attns)
    if blocker is None:
        return "attention"
    if mode == "attention":
        raise ValueError(f"mode='attention' is not possible for this model: {blocker}; "
                         "use mode='hook' (or 'auto')")
    return "hook"


@contextmanager
def edit_heads(model, gains: Gains, *, positions: Positions = "all", mode: str = "auto"):
    """Scale heads' writes inside the block; the model is restored on exit (also on errors).

    gains: {(layer, head): gain}, a (layers, heads) tensor, or a per-row
    (batch, layers, heads) tensor (row b of every batch gets gains[b]).
    positions: "all"; "prompt" (positions of the prompt pass); "generated" (positions
    after it: decode steps); or a bool (batch, prompt_tokens) mask of prompt positions
    (e.g. ``input_ids == image_token_id``; decode steps are not edited). See _PassTracker.
    mode: "attention" (gains applied in the attention call, hp_fast.attention), "hook"
    (pre-hooks on each edited W_O), or "auto" (attention when every attention module calls
    transformers' registry, else hook). Both compute the same numbers.
    """
    _check_positions(positions)
    ad = get_adapter(model)
    path = _edit_path(ad, mode)
    g = gains_tensor(gains, ad.num_layers, ad.num_heads)
    edited = (g != 1).reshape(-1, ad.num_layers, ad.num_heads).any(0).any(-1)  # (L,)
    tracker = None if isinstance(positions, str) and positions == "all" else _PassTracker(positions)
    layer_edits = {}
    for layer in torch.nonzero(edited).flatten().tolist():
        layer_gain = g[layer] if g.dim() == 2 else g[:, layer]                   # (H,) or (B, H)
        device = ad.out_projs[layer].weight.device
        layer_edits[layer] = _LayerGain(layer_gain.to(device).contiguous(), tracker)
    handles = []
    try:
        if tracker is not None and layer_edits:
            handles.append(ad.layers[0].register_forward_pre_hook(tracker.on_pass, with_kwargs=True))
        if path == "hook" or not layer_edits:
            for layer, edit in layer_edits.items():
                handles.append(ad.out_projs[layer].register_forward_pre_hook(_o_proj_hook(edit, ad)))
            yield model
        else:
            with attention.attention_edit({ad.attns[l]: e for l, e in layer_edits.items()}):
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


__all__ = ["edit_heads", "edit_path", "fold_head_gains", "gains_tensor", "uniform_gains",
           "FoldHandle", "count_heads"]
