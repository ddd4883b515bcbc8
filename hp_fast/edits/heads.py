"""Head edits at run time: multiply chosen query heads' writes by a gain (docs/method.md section 5).

``edit_heads(model, gains, positions=..., mode=...)`` is a context manager; it scales each
edited head's slice of the W_O input at run time (prompt and decode steps, KV cache
included); leaving the block restores the model exactly, also when the block raises. Two
interchangeable paths compute it:

* "attention" (``hp_fast.edits.attention``): the gain is applied inside the attention call by
  the ``hp_fast::head_gain`` op while it writes the (B, T, H*dh) layout o_proj reads, the copy
  the model makes anyway (for sdpa it replaces transformers' transpose+contiguous);
* "hook": a forward pre-hook on each edited W_O applies the same op to its input (one extra
  copy per edited layer); the reference twin, and the fallback for attention modules that do
  not go through transformers' attention registry.

"auto" picks "attention" when every attention module calls the registry. Neither path reads
or writes a weight, so both work unchanged on models spread over devices, offloaded by
accelerate, or quantized (bitsandbytes, GPTQ, ...): the gains live on each edited layer's
execution device (``hp_fast.models.devices``).

Which to use:

* a fixed edit applied to every position that you will run many times: ``fold_head_gains``
  (``hp_fast.edits.fold``; no overhead at all; not for per-row gains or positions);
* sweeps over gains or head sets, several configurations in one batch (per-row gains of
  shape (batch, layers, heads), see ``hp_fast.generation``), or position-selective edits
  (``positions="prompt"``, ``"generated"``, or a bool mask such as the image tokens of a
  VLM prompt, ``hp_fast.edits.positions``): ``edit_heads`` (attention path overhead: a few
  microseconds per edited layer per forward pass, see benchmarks/RESULTS.md).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import ops
from . import attention
from ..models.adapters import ModelAdapter, get_adapter
from ..models.devices import execution_device
from .gains import Gains, gains_tensor
from .positions import PassTracker, Positions, check_positions

MODES = ("auto", "attention", "hook")


class _LayerGain:
    """One layer's gains (H,) or (B, H), float32 on the layer's device, and its positions."""

    __slots__ = ("gains", "tracker")

    def __init__(self, gains: torch.Tensor, tracker: PassTracker | None):
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
    (e.g. ``input_ids == image_token_id``; decode steps are not edited). See PassTracker.
    mode: "attention" (gains applied in the attention call, hp_fast.edits.attention), "hook"
    (pre-hooks on each edited W_O), or "auto" (attention when every attention module calls
    transformers' registry, else hook). Both compute the same numbers.
    """
    check_positions(positions)
    ad = get_adapter(model)
    path = _edit_path(ad, mode)
    g = gains_tensor(gains, ad.num_layers, ad.num_heads)                       # (L, H) or (B, L, H)
    edited = (g != 1).reshape(-1, ad.num_layers, ad.num_heads).any(0).any(-1)  # (L,)
    tracker = None if isinstance(positions, str) and positions == "all" else PassTracker(positions)
    layer_edits = {}
    for layer in torch.nonzero(edited).flatten().tolist():
        layer_gain = g[layer] if g.dim() == 2 else g[:, layer]                   # (H,) or (B, H)
        device = execution_device(ad.out_projs[layer])  # never meta (offloaded W_O)
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


__all__ = ["MODES", "edit_heads", "edit_path"]
