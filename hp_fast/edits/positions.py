"""Which positions of each forward pass an edit touches (``edit_heads(..., positions=...)``).

positions: "all"; "prompt" (the positions of the prompt pass); "generated" (the positions
after it: decode steps); or a bool (batch, prompt_tokens) mask over the padded prompt (e.g.
``input_ids == image_token_id``; decode steps are then not edited).
"""
from __future__ import annotations

from typing import Union

import torch
from transformers.cache_utils import Cache

Positions = Union[str, torch.Tensor]
POSITION_KINDS = ("all", "prompt", "generated")


def check_positions(positions) -> None:
    """Raise a clear ValueError unless ``positions`` is a kind or a bool (B, T) mask."""
    if isinstance(positions, torch.Tensor):
        if positions.dtype != torch.bool or positions.dim() != 2:
            raise ValueError("positions as a tensor must be a bool (batch, prompt_tokens) mask, got "
                             f"{positions.dtype} of shape {tuple(positions.shape)}")
    elif positions not in POSITION_KINDS:
        raise ValueError(f"positions must be one of {POSITION_KINDS} or a bool "
                         f"(batch, prompt_tokens) tensor, got {positions!r}")


class PassTracker:
    """Which positions of the current forward pass an edit selects (``positions`` != "all").

    ``on_pass`` is a forward pre-hook (with kwargs) on the first decoder layer, which sees every
    pass: its hidden states give (B, T) and the KV cache (if any) the number of earlier
    positions. The first pass in the block, and every pass that starts on an empty cache (a new
    ``generate``), is a prompt pass: its positions are the prompt (so is a pass with another
    batch size than the prompt's, which cannot continue it). Later passes continue it at
    absolute positions [past, past + T), past = cached length (0 without a cache, e.g.
    ``use_cache=False`` recomputing prompt + generated tokens). Prompt positions are those
    before the end of the prompt pass; generated positions the ones after.

    After each pass, ``shape`` is its (B, T) and ``selection`` is None (every position),
    False (none) or a (B, T) bool mask.
    """

    def __init__(self, positions: Positions):
        check_positions(positions)
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


__all__ = ["Positions", "POSITION_KINDS", "PassTracker", "check_positions"]
